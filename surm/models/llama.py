"""A Llama-architecture decoder in Flax Linen. Its weights come from a GGUF file
(`surm.models.llama_gguf`); text from it, `surm.models.llama_generate`.

    config, params, tokenizer = llama_gguf.load_gguf(path)   # dequantised once, cached as .npz
    model = llama.Llama(config)
    logits = model.apply({"params": params}, tokens)         # (batch, time, vocab)
    ids = llama_generate.generate(model, params, prompt_ids, max_new_tokens=32,
                                  eos_id=config.eos_id)

Blocks: RMSNorm, grouped-query attention (``n_heads`` query heads share ``n_kv_heads``
key/value heads) with rotary position embeddings and a causal mask, RMSNorm, SwiGLU MLP; a
final RMSNorm and an output head, tied to the token embedding when the file has no
``output.weight``. The linear layers are ``nn.Dense`` without bias, named as in Hugging Face
(``layers_0/attn/q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``layers_0/mlp/gate_proj``,
``up_proj``, ``down_proj``), so `surm.peft` target rules select them by those names.

Rotary layout: llama.cpp's converter permutes the rows of each head of ``q_proj`` and
``k_proj`` from Hugging Face's "rotate half" order (dimension i paired with i + head_dim/2) to
the interleaved order (dimensions 2j and 2j+1 paired), which its rope (mode 0) rotates. The
weights are kept as stored and `rope` rotates interleaved pairs: pair j turns by
``position * base**(-2j / head_dim)``.

Decoding: with ``cache`` (from `init_cache`) the call writes the new keys and values at
``index`` and returns ``(logits, cache)``; the tokens attend to every cached position up to
their own.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    max_len: int = 2048
    tie_embeddings: bool = True
    bos_id: int | None = None
    eos_id: int | None = None
    dtype: Any = jnp.float32  # computation dtype; the parameters keep theirs

    def __post_init__(self):
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"width {self.dim} must split into {self.n_heads} heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} query heads do not share {self.n_kv_heads} "
                             "key/value heads evenly")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_gguf(cls, meta: dict, tie_embeddings: bool, **overrides) -> "LlamaConfig":
        """From a GGUF file's metadata (``llama.*`` keys and the tokenizer's special ids)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"GGUF architecture {arch!r} is not 'llama'")
        need = ("embedding_length", "block_count", "attention.head_count",
                "feed_forward_length")
        missing = [f"llama.{k}" for k in need if f"llama.{k}" not in meta]
        if missing:
            raise ValueError(f"GGUF metadata lacks {', '.join(missing)}")
        n_heads = int(meta["llama.attention.head_count"])
        dim = int(meta["llama.embedding_length"])
        rope_dims = meta.get("llama.rope.dimension_count", dim // n_heads)
        if int(rope_dims) != dim // n_heads:
            raise ValueError(f"partial rotary embeddings (llama.rope.dimension_count="
                             f"{rope_dims}, head size {dim // n_heads}) are not supported")
        vocab = meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", ())))
        fields = dict(
            vocab_size=int(vocab), dim=dim, n_layers=int(meta["llama.block_count"]),
            n_heads=n_heads, n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
            ffn_dim=int(meta["llama.feed_forward_length"]),
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
            max_len=int(meta.get("llama.context_length", 2048)), tie_embeddings=tie_embeddings,
            bos_id=_opt_int(meta.get("tokenizer.ggml.bos_token_id")),
            eos_id=_opt_int(meta.get("tokenizer.ggml.eos_token_id")))
        fields.update(overrides)
        return cls(**fields)


def _opt_int(value):
    return None if value is None else int(value)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotates interleaved pairs (2j, 2j+1) of the last axis of ``x`` (batch, time, heads, d)
    by ``positions`` (time,) or (batch, time) times ``base**(-2j/d)``."""
    d = x.shape[-1]
    freqs = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = jnp.asarray(positions, jnp.float32)[..., None] * freqs  # (..., time, d/2)
    if angles.ndim == 2:
        angles = angles[None]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], d // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, cache=None, index=None):
        c = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=c.dtype, name=name)
        b, t, _ = x.shape
        hd, kvh, groups = c.head_dim, c.n_kv_heads, c.n_heads // c.n_kv_heads
        q = dense(c.n_heads * hd, "q_proj")(x).reshape(b, t, c.n_heads, hd)
        k = dense(kvh * hd, "k_proj")(x).reshape(b, t, kvh, hd)
        v = dense(kvh * hd, "v_proj")(x).reshape(b, t, kvh, hd)
        q, k = rope(q, positions, c.rope_base), rope(k, positions, c.rope_base)
        key_pos = positions
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                             (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype),
                                             (0, index, 0, 0))
            cache = {"k": k, "v": v}
            key_pos = jnp.arange(k.shape[1])
        q = q.reshape(b, t, kvh, groups, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32) / np.sqrt(hd)
        mask = key_pos[None, :] <= positions[:, None]  # (t, s)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, v.astype(c.dtype))
        out = dense(c.dim, "o_proj")(out.reshape(b, t, c.n_heads * hd))
        return out, cache


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=c.dtype, name=name)
        hidden = nn.silu(dense(c.ffn_dim, "gate_proj")(x)) * dense(c.ffn_dim, "up_proj")(x)
        return dense(c.dim, "down_proj")(hidden)


class Block(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, cache=None, index=None):
        c = self.config
        norm = lambda name: nn.RMSNorm(epsilon=c.norm_eps, dtype=c.dtype, name=name)
        h, cache = Attention(c, name="attn")(norm("attn_norm")(x), positions, cache, index)
        x = x + h
        return x + MLP(c, name="mlp")(norm("mlp_norm")(x)), cache


class Llama(nn.Module):
    """Token ids (batch, time) -> logits (batch, time, vocab) in float32; with ``cache``,
    ``(logits, cache)``, the tokens sitting at positions ``index, index + 1, ...``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens, cache=None, index=0, train: bool = False):
        del train  # no dropout: the trainer's switch changes nothing here
        c = self.config
        embed = nn.Embed(c.vocab_size, c.dim, dtype=c.dtype, name="embed")
        x = embed(tokens)
        positions = index + jnp.arange(tokens.shape[1])
        new_cache = []
        for i in range(c.n_layers):
            x, layer_cache = Block(c, name=f"layers_{i}")(
                x, positions, None if cache is None else cache[i], index)
            new_cache.append(layer_cache)
        x = nn.RMSNorm(epsilon=c.norm_eps, dtype=c.dtype, name="norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype, name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, tuple(new_cache))


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=None) -> tuple:
    """Zero keys and values for ``length`` positions, one dict per layer."""
    if length > config.max_len:
        raise ValueError(f"a cache of {length} positions exceeds the model's context of "
                         f"{config.max_len}")
    shape = (batch, length, config.n_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, dtype or config.dtype)
    return tuple({"k": zeros, "v": zeros} for _ in range(config.n_layers))
