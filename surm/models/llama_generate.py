"""Text from a `surm.models.llama` decoder: greedy or sampled (temperature, top-p) decoding
with a key/value cache, and the chat format of SmolLM2 (ChatML)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from surm.models.llama import Llama, init_cache

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


def chat_prompt(user: str, system: str | None = None) -> str:
    """A single-turn ChatML prompt (``<|im_start|>role ... <|im_end|>``), ending where the
    assistant's answer begins."""
    parts = [] if system is None else [f"<|im_start|>system\n{system}<|im_end|>\n"]
    return "".join(parts) + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
