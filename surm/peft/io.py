"""Adapter-only files: the trainable tree as safetensors plus the spec as JSON.

``save(folder, trainable, spec)`` writes ``adapters.safetensors`` (flat '/'-joined names) and
``peft_spec.json``. ``load(folder, base_params)`` rebuilds the tree's structure from the spec on
a freshly loaded base and fills it from the file; a missing, unexpected or mis-shaped tensor is
an error naming it. Files are read without unpickling.
"""
from __future__ import annotations

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


def save(folder: str | os.PathLike, trainable: Mapping, spec: PeftSpec) -> None:
    """Write atomically (temp files, then rename) so a crash never leaves a half-written file."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(jax.device_get(v)) for k, v in tree.flatten(trainable).items()}
    for name, write in ((WEIGHTS, lambda p: safetensors.numpy.save_file(flat, p)),
                        (SPEC, lambda p: pathlib.Path(p).write_text(spec.to_json()))):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        os.close(fd)
        write(tmp)
        os.replace(tmp, folder / name)


def load(folder: str | os.PathLike, base_params: Mapping, layers: Mapping | None = None
         ) -> tuple[dict, PeftSpec]:
    """(trainable, spec) from ``save``'s files, shaped against ``base_params`` (and ``layers``,
    the ``surm.peft.layers.trace`` the adapters were made with, if any)."""
    folder = pathlib.Path(folder)
    for name in (WEIGHTS, SPEC):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: an adapter folder holds "
                                    f"{WEIGHTS} and {SPEC} (written by surm.peft.io.save)")
    spec = PeftSpec.from_json((folder / SPEC).read_text())
    template, _ = surgery.init(base_params, spec, jax.random.PRNGKey(0), layers)
    want = {k: np.shape(v) for k, v in tree.flatten(template).items()}
    got = safetensors.numpy.load_file(str(folder / WEIGHTS))
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k} {got[k].shape}" for k in sorted(set(got) - set(want))]
    problems += [f"mis-shaped {k}: file {got[k].shape}, expected {want[k]}"
                 for k in sorted(set(want) & set(got)) if got[k].shape != want[k]]
    if problems:
        raise ValueError(f"{folder / WEIGHTS} does not fit this base model and spec:\n  "
                         + "\n  ".join(problems))
    return tree.fill(template, got), spec
