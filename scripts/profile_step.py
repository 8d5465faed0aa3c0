"""Where the time of one surm train step goes, per XLA operation, grouped by what it computes.

    python scripts/profile_step.py                          # MiniLM-L6 full fine-tuning
    python scripts/profile_step.py --family circulant --top 20
    python scripts/profile_step.py --hlo /tmp/step.hlo.txt  # ... and keep the compiled HLO

Compiles the trainer's step (``surm.train.make_step_fns``) for MiniLM-L6 on a random batch
(``--batch`` x ``--seq_len`` tokens), runs ``--steps`` of it under ``jax.profiler.trace``,
reads the Perfetto trace the profiler writes, and maps each executed XLA operation back to the
JAX code it came from (the ``op_name`` metadata of the compiled HLO). Prints the time per
step of each group (matmuls, attention, GELU, LayerNorm, dropout, embeddings, the optimizer
update, ...; forward and backward apart), then the ``--top`` single operations, and the
page faults and system time per step (a step that maps fresh memory pays the kernel for it:
see ``surm/allocator.py``). Per-op times on a 2-core machine overlap a little (XLA runs
independent operations concurrently), so the groups can add up to slightly more than the
step's wall time.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import glob
import gzip
import json
import re
import resource
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

from surm import allocator, models, peft
from surm.models import bert, bert_io
from surm.timing import TrainStep

OPTIMIZER = dict(name="adamw", lr=1e-4, head_lr=1e-4, weight_decay=0.01, b1=0.9, b2=0.999,
                 grad_clip=1.0, schedule="constant", warmup_frac=0.0)
# (group, pattern in the op_name), the first match wins; matmuls are told by the op itself.
GROUPS = (("dropout", r"Dropout|dropout|_hash|keep_mask"),
          ("attention", r"attention/self"),
          ("gelu", r"intermediate"),
          ("layernorm", r"LayerNorm"),
          ("embeddings", r"embeddings"),
          ("head and pooler", r"classifier|pooler"),
          ("loss", r"log_softmax|softmax_cross_entropy"))


def group_of(op: str, op_name: str) -> str:
    if op.startswith(("ynn_fusion", "dot", "custom-call")):
        kind = "matmul"
    elif "jvp(" not in op_name and op_name:
        kind = "optimizer and step"  # outside the model's forward and backward
    else:
        kind = next((g for g, pat in GROUPS if re.search(pat, op_name)), "other")
    if op_name and "transpose(jvp(" in op_name:
        return f"{kind} (backward)"
    return kind


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--family", default="full",
                   help="a peft family (full, linear_probe, bitfit, circulant, lowrank, ...)")
    p.add_argument("--rank", type=int, default=8, help="rank of lowrank")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--top", type=int, default=12, help="single operations to list")
    p.add_argument("--hlo", help="write the compiled HLO text here")
    args = p.parse_args(argv)
    allocator.configure()
    hparams = {"rank": args.rank} if args.family == "lowrank" else {}
    method, structure = peft.spec.from_family(args.family)
    spec = peft.PeftSpec.create(method=method, structure=structure, hparams=hparams,
                                **({"targets": "qv"} if structure else {}))
    config, params = bert_io.load(bert_io.minilm_l6_path(), num_labels=3, pooling="pooler")
    model = bert.BERT(config)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(args.batch, args.seq_len)).astype(np.int32)
    batch = jax.device_put({"input_ids": ids, "attention_mask": np.ones_like(ids),
                            "token_type_ids": np.zeros_like(ids),
                            "label": rng.integers(0, 3, args.batch).astype(np.int32)})
    step = TrainStep(model, params, spec, batch, models.get("bert").inputs, OPTIMIZER)
    hlo = step.compiled.as_text()
    if args.hlo:
        open(args.hlo, "w").write(hlo)
    op_names = dict(re.findall(r"\n\s*%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo))
    for _ in range(3):
        step()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = (time.perf_counter() - wall) / args.steps
    after = resource.getrusage(resource.RUSAGE_SELF)
    trace_dir = tempfile.mkdtemp(prefix="surm-profile-")
    atexit.register(shutil.rmtree, trace_dir, ignore_errors=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            step()
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    groups, ops = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name not in op_names and not re.match(
                r"(ynn_fusion|dot|wrapped_|copy|custom-call)", name):
            continue
        groups[group_of(name, op_names.get(name, ""))] += e["dur"]
        ops[name] += e["dur"]
    per_step = lambda us: us / args.steps / 1e3  # noqa: E731
    print(f"MiniLM-L6, {args.family}, batch {args.batch} x {args.seq_len}: {1e3 * wall:.1f} ms "
          f"per step unprofiled; {(after.ru_minflt - usage.ru_minflt) / args.steps:,.0f} page "
          f"faults and {(after.ru_stime - usage.ru_stime) / args.steps * 1e3:.0f} ms of system "
          f"time per step")
    print(f"{'group':28s} {'ms/step':>8s}")
    for g, us in groups.most_common():
        print(f"{g:28s} {per_step(us):8.1f}")
    print(f"{'(sum)':28s} {per_step(sum(groups.values())):8.1f}")
    print(f"\ntop {args.top} operations")
    for name, us in ops.most_common(args.top):
        print(f"{per_step(us):8.1f} ms  {name:28s} {op_names.get(name, '')[-90:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
