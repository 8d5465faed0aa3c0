"""Vision Transformer whose parameter tree matches google-research/vision_transformer checkpoints.

The `.npz` files published by google-research/vision_transformer (``gs://vit_models/...``,
including the AugReg ones) hold flat '/'-joined names::

    embedding/{kernel,bias}                          Conv, kernel (p, p, 3, D)
    cls                                              (1, 1, D)
    Transformer/posembed_input/pos_embedding         (1, 1 + N, D)
    Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/kernel
                                                     (D, H, D/H), bias (H, D/H)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/kernel
                                                     (H, D/H, D), bias (D,)
    Transformer/encoderblock_{i}/LayerNorm_2/{scale,bias}
    Transformer/encoderblock_{i}/MlpBlock_3/Dense_{0,1}/{kernel,bias}
    Transformer/encoder_norm/{scale,bias}
    pre_logits/{kernel,bias}                         only with a representation layer
    head/{kernel,bias}

Options for DINOv2-style checkpoints (all off by default): ``layer_scale`` adds
``Transformer/encoderblock_{i}/layer_scale_{attn,mlp}/scale`` (D,), ``gelu_approximate=False``
uses the exact erf GELU, and `resample_posemb`'s ``"torch_bicubic"`` resizes position embeddings
as DINOv2 does. LayerNorm epsilon is Flax's default 1e-6, as in both layouts. A `.npz` written by
`save(..., arch=...)` records these fields (see `checkpoint_config`), so `load` can check that a
model fits a file beyond its shapes.

The block's sub-module numbers (0, 1, 2, 3) come from pre-Linen Flax, which counted sub-modules
across classes; this model names them explicitly so those files load without renaming. Linen
counts per class, so checkpoints written by Linen code (big_vision, or `flax.training.checkpoints
.convert_pre_linen` output) number them ``LayerNorm_0, MultiHeadDotProductAttention_0,
LayerNorm_1, MlpBlock_0``; `load` maps those back. See `load` for the other layouts it reads.

Every linear layer is an `nn.Dense` / `nn.DenseGeneral` sub-module applied through its
``__call__``, so parameter surgery can intercept it (`nn.intercept_methods`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from surm.models import _loading, layers

log = logging.getLogger(__name__)

VARIANTS = {
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}
CLASSIFIERS = ("token", "gap")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Everything that fixes the architecture. Build one with `config_for`.

    Attributes:
      num_classes: size of the `head`.
      patch_size: side of the square patches (14, 16, 32, ...).
      image_size: side of the square input images; must be a multiple of `patch_size`.
      width, depth, num_heads, mlp_dim: transformer hidden size, blocks, heads, MLP size.
      classifier: 'token' (prepend a learned [CLS] token and read it out) or 'gap' (global
        average of the patch tokens, no `cls` parameter).
      representation_size: width of the tanh `pre_logits` layer; None for none.
      layer_scale: multiply the attention and MLP outputs by learned per-channel scales before
        the residual additions (DINOv2, CaiT); parameters ``layer_scale_attn/scale`` and
        ``layer_scale_mlp/scale`` in each block.
      gelu_approximate: the tanh approximation of GELU (Google's checkpoints, Flax's default)
        or, when False, the exact erf form (DINOv2 and PyTorch's default).
      dropout: dropout after the position embeddings, attention and MLP layers.
      attention_dropout: dropout on the attention weights.
      dtype: compute dtype (e.g. "bfloat16"); parameters stay float32 and logits are float32.
    """

    num_classes: int
    patch_size: int = 16
    image_size: int = 224
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    classifier: str = "token"
    representation_size: int | None = None
    layer_scale: bool = False
    gelu_approximate: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Any = "float32"

    def __post_init__(self):
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier={self.classifier!r}; expected one of {CLASSIFIERS}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes}; expected at least 1")
        jnp.dtype(self.dtype)  # Fails early on an unknown dtype name.

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: 1 for the [CLS] token, else 0."""
        return 1 if self.classifier == "token" else 0


def config_for(name: str, **overrides) -> ViTConfig:
    """The config of a named variant, e.g. ``config_for("S/16", image_size=224, num_classes=10)``.

    `name` is ``"<Ti|S|B|L>/<patch size>"``; `overrides` sets any other `ViTConfig` field
    (`num_classes` is required).
    """
    variant, _, patch = name.partition("/")
    if variant not in VARIANTS or not patch.isdigit():
        raise ValueError(
            f"Unknown ViT name {name!r}; expected '<variant>/<patch size>' with variant one of "
            f"{sorted(VARIANTS)}, e.g. 'B/16'")
    return ViTConfig(**{**VARIANTS[variant], "patch_size": int(patch), **overrides})


class AddPositionEmbs(nn.Module):
    """Adds a learned (1, tokens, width) `pos_embedding`."""

    @nn.compact
    def __call__(self, x):
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]))
        return x + pos.astype(x.dtype)


class LayerScale(nn.Module):
    """Multiplies by a learned per-channel `scale` (DINOv2's layer scale); starts at 1."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return x * scale.astype(x.dtype)


class MlpBlock(nn.Module):
    """Dense -> GELU -> Dense. GELU is the tanh approximation by default, which Google's
    checkpoints were trained with (Flax's default); DINOv2 uses the exact form."""

    mlp_dim: int
    dropout: float
    dtype: Any
    gelu_approximate: bool = True

    @nn.compact
    def __call__(self, x, *, train: bool):
        dense = lambda features: nn.Dense(
            features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6))
        width = x.shape[-1]
        x = layers.gelu(dense(self.mlp_dim)(x), approximate=self.gelu_approximate)
        x = layers.Dropout(self.dropout)(x, deterministic=not train)
        return layers.Dropout(self.dropout)(dense(width)(x), deterministic=not train)


class Encoder1DBlock(nn.Module):
    """Pre-LayerNorm transformer block, named like the published checkpoints (plus the
    optional layer scales)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x, *, train: bool):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        y = nn.LayerNorm(dtype=dtype, name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=cfg.num_heads,
            dtype=dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            broadcast_dropout=False,
            dropout_rate=cfg.attention_dropout,
            deterministic=not train,
            # Softmax in float32 keeps bfloat16 attention close to the float32 result.
            attention_fn=layers.dot_product_attention,
            name="MultiHeadDotProductAttention_1",
        )(y, y)
        if cfg.layer_scale:
            y = LayerScale(name="layer_scale_attn")(y)
        x = x + layers.Dropout(cfg.dropout)(y, deterministic=not train)
        y = nn.LayerNorm(dtype=dtype, name="LayerNorm_2")(x)
        y = MlpBlock(cfg.mlp_dim, cfg.dropout, dtype, cfg.gelu_approximate,
                     name="MlpBlock_3")(y, train=train)
        if cfg.layer_scale:
            y = LayerScale(name="layer_scale_mlp")(y)
        return x + y


class Encoder(nn.Module):
    """Position embeddings, `depth` blocks, final LayerNorm."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x, *, train: bool):
        cfg = self.config
        x = AddPositionEmbs(name="posembed_input")(x)
        x = layers.Dropout(cfg.dropout)(x, deterministic=not train)
        for i in range(cfg.depth):
            x = Encoder1DBlock(cfg, name=f"encoderblock_{i}")(x, train=train)
        return nn.LayerNorm(dtype=jnp.dtype(cfg.dtype), name="encoder_norm")(x)


class ViT(nn.Module):
    """`ViT(config).apply({"params": params}, images, train=False)` -> (B, num_classes) logits.

    `images` is (B, image_size, image_size, 3) float. With ``train=True`` and dropout > 0, pass
    ``rngs={"dropout": key}``.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images, train: bool = False):
        cfg = self.config
        if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"images have shape {images.shape}; the config wants "
                             f"(batch, {cfg.image_size}, {cfg.image_size}, 3)")
        dtype = jnp.dtype(cfg.dtype)
        p = cfg.patch_size
        x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                    name="embedding")(images)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        if cfg.classifier == "token":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        x = Encoder(cfg, name="Transformer")(x, train=train)
        x = x[:, 0] if cfg.classifier == "token" else x.mean(axis=1)
        if cfg.representation_size is not None:
            x = jnp.tanh(nn.Dense(cfg.representation_size, dtype=dtype, name="pre_logits")(x))
        logits = nn.Dense(cfg.num_classes, dtype=dtype, kernel_init=nn.initializers.zeros,
                          name="head")(x)
        return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Loading checkpoints.

_POSEMB = "Transformer/posembed_input/pos_embedding"
# Where other layouts keep the position embeddings (big_vision: top level; big_vision before
# 2022: directly under Transformer).
_POSEMB_ALIASES = ("pos_embedding", "Transformer/pos_embedding")
# Linen per-class numbering of a block's sub-modules -> the published (pre-Linen) numbering.
_LINEN_BLOCK_NAMES = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
# Trees saved together with other state: old vit_jax (optimizer target) and big_vision.
_TREE_PREFIXES = ("opt/target/", "params/")

_GET_CHECKPOINTS = (
    "Published ViT checkpoints are .npz files from google-research/vision_transformer, e.g. "
    "`gsutil cp gs://vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0"
    ".npz .` (or https://storage.googleapis.com/vit_models/augreg/<name>.npz; the list is "
    "gs://vit_models/augreg/index.csv). Nothing is downloaded at run time: fetch the file and "
    "pass its path.")


POSEMB_METHODS = ("bilinear", "cubic", "torch_bicubic")


def _torch_bicubic_matrix(old: int, new: int, a: float = -0.75) -> np.ndarray:
    """(new, old) weights of 1-D bicubic resizing as PyTorch computes it.

    ``F.interpolate(mode="bicubic", align_corners=False)`` without antialiasing, which is also
    ONNX ``Resize(mode="cubic", cubic_coeff_a=-0.75, coordinate_transformation_mode="half_pixel",
    exclude_outside=0)``: output i samples the input at (i + 0.5) * old / new - 0.5 with Keys'
    cubic kernel (a = -0.75) on the four nearest samples, indices clamped to the edge. Unlike
    `jax.image.resize`, the kernel is not widened when shrinking.
    """
    def kernel(d):
        d = np.abs(d)
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = (((d - 5) * d + 8) * d - 4) * a
        return np.where(d <= 1, near, np.where(d < 2, far, 0.0))

    source = (np.arange(new) + 0.5) * (old / new) - 0.5
    first = np.floor(source) - 1
    weights = np.zeros((new, old))
    for tap in range(4):
        index = first + tap
        np.add.at(weights, (np.arange(new), np.clip(index, 0, old - 1).astype(int)),
                  kernel(source - index))
    return weights


def resample_posemb(posemb: np.ndarray, grid_size: int, num_prefix_tokens: int,
                    method: str = "bilinear") -> np.ndarray:
    """Resizes (1, prefix + g*g, D) position embeddings to (1, prefix + grid_size**2, D).

    The patch embeddings are treated as a g x g image with D channels; the prefix ([CLS]) rows
    are kept. `method`:

    * ``"bilinear"``, ``"cubic"``: `jax.image.resize` (antialiased when shrinking);
    * ``"torch_bicubic"``: PyTorch's bicubic without antialiasing (see `_torch_bicubic_matrix`),
      how DINOv2 fits its 37 x 37 table to the input size inside the forward pass, so a DINOv2
      model run here at any size matches the original run at that size.
    """
    if method not in POSEMB_METHODS:
        raise ValueError(f"Unknown position-embedding resampling {method!r}; expected one of "
                         f"{POSEMB_METHODS}")
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    old = math.isqrt(len(grid))
    if old * old != len(grid):
        raise ValueError(
            f"Cannot resample position embeddings of shape {posemb.shape}: {len(grid)} patch "
            f"positions (after {num_prefix_tokens} prefix token(s)) are not a square grid")
    grid = grid.reshape(old, old, -1)
    if method == "torch_bicubic":
        weights = _torch_bicubic_matrix(old, grid_size)
        grid = np.einsum("ih,jw,hwd->ijd", weights, weights, grid.astype(np.float64))
    else:
        grid = jax.image.resize(jnp.asarray(grid, jnp.float32),
                                (grid_size, grid_size, grid.shape[-1]), method)
    grid = np.asarray(grid, posemb.dtype).reshape(1, grid_size**2, -1)
    return np.concatenate([prefix, grid], axis=1)


# The npz entry where `save(..., arch=...)` records the architecture: a JSON string (a numpy
# unicode scalar, so it reads with allow_pickle=False) of `ARCH_FIELDS` and "posemb_method".
ARCH_KEY = "surm/vit_arch"
ARCH_FIELDS = ("patch_size", "width", "depth", "num_heads", "mlp_dim", "layer_scale",
               "gelu_approximate")


def _read_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No ViT checkpoint at {path!r}. {_GET_CHECKPOINTS}")
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _known_arch(arch: dict[str, Any], path: str) -> dict[str, Any]:
    unknown = sorted(set(arch) - set(ARCH_FIELDS) - {"posemb_method"})
    if unknown:
        raise ValueError(f"Checkpoint {path}: unknown architecture fields {unknown}; known: "
                         f"{ARCH_FIELDS + ('posemb_method',)}")
    return arch


def _parse_arch(value: np.ndarray, path: str) -> dict[str, Any]:
    return _known_arch(json.loads(str(value)), path)


def read_arch(path: str | os.PathLike) -> dict[str, Any]:
    """The architecture a `.npz` records (`ARCH_FIELDS`, "posemb_method"); {} if none."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No ViT checkpoint at {path!r}. {_GET_CHECKPOINTS}")
    with np.load(path, allow_pickle=False) as npz:
        return _parse_arch(npz[ARCH_KEY], path) if ARCH_KEY in npz.files else {}


def arch_of(config: ViTConfig, posemb_method: str | None = None) -> dict[str, Any]:
    """The architecture record of a model (`ARCH_FIELDS`, and `posemb_method` when given), for
    `save(..., arch=...)`."""
    arch = {field: getattr(config, field) for field in ARCH_FIELDS}
    return {**arch, "posemb_method": posemb_method} if posemb_method else arch


def checkpoint_config(path: str | os.PathLike, **overrides) -> ViTConfig | None:
    """The `ViTConfig` a `.npz` records, completed by `overrides` (at least `num_classes`;
    `image_size`, `classifier`, `dtype`, ...); None for a file that records none."""
    arch = read_arch(path)
    if not arch:
        return None
    arch.pop("posemb_method", None)
    return ViTConfig(**{**arch, **overrides})


def _check_arch(arch: dict[str, Any], config: ViTConfig, path: str) -> None:
    wrong = [f"{k}={getattr(config, k)!r} (checkpoint: {v!r})" for k, v in arch.items()
             if k in ARCH_FIELDS and getattr(config, k) != v]
    if wrong:
        raise ValueError(f"Checkpoint {path} was written for another architecture: config has "
                         f"{', '.join(wrong)}. Build the config with "
                         f"surm.models.vit.checkpoint_config({path!r}, num_classes=...)")


def _canonical_names(flat: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """Renames the layouts `load` accepts to this model's names."""
    for prefix in _TREE_PREFIXES:
        if any(key.startswith(prefix) for key in flat):
            others = sorted(key for key in flat if not key.startswith(prefix))
            if others:
                log.info("ViT load: ignoring %d entries outside %r (e.g. %s)", len(others),
                         prefix, others[0])
            flat = {key[len(prefix):]: v for key, v in flat.items() if key.startswith(prefix)}
            break
    renamed = {}
    for key, value in flat.items():
        parts = key.split("/")
        if key in _POSEMB_ALIASES:
            parts = _POSEMB.split("/")
        elif len(parts) > 2 and parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
            parts[2] = _LINEN_BLOCK_NAMES.get(parts[2], parts[2])
        new_key = "/".join(parts)
        if new_key in renamed:
            raise ValueError(f"Checkpoint {path} holds {new_key!r} under two names, mixing layouts")
        renamed[new_key] = value
    return renamed


def _fit_posemb(posemb: np.ndarray, config: ViTConfig, method: str) -> np.ndarray:
    """Adds a zero [CLS] row to big_vision tables, then resamples to the config's grid."""
    if posemb.ndim != 3 or posemb.shape[-1] != config.width:
        return posemb  # Reported as mis-shaped by the tree check.
    prefix = config.num_prefix_tokens
    if prefix and math.isqrt(posemb.shape[1]) ** 2 == posemb.shape[1]:
        # big_vision adds position embeddings before prepending [CLS], so its table has no
        # [CLS] row; a zero row computes exactly the same thing.
        log.info("ViT load: position embeddings without a [CLS] row; adding a zero row")
        posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    wanted = prefix + config.grid_size**2
    old_grid = posemb.shape[1] - prefix
    # A table that is not a square grid after the prefix is left to the tree check to report.
    if posemb.shape[1] != wanted and old_grid > 0 and math.isqrt(old_grid) ** 2 == old_grid:
        log.info("ViT load: resampling position embeddings %s -> %s (%s)", posemb.shape,
                 (1, wanted, config.width), method)
        posemb = resample_posemb(posemb, config.grid_size, prefix, method)
    return posemb


def load(path: str | os.PathLike, config: ViTConfig, *, posemb_method: str | None = None
         ) -> dict:
    """Reads a google-format ViT `.npz` checkpoint into params for `ViT(config)`.

    Reads the published vision_transformer layout, its old ``opt/target/`` prefix, big_vision's
    ``params/`` prefix, Linen-numbered blocks (``MultiHeadDotProductAttention_0``,
    ``LayerNorm_1``, ``MlpBlock_0``) and big_vision's position embeddings (``pos_embedding`` or
    ``Transformer/pos_embedding``, with or without a [CLS] row). Then:

    * position embeddings for another grid are resampled with `resample_posemb`
      (`posemb_method`, one of `POSEMB_METHODS`), keeping the [CLS] row. The `embedding` kernel is
      not resampled, so a different patch size is reported as mis-shaped;
    * a `pre_logits` layer the config does not have is dropped, and the head is then fresh;
    * a head for another class count (or none) is replaced by a zero-initialised one.
    Each of these says so in a log line. Anything else that does not fit raises.

    Args:
      path: the `.npz` file, read with ``np.load(allow_pickle=False)``.
      config: the model to load into.
      posemb_method: interpolation for resampled position embeddings; None: the one the file
        records (`save(..., arch=...)`), else 'bilinear'.

    Returns:
      The params tree (nested dicts of float32 numpy arrays): ``ViT(config).apply({"params":
      params}, images)``.

    Raises:
      FileNotFoundError: no file at `path` (the message says where checkpoints come from).
      ValueError: missing, unexpected or mis-shaped tensors, each named with both shapes, or a
        config that differs from the architecture the file records.
    """
    path = os.fspath(path)
    flat = _read_npz(path)
    arch = _parse_arch(flat.pop(ARCH_KEY), path) if ARCH_KEY in flat else {}
    _check_arch(arch, config, path)
    posemb_method = posemb_method or arch.get("posemb_method", "bilinear")
    flat = _canonical_names(flat, path)
    expected = _loading.expected_shapes(
        ViT(config), jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32))

    if _POSEMB in flat:
        flat[_POSEMB] = _fit_posemb(flat[_POSEMB], config, posemb_method)

    fresh_head = False
    if "pre_logits/kernel" in flat and "pre_logits/kernel" not in expected:
        log.info("ViT load: dropping pre_logits %s (config has no representation layer); "
                 "the head is re-initialised", flat["pre_logits/kernel"].shape)
        flat = {k: v for k, v in flat.items() if not k.startswith("pre_logits/")}
        fresh_head = True
    head = ("head/kernel", "head/bias")
    if not fresh_head and any(k not in flat or flat[k].shape != expected[k] for k in head):
        found = flat["head/kernel"].shape if "head/kernel" in flat else "no head"
        log.info("ViT load: checkpoint head is %s, config wants %s (num_classes=%d): using a "
                 "fresh zero-initialised head", found, expected["head/kernel"],
                 config.num_classes)
        fresh_head = True
    if fresh_head:
        flat.update({k: np.zeros(expected[k], np.float32) for k in head})

    _loading.check_tree(flat, expected, path)
    return _loading.unflatten(flat)


def save(path: str | os.PathLike, params: dict, *, arch: dict[str, Any] | None = None) -> None:
    """Writes ``params`` as a google-format ``.npz`` (flat '/'-joined names) that `load` reads.

    `arch` (`ARCH_FIELDS` and optionally "posemb_method") is recorded beside the tensors so the
    file alone says which model it fits (`checkpoint_config`) and `load` checks it.
    """
    flat = {k: np.asarray(v, np.float32)
            for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}
    if arch:
        flat[ARCH_KEY] = np.asarray(json.dumps(_known_arch(arch, os.fspath(path)),
                                               sort_keys=True))
    with open(path, "wb") as f:
        np.savez(f, **flat)
