"""Hugging Face PEFT's C3A adapter folders <-> surm's lora-mode ``block_circulant`` and
``circulant`` adapters on BERT, both ways.

    python -m surm.interop.c3a export WORKDIR OUT [--no-head] [--dtype float32]
    python -m surm.interop.c3a import C3A_FOLDER BERT_FOLDER OUT [--structure circulant]
                                  [--num_labels N] [--pooling P]

``export`` writes a finished run's adapters as a C3A folder that
``PeftModel.from_pretrained(transformers_model, OUT)`` loads; ``import`` writes a C3A folder's
adapters as a surm adapter folder (``surm.peft.io``) for the BERT in BERT_FOLDER.

The C3A folder (what ``PeftModel.save_pretrained`` writes for ``peft_type="C3A"``):

* ``adapter_config.json``: ``peft_type`` "C3A", ``block_size`` and ``block_size_pattern``
  ({module name: block size} where a module's differs), ``target_modules`` (here the full
  module names), ``modules_to_save`` (here ["classifier"] when the head is in the file),
  ``init_weights`` (True: zero kernels; what a fresh adapter would start from), ``bias``
  "none", ``task_type`` ("SEQ_CLS" for a ``BertForSequenceClassification``, "FEATURE_EXTRACTION"
  for a ``BertModel``), ``base_model_name_or_path``.
* ``adapter_model.safetensors``: ``base_model.model.<module>.c3a_kernel`` of shape
  (d_out / b, d_in / b, b) per targeted linear layer, and a head saved in full as
  ``base_model.model.classifier.{weight,bias}`` (torch layout; the adapter name is not in the
  saved keys).

C3A's update of a torch Linear (weight (d_out, d_in), y = x W^T) with kernel w: the input is cut
into d_in / b blocks x_p, and output block q is ``sum_p fft(ifft(x_p) * fft(w[q, p])).real``
divided by d_in, the circular cross-correlation y_q[k] = sum_t x_p[t] w[q, p, (t - k) mod b] / d_in.
In surm's row-vector convention (y = x @ M, ``block_circulant`` block (p, q) has
M[p b + i, q b + j] = c[p, q, (j - i) mod b]) the same matrix with surm's ``scale`` s is

    w[q, p, r] = d_in * s * c[p, q, (-r) mod b]

(block indices swapped, each block's vector reversed after its first entry). ``circulant`` on a
square d x d target is the one-block case b = d; a rectangle (surm's leading block of a
max(d_in, d_out) circulant) is not a C3A update and is refused. The kernels are written in
float64 by default: d_in * c is then exact, so surm -> C3A -> surm gives back the same bits
(PEFT casts the kernel to its float32 parameter on loading); ``dtype="float32"`` writes PEFT's
own dtype, off by at most half a float32 ulp. A learned scale or ``scale != 1`` is folded into
the kernels; adapter dropout has no C3A counterpart (it only acts in training).

The classifier, which always trains in full in surm, is C3A's ``modules_to_save`` when the
transformers model has it (pooling='pooler', ``BertForSequenceClassification``). With
pooling 'mean' or 'cls' the transformers model is a ``BertModel`` and the classifier lives in
surm's sentence-transformers export (``python -m surm.export``, ``2_Dense``): export with
``head=False``. Other base leaves that train in full (BitFit biases, LayerNorms, ``train_extra``)
have no C3A form and are refused.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from typing import Any, Mapping

import jax
import numpy as np
import safetensors.numpy

from surm import structured
from surm.models import bert, bert_io
from surm.peft import io as peft_io
from surm.peft import surgery, tree
from surm.peft.spec import PeftSpec
from surm.workdir import staged_folder

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
KERNEL = "c3a_kernel"
FAMILIES = ("block_circulant", "circulant")
HEAD = "classifier"


def _reverse_tail(n: int) -> np.ndarray:
    """Index r -> (-r) mod n: [0, n-1, ..., 1]."""
    return (-np.arange(n)) % n


def kernel_of(S: structured.Params, scale: float = 1.0) -> np.ndarray:
    """The float64 C3A kernel (d_out / b, d_in / b, b) whose update is ``scale * to_dense(S)``."""
    if S.family == "block_circulant":
        c = np.asarray(jax.device_get(S["c"]))
    elif S.family == "circulant":
        if S.d_in != S.d_out:
            raise ValueError(f"a circulant update of a {S.d_in} x {S.d_out} layer is the leading "
                             f"block of a {max(S.d_in, S.d_out)}-circulant, not a C3A update; "
                             f"C3A takes circulant adapters on square layers only (or use "
                             f"block_circulant)")
        arrays = {k: np.asarray(jax.device_get(v)) for k, v in S.arrays.items()}
        theta = arrays["a"] * arrays["b"] if S.hparams["form"] == "hadamard" else arrays["c"]
        c = theta[None, None, :]
    else:
        raise ValueError(f"C3A holds block-circulant updates; {S.family} is not one")
    b = c.shape[-1]
    return np.transpose(c, (1, 0, 2))[..., _reverse_tail(b)].astype(np.float64) * (
        S.d_in * float(scale))


def block_circulant_of(w: np.ndarray, d_in: int) -> np.ndarray:
    """The inverse of ``kernel_of`` at scale 1: block_circulant's c (d_in/b, d_out/b, b)."""
    w = np.asarray(w, np.float64)
    c = np.transpose(w, (1, 0, 2))[..., _reverse_tail(w.shape[-1])] / d_in
    return np.asarray(c, np.float32, order="C")


def _is_target(node: Any) -> bool:
    return isinstance(node, Mapping) and "S" in node


def _base_model_of(config) -> str | None:
    ckpt = config.model.get("checkpoint") or "random"
    if ckpt == "random":
        return None
    return os.fspath(bert_io.minilm_l6_path() if ckpt == "minilm_l6" else ckpt)


def to_c3a(source: Mapping | str | os.PathLike, spec: PeftSpec | None,
           out_folder: str | os.PathLike, *, pooling: str = "pooler", head: bool = True,
           base_model: str | None = None, dtype: str = "float64") -> dict:
    """Writes the adapters as a C3A folder (module docstring) in `out_folder` (new or empty);
    returns the adapter config written.

    `source`: a trainable tree (with its `spec`) of a BERT with the given `pooling`, or a
    finished ``surm.train`` workdir (`spec` None: the run's spec, pooling and base checkpoint
    are used). `head`: write the classifier as ``modules_to_save`` (pooling='pooler' only).
    `base_model`: ``base_model_name_or_path``, the base checkpoint's name or folder.
    """
    if not isinstance(source, Mapping):
        from surm import runs
        run = runs.load_run(source)
        if run.config.model.name != "bert":
            raise ValueError(f"{source} is a {run.config.model.name} run; C3A folders are "
                             f"written for BERT runs only")
        if spec is not None and spec != run.spec:
            raise ValueError(f"{source} was trained with another spec than the one given")
        source, spec = run.trainable, run.spec
        pooling = run.model.config.pooling
        base_model = base_model or _base_model_of(run.config)
    elif spec is None:
        raise ValueError("to_c3a of a trainable tree needs its spec")
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    if spec.method != "lora" or spec.structure not in FAMILIES:
        raise ValueError(f"C3A is a lora-mode block-circulant update: a {spec.label} spec has "
                         f"no C3A form (use method lora with structure block_circulant or "
                         f"circulant)")
    tensors, block_sizes = {}, {}
    for path, node in tree.flatten(source["adapters"], stop=_is_target).items():
        module = bert_io.hf_module(path, pooling)
        scale = np.asarray(jax.device_get(node.get("scale", spec.update_scale)))
        w = kernel_of(node["S"], float(scale))
        tensors[f"{PREFIX}{module}.{KERNEL}"] = w.astype(dtype)
        block_sizes[module] = w.shape[-1]
    if not tensors:
        raise ValueError("the tree holds no adapters")
    base = tree.flatten(source.get("base", {}))
    head_leaves = {f"{HEAD}/kernel", f"{HEAD}/bias"}
    others = sorted(set(base) - head_leaves)
    if others:
        raise ValueError(f"C3A folders hold the kernels and whole modules; these base leaves "
                         f"train alone and have no C3A form: {others}")
    if head and base:
        if pooling != "pooler":
            raise ValueError(f"pooling={pooling!r}: the transformers model is a BertModel, "
                             f"without the classifier (it is the 2_Dense of surm.export's "
                             f"sentence-transformers folder); export the kernels alone with "
                             f"head=False (--no-head)")
        tensors[f"{PREFIX}{HEAD}.weight"] = np.asarray(base[f"{HEAD}/kernel"], np.float32).T
        tensors[f"{PREFIX}{HEAD}.bias"] = np.asarray(base[f"{HEAD}/bias"], np.float32)
    common = max(sorted(set(block_sizes.values())), key=list(block_sizes.values()).count)
    config = {
        "peft_type": "C3A",
        "task_type": "SEQ_CLS" if pooling == "pooler" else "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "block_size": int(common),
        "block_size_pattern": {m: int(b) for m, b in block_sizes.items() if b != common},
        "target_modules": sorted(block_sizes),
        "bias": "none",
        "modules_to_save": [HEAD] if f"{PREFIX}{HEAD}.weight" in tensors else None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_weights": True if spec.init == "zero" else False,
    }
    _write_folder(pathlib.Path(out_folder), config, tensors)
    return config


def _write_folder(out: pathlib.Path, config: dict, tensors: Mapping[str, np.ndarray]) -> None:
    """Whole or not at all: into a temporary folder beside `out`, renamed at the end."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; write into a new one")
    with staged_folder(out) as staging:
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        safetensors.numpy.save_file({k: np.asarray(v, order="C") for k, v in tensors.items()},
                                    str(staging / WEIGHTS))


def from_c3a(c3a_folder: str | os.PathLike, base_params: Mapping, *,
             structure: str = "block_circulant") -> tuple[dict, PeftSpec]:
    """(trainable, spec) of surm for a C3A folder on the BERT whose parameters are
    `base_params` (the names follow its layout: ``BertForSequenceClassification`` when it has a
    pooler, else ``BertModel``).

    The file says which modules are targeted and each kernel's block size; the spec gets their
    exact paths, ``hparams`` {"block_size": b} (or none when each module's b is its gcd(d_in,
    d_out), surm's default) and scale 1. ``structure="circulant"`` reads one-block kernels on square
    layers as surm's plain circulant. A head in the file becomes the trained classifier; without
    one the base's classifier is kept. Anything else in the file (biases, other modules) is an
    error naming it.
    """
    folder = pathlib.Path(c3a_folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: a C3A folder holds {CONFIG} and "
                                    f"{WEIGHTS} (PeftModel.save_pretrained)")
    if structure not in FAMILIES:
        raise ValueError(f"structure must be one of {FAMILIES}, got {structure!r}")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("peft_type") != "C3A":
        raise ValueError(f"{folder / CONFIG}: peft_type {config.get('peft_type')!r}, not 'C3A'")
    pooling = "pooler" if "pooler" in base_params else "mean"
    modules = surgery.linear_modules(base_params)
    by_name = {bert_io.hf_module(p, pooling): p for p in modules if p.split("/")[0] != HEAD}
    tensors = safetensors.numpy.load_file(str(folder / WEIGHTS))
    kernels, head, problems = {}, {}, []
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        module, _, leaf = name.rpartition(".")
        if leaf == KERNEL and module in by_name:
            path = by_name[module]
            d_in, d_out = modules[path]
            b = value.shape[-1] if value.ndim == 3 else 0
            if not b or value.shape != (d_out // b, d_in // b, b) or d_in % b or d_out % b:
                problems.append(f"mis-shaped {key}: {value.shape} for a {d_in} -> {d_out} layer")
            kernels[path] = value
        elif pooling == "pooler" and module == HEAD and leaf in ("weight", "bias"):
            head[leaf] = value
        else:
            problems.append(f"unexpected {key} {value.shape}")
    if not kernels and not problems:
        problems.append(f"no {KERNEL} tensors")
    if problems:
        raise ValueError(f"{folder / WEIGHTS} does not fit this BERT (surm reads C3A kernels of "
                         f"its linear layers and a classifier):\n  " + "\n  ".join(problems))

    sizes = {path: w.shape[-1] for path, w in kernels.items()}
    if structure == "circulant":
        odd = [p for p, b in sizes.items() if not b == modules[p][0] == modules[p][1]]
        if odd:
            raise ValueError(f"structure='circulant' needs one-block kernels on square layers; "
                             f"these are not: {odd}")
        hparams = {}
    elif len(set(sizes.values())) == 1:
        hparams = {"block_size": next(iter(sizes.values()))}
    elif all(b == math.gcd(*modules[p]) for p, b in sizes.items()):
        hparams = {}
    else:
        raise ValueError(f"block sizes differ across modules ({sorted(set(sizes.values()))}) "
                         f"and are not each module's gcd(d_in, d_out): a surm spec takes one "
                         f"block size")
    spec = PeftSpec.create(method="lora", structure=structure, hparams=hparams,
                           targets=[p for p in modules if p in kernels],
                           init="zero" if config.get("init_weights", True) is True else "random")
    template, _ = surgery.init(base_params, spec, jax.random.PRNGKey(0))
    flat = tree.flatten(template)
    for path, w in kernels.items():
        c = block_circulant_of(w, modules[path][0])
        flat[f"adapters/{path}/S/c"] = c[0, 0] if structure == "circulant" else c
    if head:
        want = np.shape(flat[f"base/{HEAD}/kernel"])
        if set(head) != {"weight", "bias"} or head["weight"].T.shape != want:
            raise ValueError(f"{folder / WEIGHTS}: the classifier "
                             f"{ {k: v.shape for k, v in head.items()} } does not fit this "
                             f"BERT's {want[::-1]} (weight, torch layout) and bias")
        flat[f"base/{HEAD}/kernel"] = np.asarray(head["weight"], np.float32).T
        flat[f"base/{HEAD}/bias"] = np.asarray(head["bias"], np.float32)
    return tree.fill(template, flat), spec


def _export(args) -> list[str]:
    config = to_c3a(args.workdir, None, args.out, head=args.head, dtype=args.dtype)
    lines = [f"c3a: {args.out} ({len(config['target_modules'])} modules, block size "
             f"{config['block_size']})"]
    if not config["modules_to_save"]:
        lines.append("the classifier is not in the folder: PEFT keeps the base model's; the "
                     "trained one is in python -m surm.export's merged model")
    return lines


def _import(args) -> list[str]:
    tensors = safetensors.numpy.load_file(str(pathlib.Path(args.c3a) / WEIGHTS))
    head = tensors.get(f"{PREFIX}{HEAD}.weight")
    num_labels = args.num_labels or (head.shape[0] if head is not None else 2)
    # Names of a BertForSequenceClassification ("bert." inside) call for its pooler.
    in_classifier = any(k.startswith(f"{PREFIX}bert.") for k in tensors)
    pooling = args.pooling or ("pooler" if in_classifier else None)
    _, base = bert_io.load(args.base, num_labels=num_labels, pooling=pooling)
    trainable, spec = from_c3a(args.c3a, base, structure=args.structure)
    out = pathlib.Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; write into a new one")
    peft_io.save(out, trainable, spec,
                 base=peft_io.base_identity(base, spec, f"bert:{args.base}"))
    return [f"adapters: {out} ({spec.label}, {len(spec.targets)} modules, "
            f"hparams {dict(spec.hparams)}, {num_labels} outputs)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surm.interop.c3a",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="a finished BERT run -> a C3A folder")
    p.add_argument("workdir")
    p.add_argument("out")
    p.add_argument("--no-head", dest="head", action="store_false",
                   help="leave the classifier out (needed for pooling mean/cls)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.set_defaults(run=_export)
    p = sub.add_parser("import", help="a C3A folder -> a surm adapter folder")
    p.add_argument("c3a")
    p.add_argument("base", help="the Hugging Face BERT folder the adapters were trained on")
    p.add_argument("out")
    p.add_argument("--structure", "--family", choices=FAMILIES, default="block_circulant")
    p.add_argument("--num_labels", type=int, help="default: the file's classifier, else 2")
    p.add_argument("--pooling", choices=bert.POOLINGS,
                   help="default: 'pooler' for a BertForSequenceClassification's names, else "
                        "what BASE records")
    p.set_defaults(run=_import)
    args = parser.parse_args(argv)
    try:
        lines = args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {'; '.join(line.strip() for line in str(e).splitlines() if line.strip())}",
              file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
