"""A Llama-architecture decoder in Flax Linen, loaded from a GGUF file (llama.cpp's format).

    config, params, tokenizer = llama.load_gguf(path)        # dequantised once, cached as .npz
    model = llama.Llama(config)
    logits = model.apply({"params": params}, tokens)         # (batch, time, vocab)
    ids = llama.generate(model, params, prompt_ids, max_new_tokens=32, eos_id=config.eos_id)

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
import functools
import hashlib
import json
import logging
import os
import pathlib
import sys
import time
import zipfile
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from surm.models import _loading, gguf

log = logging.getLogger(__name__)


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


def _sample(logits, rng, temperature, top_p):
    """Greedy where ``temperature`` is 0, else nucleus sampling over the smallest set of
    tokens whose probability reaches ``top_p`` (all of them at 1). Both settings are traced,
    so one compiled step serves every setting."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(rng, sorted_logits, axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy)


def generate(model: Llama, params, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, rng=None,
             apply_fn=None) -> np.ndarray:
    """Continues ``prompt_ids`` ((time,) or (batch, time), equal lengths) by up to
    ``max_new_tokens`` tokens with a key/value cache: greedy at ``temperature`` 0, else
    sampling (``top_p`` < 1: nucleus). A sequence that emits ``eos_id`` repeats it from then
    on; generation stops when every sequence has. Returns the new tokens (batch, new) or (new,).
    ``apply_fn(params, tokens, cache, index) -> (logits, cache)`` replaces ``model.apply``
    (e.g. the model with unmerged adapters: `surm.generate`).
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng")
    prompt = np.asarray(prompt_ids, np.int32)
    single = prompt.ndim == 1
    prompt = prompt[None] if single else prompt
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids must be (time,) or (batch, time) with time > 0, "
                         f"got shape {np.shape(prompt_ids)}")
    batch, length = prompt.shape
    cache = init_cache(model.config, batch, length + max_new_tokens)
    step = _decode_step(model) if apply_fn is None else _decode_step_of(apply_fn)
    rng = jax.random.key(0) if rng is None else rng
    tokens, done, out = jnp.asarray(prompt), np.zeros(batch, bool), []
    index = 0
    for _ in range(max_new_tokens):
        rng, key = jax.random.split(rng)
        nxt, cache = step(params, tokens, cache, jnp.int32(index), key,
                          jnp.float32(temperature), jnp.float32(top_p))
        index += tokens.shape[1]
        nxt = np.where(done, eos_id if eos_id is not None else 0, np.asarray(nxt))
        out.append(nxt)
        if eos_id is not None:
            done |= nxt == eos_id
            if done.all():
                break
        tokens = jnp.asarray(nxt[:, None], jnp.int32)
    new = np.stack(out, axis=1) if out else np.zeros((batch, 0), np.int32)
    return new[0] if single else new


@functools.lru_cache(maxsize=8)
def _decode_step(model):
    """One jitted step per model, so that repeated calls compile once per shape."""
    return _decode_step_of(
        lambda params, tokens, cache, index: model.apply({"params": params}, tokens, cache,
                                                         index))


@functools.lru_cache(maxsize=8)
def _decode_step_of(apply_fn):
    @jax.jit
    def step(params, tokens, cache, index, key, temperature, top_p):
        logits, cache = apply_fn(params, tokens, cache, index)
        return _sample(logits[:, -1], key, temperature, top_p), cache
    return step


# ---------------------------------------------------------------- loading from GGUF

def _layer_names(i: int) -> dict[str, tuple[str, bool]]:
    """GGUF tensor name -> (model path, is a linear weight to transpose), for block ``i``."""
    p, g = f"layers_{i}", f"blk.{i}"
    return {f"{g}.attn_norm.weight": (f"{p}/attn_norm/scale", False),
            f"{g}.attn_q.weight": (f"{p}/attn/q_proj/kernel", True),
            f"{g}.attn_k.weight": (f"{p}/attn/k_proj/kernel", True),
            f"{g}.attn_v.weight": (f"{p}/attn/v_proj/kernel", True),
            f"{g}.attn_output.weight": (f"{p}/attn/o_proj/kernel", True),
            f"{g}.ffn_norm.weight": (f"{p}/mlp_norm/scale", False),
            f"{g}.ffn_gate.weight": (f"{p}/mlp/gate_proj/kernel", True),
            f"{g}.ffn_up.weight": (f"{p}/mlp/up_proj/kernel", True),
            f"{g}.ffn_down.weight": (f"{p}/mlp/down_proj/kernel", True)}


def tensor_map(config: LlamaConfig) -> dict[str, tuple[str, bool]]:
    """Every GGUF tensor the model reads: name -> (model path, transpose)."""
    names = {"token_embd.weight": ("embed/embedding", False),
             "output_norm.weight": ("norm/scale", False)}
    if not config.tie_embeddings:
        names["output.weight"] = ("lm_head/kernel", True)
    for i in range(config.n_layers):
        names.update(_layer_names(i))
    return names


def convert_gguf(path: str | os.PathLike, dtype=np.float32) -> tuple[LlamaConfig, dict]:
    """(config, flat params '/'-path -> array) from a GGUF file. Every tensor of the file must be
    one the model reads and the other way round; an error lists each one that is not."""
    f = gguf.GGUFFile(path)
    config = LlamaConfig.from_gguf(f.metadata, tie_embeddings="output.weight" not in f.tensors)
    names = tensor_map(config)
    missing = sorted(names.keys() - f.tensors.keys())
    extra = sorted(f.tensors.keys() - names.keys())
    if missing or extra:
        raise ValueError(
            f"GGUF file {path} does not fit a {config.n_layers}-block llama:"
            + "".join(f"\n  missing     {n}" for n in missing)
            + "".join(f"\n  unexpected  {n}" for n in extra))
    flat = {}
    for name, (model_path, transpose) in names.items():
        a = f.array(name)
        flat[model_path] = (a.T if transpose else a).astype(dtype)
    expected = _loading.expected_shapes(Llama(config), jnp.zeros((1, 1), jnp.int32))
    _loading.check_tree(flat, expected, os.fspath(path),
                        origin=lambda p: next(n for n, (mp, _) in names.items() if mp == p))
    return config, flat


def cache_dir() -> pathlib.Path:
    """``$SURM_MODEL_DIR``, else ``~/.cache/surm/models``."""
    return pathlib.Path(os.environ.get("SURM_MODEL_DIR") or "~/.cache/surm/models").expanduser()


_CONFIG_KEY = "__config__"


def cached_npz(path: str | os.PathLike, dtype=np.float32,
               directory: str | os.PathLike | None = None) -> pathlib.Path:
    """The dequantised ``.npz`` of the GGUF file ``path``, converted on first use. Its name
    carries the file's SHA-256 and the dtype, so another file is converted anew."""
    path = pathlib.Path(path)
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            sha.update(chunk)
    dtype_name = np.dtype(dtype).name
    if dtype_name not in ("float32", "bfloat16"):
        raise ValueError(f"parameters are float32 or bfloat16, not {dtype_name}")
    out = pathlib.Path(directory or cache_dir()) / (
        f"{path.stem}-{sha.hexdigest()[:16]}-{dtype_name}.npz")
    if not out.is_file():
        log.info("Dequantising %s to %s (once)", path, out)
        config, flat = convert_gguf(path, np.float32)
        fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "dtype"}
        arrays = {k: (v.astype(jnp.bfloat16).view(np.uint16) if dtype_name == "bfloat16" else
                      v.astype(dtype)) for k, v in flat.items()}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays, **{_CONFIG_KEY: np.frombuffer(
            json.dumps(fields).encode(), np.uint8)})
        os.replace(tmp, out)
    return out


# What reading a damaged .npz raises: never loaded any other way (no pickle, ever)
_DAMAGED = (zipfile.BadZipFile, ValueError, EOFError, KeyError, TypeError, OSError)


def _read_cache(npz: pathlib.Path, bf16: bool) -> tuple[LlamaConfig, dict]:
    """(config, flat params) of a cache file; every array read whole, so that the zip's CRC
    checks every byte."""
    with np.load(npz, allow_pickle=False) as data:
        fields = json.loads(data[_CONFIG_KEY].tobytes().decode())
        flat = {k: (data[k].view(jnp.bfloat16) if bf16 else data[k])
                for k in data.files if k != _CONFIG_KEY}
    return LlamaConfig(**fields), flat


def load_gguf(path: str | os.PathLike, dtype=np.float32, cache: bool = True,
              directory: str | os.PathLike | None = None):
    """(config, params, tokenizer) from a GGUF file: the parameters dequantised to ``dtype``
    (float32 or bfloat16), through the ``.npz`` cache unless ``cache`` is False."""
    start = time.perf_counter()
    bf16 = np.dtype(dtype) == np.dtype(jnp.bfloat16)
    if cache:
        npz = cached_npz(path, dtype, directory)
        try:
            config, flat = _read_cache(npz, bf16)
        except _DAMAGED as e:  # cut short, overwritten, a bit flipped (zip CRC): convert again
            print(f"note: the model cache {npz} is damaged ({str(e).splitlines()[0]}); "
                  f"converting {path} again", file=sys.stderr)
            npz.unlink(missing_ok=True)
            config, flat = _read_cache(cached_npz(path, dtype, directory), bf16)
    else:
        config, flat = convert_gguf(path, dtype)
    log.info("Loaded %s in %.1f s", path, time.perf_counter() - start)
    params = flax.traverse_util.unflatten_dict(flat, sep="/")
    return config, params, tokenizer_from_gguf(gguf.GGUFFile(path).metadata)


# ---------------------------------------------------------------- tokenizer

_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special tokens


def tokenizer_from_gguf(meta: dict):
    """A ``tokenizers.Tokenizer`` from GGUF metadata: byte-level BPE (``tokenizer.ggml.model``
    'gpt2') with the vocabulary and merges, control tokens as special tokens. Pre-tokenisation
    is GPT-2's, with digits split one by one for the 'smollm' pre-tokeniser."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {kind!r} is not supported (byte-level BPE, "
                         "'gpt2', is)")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = np.asarray(meta.get("tokenizer.ggml.token_type", np.ones(len(tokens))))
    special = [tokens[i] for i in np.flatnonzero((types == _CONTROL) | (types == _USER_DEFINED))]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def chat_prompt(user: str, system: str | None = None) -> str:
    """A single-turn ChatML prompt (``<|im_start|>role ... <|im_end|>``), ending where the
    assistant's answer begins."""
    parts = [] if system is None else [f"<|im_start|>system\n{system}<|im_end|>\n"]
    return "".join(parts) + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
