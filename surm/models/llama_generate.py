"""Text from a `surm.models.llama` decoder: greedy or sampled (temperature, top-p) decoding
with a key/value cache, and the chat format of SmolLM2 (ChatML)."""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from surm.models.llama import Llama, init_cache


def _sample(logits, rng, temperature, top_p):
    """Greedy where ``temperature`` is 0, else nucleus sampling over the smallest set of
    tokens whose probability reaches ``top_p`` (all of them at 1). Both settings are traced,
    so one compiled step serves every setting; only the one asked for runs (``lax.cond``:
    sorting the vocabulary costs a greedy step about a quarter of its time)."""
    def sampled(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        choice = jax.random.categorical(rng, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sampled, greedy, None)


BUCKET = 64  # prompt and cache lengths are rounded up to multiples: new lengths, no recompile


def _bucket(n: int, limit: int) -> int:
    return min(-(-n // BUCKET) * BUCKET, max(limit, n))


def generate(model: Llama, params, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, rng=None,
             apply_fn=None, stats: dict | None = None) -> np.ndarray:
    """Continues ``prompt_ids`` ((time,) or (batch, time), equal lengths) by up to
    ``max_new_tokens`` tokens with a key/value cache: greedy at ``temperature`` 0, else
    sampling (``top_p`` < 1: nucleus). A sequence that emits ``eos_id`` repeats it from then
    on; generation stops when every sequence has. Returns the new tokens (batch, new) or (new,).
    ``apply_fn(params, tokens, cache, index) -> (logits, cache)`` replaces ``model.apply``
    (e.g. the model with unmerged adapters: `surm.generate`).

    The prompt is padded on the right and the cache sized to multiples of ``BUCKET`` tokens,
    so a new prompt length or ``max_new_tokens`` reuses the compiled steps (a token attends only
    to the positions up to its own, so the padding is never seen). ``params`` are put on the
    device once. ``stats``, if given, receives the prompt and new token counts, the time to the
    first token and the tokens per second after the second (whose step compiles on a first
    call).
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
    start = time.perf_counter()
    batch, length = prompt.shape
    context = model.config.max_len
    size = _bucket(length + max_new_tokens, context)
    padded = _bucket(length, size)
    cache = init_cache(model.config, batch, size)
    params = jax.device_put(params)
    step = _decode_step(model) if apply_fn is None else _decode_step_of(apply_fn)
    rng = jax.random.key(0) if rng is None else rng
    tokens = np.zeros((batch, padded), np.int32)
    tokens[:, :length] = prompt
    tokens, last = jnp.asarray(tokens), length - 1
    done, out, times = np.zeros(batch, bool), [], []
    index = 0
    for _ in range(max_new_tokens):
        rng, key = jax.random.split(rng)
        nxt, cache = step(params, tokens, cache, jnp.int32(index), jnp.int32(last), key,
                          jnp.float32(temperature), jnp.float32(top_p))
        index += last + 1
        nxt = np.where(done, eos_id if eos_id is not None else 0, np.asarray(nxt))
        times.append(time.perf_counter())
        out.append(nxt)
        if eos_id is not None:
            done |= nxt == eos_id
            if done.all():
                break
        tokens, last = jnp.asarray(nxt[:, None], jnp.int32), 0
    new = np.stack(out, axis=1) if out else np.zeros((batch, 0), np.int32)
    if stats is not None:  # the first decoding step compiles too: the rate starts after it
        stats.update(prompt_tokens=length, new_tokens=new.shape[1],
                     first_token_s=(times[0] if times else time.perf_counter()) - start,
                     tokens_per_s=(len(times) - 2) / (times[-1] - times[1])
                     if len(times) > 2 else float("nan"))
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
    def step(params, tokens, cache, index, last, key, temperature, top_p):
        logits, cache = apply_fn(params, tokens, cache, index)
        return _sample(jnp.take(logits, last, axis=1), key, temperature, top_p), cache
    return step


def chat_prompt(user: str, system: str | None = None, template: str | None = None,
                **special: str) -> str:
    """A single-turn prompt ending where the assistant's answer begins: the model's own chat
    ``template`` (the GGUF file's ``tokenizer.chat_template``, a Jinja template, rendered as
    Hugging Face's ``apply_chat_template`` does; ``special``: e.g. ``bos_token``), or ChatML
    (``<|im_start|>role ... <|im_end|>``) without one."""
    messages = ([] if system is None else [{"role": "system", "content": system}]) + [
        {"role": "user", "content": user}]
    if template:
        return render_chat(template, messages, add_generation_prompt=True, **special)
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                **special: str) -> str:
    """A chat template rendered in a sandbox (a template from a file runs no Python), with
    Jinja's trim_blocks and lstrip_blocks as transformers sets them."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"the chat template refuses: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages,
                                            add_generation_prompt=add_generation_prompt,
                                            **special)
