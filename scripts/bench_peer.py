"""surm's train step against PyTorch + Hugging Face PEFT on the same model, batch and machine.

    python scripts/bench_peer.py                  # MiniLM-L6, batch 32 x 64 tokens
    python scripts/bench_peer.py --steps 10 --methods lora_r8,full

torch, transformers and peft are not project dependencies. Install them (the CPU wheel of
torch) in a scratch environment that also sees the project's packages, and run the script with
that environment's Python:

    python -m venv --system-site-packages /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch transformers peft
    /tmp/hfvenv/bin/python scripts/bench_peer.py

(where PyPI's torch wheel pulls in CUDA libraries, the CPU build is ``pip install torch
--index-url https://download.pytorch.org/whl/cpu``). The committed figures: torch 2.13.0+cpu,
transformers 5.24.0, peft 0.21.2.

Both sides start from the same weights (the offline all-MiniLM-L6-v2 with a pooler and a
``--labels``-way head, written once by ``surm.models.bert.save`` as a transformers
``BertForSequenceClassification`` folder) and take the same random token batch, with dropout
on (training mode) and the same optimizer: AdamW, weight decay 0.01, gradients clipped to
global norm 1. The methods, q and v adapted unless said:

- ``lora_r8``: LoRA rank 8 (PEFT ``LoraConfig(r=8)``; surm ``lowrank`` rank 8);
- ``c3a_384``: one circulant per matrix (PEFT ``C3AConfig(block_size=384)``; surm
  ``circulant``, the same operator on MiniLM's width 384);
- ``c3a_64``: block-circulant with blocks of 64 (PEFT ``C3AConfig(block_size=64)``; surm
  ``block_circulant`` block 64);
- ``probe``: only the classifier trains (PEFT's ``modules_to_save`` head; the encoder frozen);
- ``full``: every weight trains.

The head (``classifier``) trains in every method, as PEFT's sequence-classification task does.
Each side's step is one call that returns when its update is done (surm: the trainer's jitted
step, ``surm.train.make_step_fns``; PyTorch: forward, backward, clip, ``optimizer.step()``).
Times are medians of ``--steps`` steps after ``--warmup``, the two libraries' steps
interleaved in rounds (``surm.timing``) so that the drift of a shared machine hits both alike.
Printed last: one JSON object with ``surm_over_peft_time`` per method (below 1: surm faster),
the step times, and the inference (eval forward) figures under ``inference``.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import pathlib
import shutil
import sys
import tempfile
import time

INSTALL = ("bench_peer needs torch, transformers and peft, which are not project dependencies: "
           "python -m venv --system-site-packages /tmp/hfvenv && /tmp/hfvenv/bin/pip install "
           "torch transformers peft (torch's CPU build: --index-url "
           "https://download.pytorch.org/whl/cpu), then run /tmp/hfvenv/bin/python "
           "scripts/bench_peer.py")
METHODS = ("lora_r8", "c3a_384", "c3a_64", "probe", "full")
OPTIMIZER = dict(name="adamw", lr=1e-4, head_lr=1e-4, weight_decay=0.01, b1=0.9, b2=0.999,
                 grad_clip=1.0, schedule="constant", warmup_frac=0.0)


def surm_spec(method: str):
    from surm import peft
    return {"lora_r8": lambda: peft.PeftSpec.create(structure="lowrank", targets="qv",
                                                    hparams={"rank": 8}),
            "c3a_384": lambda: peft.PeftSpec.create(structure="circulant", targets="qv"),
            "c3a_64": lambda: peft.PeftSpec.create(structure="block_circulant", targets="qv",
                                                   hparams={"block_size": 64}),
            "probe": lambda: peft.PeftSpec.create(method="probe"),
            "full": lambda: peft.PeftSpec.create(method="full")}[method]()


def peft_model(method: str, folder: pathlib.Path):
    """The PyTorch model of ``method`` (trainable parameters marked), in training mode."""
    import peft as hf_peft
    import transformers
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    targets = ["query", "value"]
    if method == "lora_r8":
        config = hf_peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                    task_type="SEQ_CLS")
    elif method.startswith("c3a_"):
        config = hf_peft.C3AConfig(block_size=int(method.split("_")[1]), target_modules=targets,
                                   task_type="SEQ_CLS")
    elif method == "probe":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
        return model.train()
    elif method == "full":
        return model.train()
    else:
        raise ValueError(method)
    return hf_peft.get_peft_model(model, config).train()


class TorchStep:
    """One PyTorch training step of a model: forward, loss, backward, clip, AdamW."""

    def __init__(self, model, batch):
        import torch
        self.torch, self.model, self.batch = torch, model, batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for n, p in model.named_parameters()
                 if p.requires_grad and not (n.endswith("bias") or "LayerNorm" in n)]
        rest = [p for n, p in model.named_parameters()
                if p.requires_grad and (n.endswith("bias") or "LayerNorm" in n)]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": OPTIMIZER["weight_decay"]},
             {"params": rest, "weight_decay": 0.0}], lr=OPTIMIZER["lr"],
            betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]))

    def __call__(self):
        torch, b = self.torch, self.batch
        out = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         token_type_ids=b["token_type_ids"])
        loss = torch.nn.functional.cross_entropy(out.logits, b["label"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, OPTIMIZER["grad_clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--methods", default=",".join(METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=30, help="timed steps per side (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--labels", type=int, default=3)
    p.add_argument("--no_inference", action="store_true", help="skip the eval-forward timing")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        p.error(f"unknown method(s) {unknown or '(none)'}; choose from {', '.join(METHODS)}")
    from surm import allocator
    tuned = allocator.configure()  # both libraries, one process: the same allocator
    try:
        import peft as hf_peft
        import torch
        import transformers
    except ImportError:
        print(INSTALL, file=sys.stderr)
        return 2
    import jax
    import numpy as np

    from surm import models
    from surm.models import bert, bert_io
    from surm.timing import TrainStep, interleaved_medians

    source = bert_io.minilm_l6_path()
    config, params = bert_io.load(source, num_labels=args.labels, pooling="pooler")
    # A random head (a fresh one is zero), so that the inference check compares real logits.
    head = params["classifier"]["kernel"]
    params["classifier"]["kernel"] = 0.05 * np.random.default_rng(1).standard_normal(
        head.shape).astype(np.float32)
    model = bert.BERT(config)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="surm-bench-peer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the 90 MB model copy
    bert_io.save(folder, config, params, source=source)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(args.batch, args.seq_len))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "token_type_ids": np.zeros_like(ids),
             "label": rng.integers(0, args.labels, size=args.batch)}
    jax_batch = jax.device_put({k: v.astype(np.int32) for k, v in batch.items()})
    torch_batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
    model_inputs = models.get("bert").inputs
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, peft {hf_peft.__version__}; jax {jax.__version__} "
          f"{jax.devices()}; MiniLM-L6, batch {args.batch} x {args.seq_len} tokens; median of "
          f"{args.steps} steps after {args.warmup} warm-up, interleaved; glibc malloc "
          f"{'tuned by surm.allocator' if tuned else 'as the system set it'}", flush=True)

    calls, counts = {}, {}
    for method in methods:
        t = time.perf_counter()
        surm_step = TrainStep(model, params, surm_spec(method), jax_batch, model_inputs,
                              OPTIMIZER)
        compile_s = time.perf_counter() - t
        torch_model = peft_model(method, folder)
        calls[("surm", method)] = surm_step
        calls[("peft", method)] = TorchStep(torch_model, torch_batch)
        counts[method] = sum(p.numel() for p in torch_model.parameters() if p.requires_grad)
        print(f"  {method}: surm compiled in {compile_s:.1f} s; PyTorch trains "
              f"{counts[method]:,} parameters", flush=True)
    seconds = interleaved_medians(calls, args.warmup, args.steps)
    result = {"surm_over_peft_time": {}, "surm_ms": {}, "peft_ms": {}}
    for method in methods:
        s, q = seconds[("surm", method)], seconds[("peft", method)]
        result["surm_over_peft_time"][method] = s / q
        result["surm_ms"][method], result["peft_ms"][method] = 1e3 * s, 1e3 * q
        print(f"  {method:8s} surm {1e3 * s:8.1f} ms   PyTorch+PEFT {1e3 * q:8.1f} ms   "
              f"surm / PEFT {s / q:.3f}", flush=True)
    del calls

    if not args.no_inference:  # eval forward: jit vs torch.inference_mode, float32 and bf16
        inputs = {k: v for k, v in jax_batch.items() if k != "label"}
        torch_inputs = {k: v for k, v in torch_batch.items() if k != "label"}
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
        calls, logits = {}, {}
        for dtype in ("float32", "bfloat16"):
            m = bert.BERT(dataclasses.replace(config, dtype=dtype))
            f = jax.jit(lambda p, x, m=m: m.apply({"params": p}, *model_inputs(x))).lower(
                params, inputs).compile()

            def torch_forward(bf16=dtype == "bfloat16"):
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16,
                                                            enabled=bf16):
                    return hf(**torch_inputs).logits.float()

            calls[("surm", dtype)] = lambda f=f: jax.block_until_ready(f(params, inputs))
            calls[("torch", dtype)] = torch_forward
            logits[dtype] = (np.asarray(f(params, inputs)), torch_forward().numpy())
        t = interleaved_medians(calls, args.warmup, args.steps)
        result["inference"] = {}
        for dtype, (ours, theirs) in logits.items():
            s, q = t[("surm", dtype)], t[("torch", dtype)]
            diff = float(np.max(np.abs(ours - theirs)))
            result["inference"][dtype] = {"surm_ms": 1e3 * s, "torch_ms": 1e3 * q,
                                          "surm_over_torch_time": s / q,
                                          "max_abs_logits_diff": diff}
            print(f"  inference {dtype:8s} surm {1e3 * s:7.1f} ms   PyTorch inference_mode "
                  f"{1e3 * q:7.1f} ms   surm / PyTorch {s / q:.3f}   (logits differ by up to "
                  f"{diff:.2g})", flush=True)
    result.update(command=" ".join(["python scripts/bench_peer.py", *(argv or sys.argv[1:])]),
                  batch=args.batch, seq_len=args.seq_len, trainable_peft=counts,
                  malloc_tuned=tuned,
                  versions={"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": hf_peft.__version__, "jax": jax.__version__})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
