"""How to compute a lora-mode update in training, by width: the three paths against each other.

    python scripts/bench_lora_path.py                              # widths 256 .. 4096
    python scripts/bench_lora_path.py --widths 768,4096 --tokens 8192 --families circulant

One adapted linear layer ``y = x (W + scale S)`` inside a network: the loss ``sum(g y^2) / 2``
(its value and gradient need the forward output, as a real network's do), and its gradient to the
adapter's parameters and to ``x`` (the layer's input: a layer mid-network passes its gradient
on), through ``surm.peft.apply`` exactly as the trainer calls it, once per ``lora_path``:

- ``structured``: ``x W + S(x)``, the family's fast product (FFTs) forward and backward;
- ``dense``: ``to_dense(S)`` folded into the kernel inside the step, its gradient through the
  kernel's (one more matmul, ``2 d_in d_out`` flops per row of x);
- ``mixed``: folded for the forward pass and the input gradient, the adapter's gradient through
  the family's product (the FFTs of x and of the output gradient).

``frozen`` is the same layer with no adapter: the floor every path pays. Each width's figures
are medians of interleaved timed calls in one process. From each width's extra time over
``frozen`` the script infers ``rate``, how many times faster per flop the backend runs the
folded path's matmul than the family's product (XLA's flop count of ``S(x)`` per row, which the
mixed path spends once): the quantity ``surm.peft.MATMUL_OVER_FFT_RATE`` holds for
``lora_path="auto"``. ``--json`` prints one JSON object last, with the widest width at which
dense beats mixed for each family (``dense_max_width``) and the median inferred rate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from surm import peft
from surm.timing import interleaved_medians

PATHS = ("structured", "dense", "mixed")


class Layer(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.width, use_bias=False, name="proj")(x)


def time_width(family: str, width: int, tokens: int, warmup: int, steps: int) -> dict:
    model = Layer(width)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((tokens, width)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((tokens, width)), jnp.float32)
    params = {"proj": {"kernel": jnp.asarray(rng.standard_normal((width, width)) / width ** 0.5,
                                             jnp.float32)}}
    spec = peft.PeftSpec.create(structure=family, targets="proj", init="random")
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(0))

    # Everything is an argument: closed-over arrays would be constants that XLA may fold.
    def step_for(path):
        def loss(tr, x, frozen, g):
            out = peft.apply(model, frozen, tr, spec, x, train=True, lora_path=path)
            return 0.5 * jnp.sum(g * out * out)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    def frozen_step(x, params, g):
        return jax.value_and_grad(
            lambda x: 0.5 * jnp.sum(g * model.apply({"params": params}, x) ** 2))(x)

    args = (trainable, x, frozen, g)
    compiled = {p: step_for(p).lower(*args).compile() for p in PATHS}
    compiled_frozen = jax.jit(frozen_step).lower(x, params, g).compile()
    reference = compiled["structured"](*args)
    for path in PATHS[1:]:  # the paths agree
        for u, v in zip(jax.tree.leaves(reference), jax.tree.leaves(compiled[path](*args))):
            err = float(jnp.abs(u - v).max() / (jnp.abs(u).max() + 1e-12))
            if err > 1e-3:
                raise AssertionError(f"{family} at width {width}: {path} differs from "
                                     f"structured by {err:.2e}")
    calls = {p: (lambda c=c: jax.block_until_ready(c(*args))) for p, c in compiled.items()}
    calls["frozen"] = lambda: jax.block_until_ready(compiled_frozen(x, params, g))
    t = interleaved_medians(calls, warmup, steps)
    S = trainable["adapters"]["proj"]["S"]
    matmul, product = 2 * width * width, peft.flops_per_row(S)
    extra = {p: t[p] - t["frozen"] for p in PATHS}
    rate = (extra["mixed"] * matmul / (extra["dense"] * product)
            if extra["dense"] > 0 and extra["mixed"] > 0 else None)
    return {"width": width, **{f"{k}_ms": 1e3 * v for k, v in t.items()},
            "best": min(PATHS, key=t.get), "rate": rate,
            "dense_over_structured": t["dense"] / t["structured"],
            "mixed_over_structured": t["mixed"] / t["structured"],
            "dense_over_mixed": t["dense"] / t["mixed"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--families", default="circulant,toeplitz")
    p.add_argument("--widths", default="256,384,512,768,1024,2048,4096")
    p.add_argument("--tokens", type=int, default=1024, help="rows of x (batch x sequence)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    args = p.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    print(f"devices: {jax.devices()}; {args.tokens} tokens; median of {args.steps} steps",
          flush=True)
    out = {"command": " ".join(["python scripts/bench_lora_path.py", *(argv or sys.argv[1:])]),
           "backend": jax.default_backend(), "tokens": args.tokens, "families": {}}
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        rows = []
        for width in widths:
            r = time_width(family, width, args.tokens, args.warmup, args.steps)
            rows.append(r)
            rate = f"{r['rate']:.2f}" if r["rate"] else "-"
            print(f"  {family:14s} {width:6d}  frozen {r['frozen_ms']:8.2f}  structured "
                  f"{r['structured_ms']:8.2f}  dense {r['dense_ms']:8.2f}  mixed "
                  f"{r['mixed_ms']:8.2f} ms  best {r['best']:10s}  rate {rate}", flush=True)
        wins = [r["width"] for r in rows if r["dense_ms"] < r["mixed_ms"]]
        rates = [r["rate"] for r in rows if r["rate"]]
        out["families"][family] = {"rows": rows, "dense_max_width": max(wins) if wins else 0,
                                   "rate": statistics.median(rates) if rates else None}
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
