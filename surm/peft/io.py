"""Adapter-only files: the trainable tree as safetensors, the spec as JSON, the base's identity.

``save(folder, trainable, spec, base=...)`` writes ``adapters.safetensors`` (flat '/'-joined
names, with a sha256 of its tensors in the file's metadata, which ``load`` verifies: a flipped
bit or a cut copy is an error, never a silently different adapter), ``peft_spec.json`` and, when given the identity of the base model the adapters were
trained on (``base_identity``), ``base.json``. ``load(folder, base_params)`` rebuilds the tree's
structure from the spec on a freshly loaded base and fills it from the file; a missing,
unexpected or mis-shaped tensor is an error naming it, and so is a base whose identity is not
the recorded one (folders without ``base.json`` load unchecked). Files are read without
unpickling.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Mapping

import jax
import numpy as np
import safetensors.numpy

from surm.peft import surgery, tree
from surm.peft.spec import PeftSpec

WEIGHTS = "adapters.safetensors"
SPEC = "peft_spec.json"
BASE = "base.json"


def base_hash(base_params: Mapping, spec: PeftSpec) -> str:
    """A fingerprint of the base weights that stay frozen under ``spec``: sha256 over every
    leaf of ``peft.split(base_params, spec)[1]`` in path order (path, dtype, shape, then the
    bytes), its first 16 hex digits.

    Only the frozen part counts because it is what an adapter folder does not hold and needs
    from elsewhere: the leaves that train in full (the head, biases under BitFit, ...) change in
    training and are restored from the folder, so the same fingerprint comes out of the
    pretrained tree before training and of a freshly loaded one at load time, whatever head
    size it was built with. All bytes are hashed (about 0.1 s per 100 MB).
    """
    _, frozen = surgery.split(base_params, spec)
    h = hashlib.sha256()
    for path, leaf in sorted(tree.flatten(frozen).items()):
        arr = np.asarray(jax.device_get(leaf), order="C")
        h.update(f"{path}\0{arr.dtype.name}\0{arr.shape}\0".encode())
        h.update(arr.reshape(-1).view(np.uint8))
    return h.hexdigest()[:16]


def base_identity(base_params: Mapping, spec: PeftSpec, name: str | None = None) -> dict:
    """What ``save(..., base=)`` records: ``{"name": name, "sha256": base_hash(...)}``; `name`
    is for people (e.g. ``"bert:minilm_l6"``), the hash is what ``load`` compares."""
    return {"name": name, "sha256": base_hash(base_params, spec)}


CHECKSUM = "surm_sha256"  # the metadata key of the tensors' checksum


def tensors_hash(flat: Mapping[str, np.ndarray]) -> str:
    """sha256 over the tensors in name order: name, dtype, shape, then the bytes."""
    h = hashlib.sha256()
    for name in sorted(flat):
        arr = np.asarray(flat[name], order="C")
        h.update(f"{name}\0{arr.dtype.name}\0{arr.shape}\0".encode())
        h.update(arr.reshape(-1).view(np.uint8))
    return h.hexdigest()


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of an adapters file, checked against the checksum it carries (files from
    before the checksum load unchecked); ValueError naming the file when it is cut, not a
    safetensors file, or not what was written."""
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        raise ValueError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}"
                         f"): it is damaged or cut short; save the adapters again") from None
    want = metadata.get(CHECKSUM)
    if want is not None and tensors_hash(flat) != want:
        raise ValueError(f"{path} does not match the checksum it was saved with: its bytes "
                         f"changed after saving (a damaged copy); save the adapters again")
    return flat


def _write(folder: pathlib.Path, name: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
    os.close(fd)
    write(tmp)
    os.replace(tmp, folder / name)


_REQUIRED = object()


def save(folder: str | os.PathLike, trainable: Mapping, spec: PeftSpec, *,
         base: Mapping | None = _REQUIRED) -> None:
    """Write atomically (temp files, then rename) so a crash never leaves a half-written file.
    ``base``: the pretrained tree the adapters were trained on (its ``base_identity`` is
    recorded, and ``load`` checks it), or that identity itself; ``base=None`` records none, on
    purpose."""
    if base is _REQUIRED:
        raise TypeError("save(folder, trainable, spec, base=...): pass base=base_params (the "
                        "pretrained tree the adapters belong to: recorded, and checked when "
                        "they are loaded) or base=None to record none")
    if base is not None and "sha256" not in base:  # the tree itself
        base = base_identity(base, spec)
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # C order: safetensors writes an array's buffer as it lies, so a transposed view would be
    # scrambled.
    flat = {k: np.asarray(jax.device_get(v), order="C")
            for k, v in tree.flatten(trainable).items()}
    _write(folder, WEIGHTS, lambda p: safetensors.numpy.save_file(
        flat, p, metadata={CHECKSUM: tensors_hash(flat)}))
    _write(folder, SPEC, lambda p: pathlib.Path(p).write_text(spec.to_json()))
    if base is not None:
        _write(folder, BASE, lambda p: pathlib.Path(p).write_text(json.dumps(dict(base))))
    else:
        (folder / BASE).unlink(missing_ok=True)  # another save's record would not hold here


def _check_base(folder: str | os.PathLike, base_params: Mapping, spec: PeftSpec) -> None:
    """ValueError when ``folder`` records a base other than ``base_params`` (nothing to check
    in folders without ``base.json``)."""
    path = pathlib.Path(folder) / BASE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
        want = recorded["sha256"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is damaged: expected a JSON object with sha256") from None
    got = base_hash(base_params, spec)
    if got != want:
        name = recorded.get("name") or "an unnamed base"
        raise ValueError(f"{folder} holds adapters trained on {name} (frozen weights sha256 "
                         f"{want}), but the base model given has frozen weights sha256 {got}: "
                         f"load the base they were trained on, or pass check_base=False to "
                         f"load them on this one anyway")


def mismatches(want: Mapping[str, tuple], got: Mapping[str, np.ndarray]) -> list[str]:
    """What keeps the file's tensors ``got`` from filling the shapes ``want``: a line per
    missing, unexpected or mis-shaped tensor, by name."""
    problems = [f"missing {k} {tuple(want[k])}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k} {got[k].shape}" for k in sorted(set(got) - set(want))]
    problems += [f"mis-shaped {k}: file {got[k].shape}, expected {tuple(want[k])}"
                 for k in sorted(set(want) & set(got)) if tuple(got[k].shape) != tuple(want[k])]
    return problems


def load(folder: str | os.PathLike, base_params: Mapping, layers: Mapping | None = None, *,
         check_base: bool = True) -> tuple[dict, PeftSpec]:
    """(trainable, spec) from ``save``'s files, shaped against ``base_params`` (and ``layers``,
    the ``surm.peft.layers.trace`` the adapters were made with, if any), which must be the base
    they were trained on unless ``check_base=False``."""
    folder = pathlib.Path(folder)
    for name in (WEIGHTS, SPEC):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: an adapter folder holds "
                                    f"{WEIGHTS} and {SPEC} (written by surm.peft.io.save)")
    try:
        spec = PeftSpec.from_json((folder / SPEC).read_text())
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{folder / SPEC} is not a PEFT spec written by surm.peft.io.save "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    template, _ = surgery.init(base_params, spec, jax.random.PRNGKey(0), layers)
    want = {k: np.shape(v) for k, v in tree.flatten(template).items()}
    got = read_tensors(folder / WEIGHTS)
    problems = mismatches(want, got)
    if problems:
        raise ValueError(f"{folder / WEIGHTS} does not fit this base model and spec:\n  "
                         + "\n  ".join(problems))
    if check_base:
        _check_base(folder, base_params, spec)
    return tree.fill(template, got), spec
