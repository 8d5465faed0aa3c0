"""Forward + backward time of every structured product against the dense matmul, and of the FFT
primitive's hand-written VJP against automatic differentiation.

Products: for each family and square size n, the jitted value and gradient of
sum(fam.apply(p, x) * w) with respect to the params and x, x and w (tokens, n) Gaussian, params
random (value_and_grad: with grad alone the forward product is dead code, see product_grad).
The baseline is the dense family (x @ W, gradients for W and x); lowrank r=8 is LoRA's usual
setting. Reported: median wall time of --reps calls after a warm-up call
(block_until_ready), the ratio to dense at the same n, and the growth time(n) / time(n / 2).
All variants at one n take the same x and w and are timed in turns, call by call, so that load
from other processes on the machine shifts their ratios as little as possible.

FFT VJP: ``fft.conv`` (custom_vjp) against ``fft.conv_reference`` differentiated by JAX, same
inputs, warmed up, timed in turns the same way.
Memory from the compiled fwd+bwd program (``memory_analysis()``: temp and peak bytes) and the
residuals ``jax.vjp`` keeps from the forward pass for the backward one, which is what a model
holds per layer between its forward and backward passes.

Limits: when the slowest warm-up call at a size takes longer than --max_call_s / --reps, that
size runs fewer reps (at least one); a program that needs more than --max_gb is skipped, and so
are the larger sizes of a variant whose call took longer than --max_call_s. Skips are printed.

    python scripts/bench_structured.py                          # the default study
    python scripts/bench_structured.py --sizes 256 1024 --families dense circulant --reps 3
    python scripts/bench_structured.py --json out/bench.json    # also write the JSON
    python scripts/bench_structured.py --json                   # print the JSON last
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import jax
import jax.numpy as jnp

from surm import structured
from surm.structured import fft

SIZES = (256, 512, 1024, 2048, 4096, 8192)

#: name -> (family, hyper-parameters at size n)
VARIANTS: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {
    "dense": ("dense", lambda n: {}),
    "lowrank_r8": ("lowrank", lambda n: {"rank": 8}),
    "circulant": ("circulant", lambda n: {}),
    "circulant_hadamard": ("circulant", lambda n: {"form": "hadamard"}),
    "skew_circulant": ("skew_circulant", lambda n: {}),
    "toeplitz": ("toeplitz", lambda n: {}),
    "symmetric_toeplitz": ("symmetric_toeplitz", lambda n: {}),
    "symmetric_toeplitz_product": ("symmetric_toeplitz", lambda n: {"form": "product"}),
    "kronecker": ("kronecker", lambda n: {}),  # the family's default: balanced factors
    "ldr_r1": ("ldr", lambda n: {"rank": 1}),
    "block_circulant_half": ("block_circulant", lambda n: {"block_size": n // 2}),
}


# ---- measuring ----------------------------------------------------------------------------------
def compile_program(fn: Callable, *args) -> Any:
    return jax.jit(fn).lower(*args).compile()


def memory_bytes(compiled: Any) -> dict[str, int | None]:
    """temp / peak / argument / output bytes of a compiled program (None where not reported)."""
    stats = compiled.memory_analysis()
    fields = ("temp_size_in_bytes", "peak_memory_in_bytes", "argument_size_in_bytes",
              "output_size_in_bytes")
    return {f.replace("_size", "").replace("_in_bytes", "_bytes"): getattr(stats, f, None)
            for f in fields} if stats is not None else {}


def footprint(mem: dict[str, int | None]) -> int:
    """Bytes the program needs at once: its peak if reported, else arguments + outputs + temps."""
    if mem.get("peak_memory_bytes"):
        return mem["peak_memory_bytes"]
    return sum(mem.get(k) or 0 for k in ("temp_bytes", "argument_bytes", "output_bytes"))


def call(compiled: Any, args: tuple) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def time_programs(programs: list[tuple[Any, tuple]], reps: int, max_call_s: float) -> list[dict]:
    """Median seconds of each (compiled, args), after one warm-up call each, timed in turns.

    Reps drop (to at least one) so that reps times the slowest warm-up call stays within
    max_call_s."""
    if not programs:
        return []
    warm = [call(c, a) for c, a in programs]
    n = max(1, min(reps, int(max_call_s / max(max(warm), 1e-9))))
    times: list[list[float]] = [[] for _ in programs]
    for _ in range(n):
        for t, (c, a) in zip(times, programs):
            t.append(call(c, a))
    return [{"median_s": statistics.median(t), "reps": n, "warmup_s": w, "min_s": min(t)}
            for t, w in zip(times, warm)]


def activations(n: int, tokens: int) -> tuple[jax.Array, jax.Array]:
    """x and the output weights w, (tokens, n) Gaussian: the same for every variant at n."""
    kx, kw = jax.random.split(jax.random.PRNGKey(n))
    return jax.random.normal(kx, (tokens, n)), jax.random.normal(kw, (tokens, n))


def random_params(name: str, n: int) -> structured.Params:
    family, hp = VARIANTS[name]
    return structured.get(family).init(jax.random.PRNGKey(0), n, n, init="random",
                                       std=1.0 / n ** 0.5, **hp(n))


def product_grad(name: str) -> Callable:
    """Loss and gradients. The loss must be returned: it is linear in the product, so its
    gradient does not need the product, and for jax.grad alone XLA drops the forward pass."""
    fam = structured.get(VARIANTS[name][0])
    return jax.value_and_grad(lambda p, x, w: jnp.sum(fam.apply(p, x) * w), argnums=(0, 1))


def conv_grad(conv: Callable, n: int) -> Callable:
    return jax.value_and_grad(lambda x, k, w: jnp.sum(conv(x, k, n) * w), argnums=(0, 1))


def residual_bytes(conv: Callable, x: jax.Array, k: jax.Array, n: int) -> int:
    """Bytes jax.vjp keeps from the forward pass of conv for its backward pass."""
    vjp_fn = jax.eval_shape(lambda x, k: jax.vjp(lambda x, k: conv(x, k, n), x, k)[1], x, k)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp_fn))


# ---- the two studies ----------------------------------------------------------------------------
class Skipper:
    """Remembers, per series, that a size was too slow or too big, and skips the sizes after."""

    def __init__(self, max_call_s: float, max_bytes: float):
        self.max_call_s, self.max_bytes, self.stopped, self.notes = max_call_s, max_bytes, {}, []

    def skip(self, series: str, n: int) -> bool:
        if series in self.stopped:
            self.notes.append(f"{series} n={n}: skipped ({self.stopped[series]})")
            return True
        return False

    def too_big(self, series: str, n: int, nbytes: int) -> bool:
        if nbytes > self.max_bytes:
            self.stopped[series] = f"n={n} needs {nbytes / 2**30:.1f} GiB"
            self.notes.append(f"{series} n={n}: skipped, needs {nbytes / 2**30:.1f} GiB")
            return True
        return False

    def check_time(self, series: str, n: int, seconds: float) -> None:
        if seconds > self.max_call_s:
            self.stopped[series] = f"n={n} took {seconds:.1f} s a call"


def bench_products(names: list[str], sizes: list[int], args, skipper: Skipper) -> list[dict]:
    """All variants at one n share x and w and are timed in turns, so that background load
    shifts their ratios to dense as little as possible."""
    rows = []
    for n in sizes:
        x, w = activations(n, args.tokens)
        programs, mems = {}, {}
        for name in names:
            if skipper.skip(name, n):
                continue
            inputs = (random_params(name, n), x, w)
            compiled = compile_program(product_grad(name), *inputs)
            mems[name] = memory_bytes(compiled)
            if not skipper.too_big(name, n, footprint(mems[name])):
                programs[name] = (compiled, inputs)
        timings = time_programs(list(programs.values()), args.reps, args.max_call_s)
        for name, timing in zip(programs, timings):
            skipper.check_time(name, n, timing["warmup_s"])
            family, hp = VARIANTS[name]
            rows.append({"name": name, "family": family, "hparams": hp(n), "n": n,
                         "params": structured.get(family).num_params(n, n, **hp(n)),
                         **timing, **mems[name]})
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_dense at the same n and growth = time(n) / time(n / 2) of the same variant."""
    by_key = {(r["name"], r["n"]): r["median_s"] for r in rows}
    for r in rows:
        dense, half = by_key.get(("dense", r["n"])), by_key.get((r["name"], r["n"] // 2))
        r["ratio_to_dense"] = r["median_s"] / dense if dense else None
        r["growth"] = r["median_s"] / half if half else None


def bench_fft_vjp(sizes: list[int], args, skipper: Skipper) -> list[dict]:
    """conv's custom VJP against autodiff of conv_reference: time, compiled memory, and the
    residuals for float32 and for bfloat16 x (the custom VJP keeps x in its own dtype, autodiff
    keeps the float32 spectra)."""
    convs = {"custom_vjp": fft.conv, "autodiff": fft.conv_reference}
    rows = []
    for n in sizes:
        if skipper.skip("fft_vjp", n):
            continue
        x, w = activations(n, args.tokens)
        inputs = (x, jax.random.normal(jax.random.PRNGKey(-n), (n,)), w)
        compiled = {k: compile_program(conv_grad(c, n), *inputs) for k, c in convs.items()}
        mems = {k: memory_bytes(c) for k, c in compiled.items()}
        if skipper.too_big("fft_vjp", n, max(footprint(m) for m in mems.values())):
            continue
        timings = time_programs([(c, inputs) for c in compiled.values()], args.reps,
                                args.max_call_s)
        skipper.check_time("fft_vjp", n, max(t["warmup_s"] for t in timings))
        row = {"n": n}
        for (k, conv), timing in zip(convs.items(), timings):
            row[k] = {**timing, **mems[k],
                      "residual_bytes": residual_bytes(conv, x, inputs[1], n),
                      "residual_bytes_bf16": residual_bytes(conv, x.astype(jnp.bfloat16),
                                                            inputs[1], n)}
        rows.append(row)
    return rows


# ---- printing -----------------------------------------------------------------------------------
def fmt(value: float | None, spec: str) -> str:
    """format(value, spec), or a dash as wide as the spec says for a missing value."""
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))


def product_table(rows: list[dict]) -> str:
    lines = [f"{'variant':28s} {'n':>5s} {'params':>9s} {'time ms':>9s} {'vs dense':>8s} "
             f"{'growth':>6s} {'reps':>4s}"]
    for r in sorted(rows, key=lambda r: (list(VARIANTS).index(r["name"]), r["n"])):
        lines.append(f"{r['name']:28s} {r['n']:5d} {r['params']:9d} "
                     f"{r['median_s'] * 1e3:9.2f} {fmt(r['ratio_to_dense'], '8.3f')} "
                     f"{fmt(r['growth'], '6.2f')} {r['reps']:4d}")
    return "\n".join(lines)


def mib(nbytes: int | None) -> str:
    return fmt(None if nbytes is None else nbytes / 2**20, "8.1f")


def vjp_table(rows: list[dict]) -> str:
    lines = ["time ms and MiB; ratios custom_vjp / autodiff (< 1: the hand-written VJP wins); "
             "resid: what jax.vjp keeps for the backward pass",
             f"{'n':>5s} {'custom ms':>9s} {'auto ms':>9s} {'ratio':>6s} | {'temp c':>8s} "
             f"{'temp a':>8s} {'peak c':>8s} {'peak a':>8s} {'ratio':>6s} | {'resid c':>8s} "
             f"{'resid a':>8s} {'ratio':>6s} | {'bf16 ratio':>10s}"]
    for r in rows:
        c, a = r["custom_vjp"], r["autodiff"]
        peak = (c.get("peak_memory_bytes"), a.get("peak_memory_bytes"))
        lines.append(
            f"{r['n']:5d} {c['median_s'] * 1e3:9.2f} {a['median_s'] * 1e3:9.2f} "
            f"{c['median_s'] / a['median_s']:6.3f} | {mib(c.get('temp_bytes'))} "
            f"{mib(a.get('temp_bytes'))} {mib(peak[0])} {mib(peak[1])} "
            f"{fmt(peak[0] / peak[1] if all(peak) else None, '6.3f')} | "
            f"{mib(c['residual_bytes'])} {mib(a['residual_bytes'])} "
            f"{c['residual_bytes'] / a['residual_bytes']:6.3f} | "
            f"{c['residual_bytes_bf16'] / a['residual_bytes_bf16']:10.3f}")
    return "\n".join(lines)


# ---- driver -------------------------------------------------------------------------------------
def host_info() -> dict:
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
            "loadavg_start": os.getloadavg()}


def run(args: argparse.Namespace) -> dict:
    host = host_info()
    skipper = Skipper(args.max_call_s, args.max_gb * 2**30)
    products = bench_products(args.families, args.sizes, args, skipper)
    vjp = bench_fft_vjp(args.sizes, args, skipper) if args.vjp else []
    host["loadavg_end"] = os.getloadavg()
    print(f"forward+backward: loss sum(apply(p, x) * w) and its grads for params and x; "
          f"tokens = {args.tokens}; median of up to {args.reps} reps after a warm-up\n")
    print(product_table(products))
    if vjp:
        print("\nFFT primitive: fft.conv (custom_vjp) vs fft.conv_reference (autodiff), "
              "fwd+bwd for x and k\n")
        print(vjp_table(vjp))
    for note in skipper.notes:
        print(f"note: {note}")
    start, end = (" ".join(f"{v:.2f}" for v in host[k]) for k in ("loadavg_start", "loadavg_end"))
    print(f"load average (1, 5, 15 min) on {host['cpu_count']} CPUs: {start} at start, {end} at "
          f"end (other processes slow every timing; the ratios are timed in turns)")
    return {"config": {k: v for k, v in vars(args).items() if k != "json"}, "host": host,
            "products": products, "fft_vjp": vjp, "notes": skipper.notes}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time forward+backward of each structured product against dense, and the "
                    "FFT primitive's custom VJP against autodiff.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="product variants to time (dense is the baseline of the ratios)")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES),
                        help="square sizes n (block_circulant_half needs n even, kronecker "
                             "n not prime)")
    parser.add_argument("--tokens", type=int, default=197 * 16,
                        help="rows of x: tokens per batch (ViT-B/16: 197 tokens x 16 images)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--max_call_s", type=float, default=20.0,
                        help="seconds per size: reps drop so that reps x the slowest call fit, "
                             "and a variant with a call this slow skips the larger sizes")
    parser.add_argument("--max_gb", type=float, default=8.0,
                        help="skip sizes whose compiled program needs more memory (GiB)")
    parser.add_argument("--vjp", action=argparse.BooleanOptionalAction, default=True,
                        help="compare fft.conv's custom VJP with autodiff of conv_reference")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the results as JSON to PATH; without PATH print it last")
    args = parser.parse_args(argv)
    if min(args.sizes) < 2 or args.tokens < 1 or args.reps < 1:
        parser.error("--sizes must be >= 2, --tokens and --reps >= 1")
    unusable = [f"{name} at n={n}" for name in args.families for n in args.sizes
                if not applies(name, n)]
    if unusable:
        parser.error(f"these variants do not apply to these sizes: {', '.join(unusable)}")
    return args


def applies(name: str, n: int) -> bool:
    family, hp = VARIANTS[name]
    try:
        structured.get(family).num_params(n, n, **hp(n))
    except ValueError:
        return False
    return True


def main() -> None:
    args = parse_args()
    results = run(args)
    if args.json == "-":
        print(json.dumps(results))
    elif args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
