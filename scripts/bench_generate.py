"""Decoding speed of SmolLM2-135M: surm's merged model, surm with unmerged adapters, and
llama.cpp (llama-cpp-python, when installed in a scratch environment: it is not a project
dependency) on the same machine, greedy, one sequence.

    python scripts/bench_generate.py                       # surm only
    python scripts/bench_generate.py --json docs/results/bench_generate.json

Prints the time to the first token and the tokens per second after the second (the first
decoding step compiles), best of ``--repeats`` warm runs, the ratios unmerged / merged time and
surm / llama.cpp speed, and the CPU's vector extensions (AVX2 / AVX-512), since machines of this
kind differ.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys

import jax
import numpy as np

from surm import generate, peft
from surm.models import factory

PROMPT = "Shares in the bank fell sharply on Monday after"


def cpu_flags() -> list[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return sorted(f for f in set(flags) if f in ("avx2", "avx512f", "avx512bw", "avx512vnni",
                                                  "amx_tile"))


def surm_rate(gen: generate.Generator, tokens: int, repeats: int) -> dict:
    gen(PROMPT, max_tokens=tokens)  # compile both steps
    best = None
    for _ in range(repeats):
        gen(PROMPT, max_tokens=tokens)
        if best is None or gen.stats["tokens_per_s"] > best["tokens_per_s"]:
            best = dict(gen.stats)
    return best


_CPP = """
import json, sys, time
import llama_cpp
path, prompt, tokens, repeats, extra = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
default_params = llama_cpp.llama_model_default_params

def params():
    p = default_params()
    p.use_extra_bufts = bool(extra)
    return p
llama_cpp.llama.llama_cpp.llama_model_default_params = params
cpp = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
cpp.create_completion(prompt, max_tokens=4, temperature=0.0)
rates = []
for _ in range(repeats):
    start = time.perf_counter()
    out = cpp.create_completion(prompt, max_tokens=tokens, temperature=0.0)
    rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - start))
print(json.dumps({"tokens_per_s": max(rates), "version": llama_cpp.__version__}))
"""


def llama_cpp_rate(path: str, tokens: int, repeats: int) -> dict | None:
    """llama.cpp's greedy tokens/s on 2 threads, in a child process (a crash there cannot take
    this one down). Its weight repacking for AMX/AVX-512 ("extra buffer types") is tried
    first; where it crashes (it segfaults in some virtual machines) the plain CPU kernels
    are measured instead, and the result says which."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        if e.name != "llama_cpp":  # installed, but one of its own dependencies is missing
            print(f"llama.cpp: llama_cpp is installed but does not import ({e})")
        return None
    for extra in (1, 0):
        run = subprocess.run([sys.executable, "-c", _CPP, path, PROMPT, str(tokens),
                              str(repeats), str(extra)], capture_output=True, text=True,
                             timeout=900)
        if run.returncode == 0:
            out = json.loads(run.stdout.strip().splitlines()[-1])
            return {**out, "extra_buffer_types": bool(extra)}
        print(f"llama.cpp with extra buffer types {'on' if extra else 'off'} failed "
              f"(exit {run.returncode})")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    merged = generate.Generator.from_checkpoint("smollm2")
    entry = factory.registry.get("llama")
    spec = peft.PeftSpec.create(structure="circulant", targets="all-linear", heads=(),
                                init="random")
    layers = peft.layers.trace(merged.model, merged.params, np.zeros((1, 8), np.int32))
    trainable, _ = peft.init(jax.device_get(merged.params), spec, jax.random.PRNGKey(0), layers)
    base = jax.device_get(merged.params)
    unmerged = generate.Generator(merged.config, merged.model, base, trainable, spec,
                                  merged=False)
    with_adapters = generate.Generator(merged.config, merged.model, base, trainable, spec)
    out = {"command": "python scripts/bench_generate.py " + " ".join(argv or sys.argv[1:]),
           "machine": platform.machine(), "cpu_flags": cpu_flags(), "jax": jax.__version__,
           "tokens": args.tokens,
           "surm_merged": surm_rate(with_adapters, args.tokens, args.repeats),
           "surm_unmerged": surm_rate(unmerged, args.tokens, args.repeats),
           "llama_cpp": llama_cpp_rate(entry.gguf_path({"checkpoint": "smollm2"}), args.tokens,
                                       args.repeats)}
    m, u = out["surm_merged"]["tokens_per_s"], out["surm_unmerged"]["tokens_per_s"]
    out["unmerged_over_merged_time"] = m / u
    print(f"CPU {out['machine']} {', '.join(out['cpu_flags']) or '(no AVX2)'}; "
          f"{args.tokens} new tokens, greedy")
    print(f"surm merged:   first token {out['surm_merged']['first_token_s']:.3f} s, "
          f"{m:.1f} tokens/s")
    print(f"surm unmerged: first token {out['surm_unmerged']['first_token_s']:.3f} s, "
          f"{u:.1f} tokens/s (circulant adapters on all 210 linear layers)")
    print(f"unmerged / merged time: {out['unmerged_over_merged_time']:.2f}")
    if out["llama_cpp"]:
        c = out["llama_cpp"]["tokens_per_s"]
        out["surm_over_llama_cpp_speed"] = m / c
        repack = "on" if out["llama_cpp"]["extra_buffer_types"] else "off (crashed when on)"
        print(f"llama.cpp {out['llama_cpp']['version']} (weight repacking {repack}): {c:.1f} "
              f"tokens/s; surm / llama.cpp speed: {m / c:.3f}")
    else:
        print("llama.cpp: not installed (pip install llama-cpp-python in a scratch "
              "environment to compare)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
