"""Checks surm.interop.c3a against Hugging Face PEFT's own C3A, both ways, on a real BERT.

    python scripts/check_c3a.py [--base FOLDER] [--tolerance 1e-4]

torch, transformers and peft are not project dependencies: install them in a scratch
environment that also sees the project's packages, e.g.

    python -m venv --system-site-packages /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch transformers peft
    /tmp/hfvenv/bin/python scripts/check_c3a.py

The base (default: the offline all-MiniLM-L6-v2, read with pooling='pooler' and a 3-way head)
is written once by ``surm.models.bert.save`` as a transformers
``BertForSequenceClassification`` folder, so that both libraries start from the same weights.
Then, on the same token ids:

* surm -> PEFT: random non-zero adapters (block_circulant on every linear layer, circulant on
  the attention projections, with scale != 1) and a random head are written by
  ``surm.interop.c3a.to_c3a`` (float64 and float32 kernels), loaded with
  ``PeftModel.from_pretrained`` and run unmerged and merged (``merge_and_unload``);
* PEFT -> surm: ``get_peft_model`` with a ``C3AConfig`` (random kernels, a random head), saved
  with ``save_pretrained``, read by ``surm.interop.c3a.from_c3a`` and run with ``peft.apply``.

Prints the largest absolute logits difference of each case next to how far the adapters move
the logits; exits 1 when a difference is above --tolerance, 2 when torch, transformers or peft
is missing.
"""
from __future__ import annotations

import argparse
import atexit
import pathlib
import shutil
import sys
import tempfile

INSTALL = ("this check needs torch, transformers and peft, which are not project dependencies: "
           "python -m venv --system-site-packages /tmp/hfvenv && /tmp/hfvenv/bin/pip install "
           "torch transformers peft, then run it with /tmp/hfvenv/bin/python")

TEXTS = ["The match ended in a draw after extra time.",
         "Shares fell sharply when the quarterly results came out.",
         "A new phone with a foldable screen goes on sale next week.",
         "ok"]
NUM_LABELS = 3


def randomized(trainable, seed, std):
    import jax
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape)
                                        for k, x in zip(keys, leaves)])


def torch_logits(model, ids, mask, types):
    import torch
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask,
                            token_type_ids=types).logits.numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=pathlib.Path,
                        help="a Hugging Face BERT folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    try:
        import peft as hf_peft
        import torch
        import transformers
    except ImportError:
        print(INSTALL, file=sys.stderr)
        return 2
    import jax
    import numpy as np

    from surm import peft
    from surm.models import bert, bert_io
    from surm.interop import c3a

    source = args.base or bert_io.minilm_l6_path()
    config, base = bert_io.load(source, num_labels=NUM_LABELS, pooling="pooler")
    model = bert.BERT(config)
    work = pathlib.Path(tempfile.mkdtemp(prefix="surm-c3a-check-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # model and adapter copies
    bert_io.save(work / "base", config, base, source=source)
    tokenizer = bert_io.load_tokenizer(work / "base", 32)
    encodings = tokenizer.encode_batch(TEXTS)
    ids, mask, types = (np.asarray([getattr(e, key) for e in encodings], np.int64)
                        for key in ("ids", "attention_mask", "type_ids"))
    inputs = [torch.from_numpy(x) for x in (ids, mask, types)]

    def hf_model():
        return transformers.AutoModelForSequenceClassification.from_pretrained(work / "base")

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft "
          f"{hf_peft.__version__}; base {source} (hidden {config.hidden_size}, "
          f"{config.num_layers} layers), {len(TEXTS)} texts")
    worst = 0.0

    def report(name, got, want, trainable, spec):
        """`trainable` and `spec` (surm's side) give the adapters' own effect on the logits:
        the same head without them."""
        nonlocal worst
        diff = float(np.max(np.abs(got - want)))
        off = {**trainable, "adapters": jax.tree.map(np.zeros_like, trainable["adapters"])}
        _, frozen = peft.split(base, spec)
        moved = float(np.max(np.abs(
            want - np.asarray(peft.apply(model, frozen, off, spec, ids, mask, types)))))
        print(f"{name}: max |logits diff| = {diff:.3g} (the adapters move the logits by up to "
              f"{moved:.3g}; same predictions: {bool(np.all(got.argmax(1) == want.argmax(1)))})")
        worst = max(worst, diff)

    # surm -> PEFT
    cases = [("block_circulant b=64, all-linear, scale 0.5",
              peft.PeftSpec.create(structure="block_circulant", hparams={"block_size": 64},
                                   targets="all-linear", scale=0.5)),
             ("circulant, qkvo, scale 2",
              peft.PeftSpec.create(structure="circulant", targets="qkvo", scale=2.0))]
    for i, (name, spec) in enumerate(cases):
        trainable, frozen = peft.init(base, spec, jax.random.PRNGKey(i))
        trainable = {"adapters": randomized(trainable["adapters"], i, 0.02),
                     "base": randomized(trainable["base"], 100 + i, 0.5)}
        want = np.asarray(peft.apply(model, frozen, trainable, spec, ids, mask, types))
        for dtype in ("float64", "float32"):
            folder = work / f"to_c3a_{i}_{dtype}"
            c3a.to_c3a(trainable, spec, folder, dtype=dtype)
            loaded = hf_peft.PeftModel.from_pretrained(hf_model(), folder)
            report(f"surm -> PEFT [{name}, {dtype} kernels], unmerged",
                   torch_logits(loaded, *inputs), want, trainable, spec)
        report(f"surm -> PEFT [{name}, float32 kernels], merged",
               torch_logits(loaded.merge_and_unload(), *inputs), want, trainable, spec)

    # PEFT -> surm
    cases = [("C3A block_size 64 on query/key/value/dense (pooler included)", "block_circulant",
              hf_peft.C3AConfig(task_type="SEQ_CLS", block_size=64, init_weights="gaussian",
                                target_modules=["query", "key", "value", "dense"])),
             ("C3A block_size 384 on query/value", "circulant",
              hf_peft.C3AConfig(task_type="SEQ_CLS", block_size=config.hidden_size,
                                init_weights="gaussian", target_modules=["query", "value"]))]
    for i, (name, family, c3a_config) in enumerate(cases):
        torch.manual_seed(i)
        made = hf_peft.get_peft_model(hf_model(), c3a_config)
        with torch.no_grad():
            for key, p in made.named_parameters():
                if "modules_to_save" in key:  # the kernels are N(0, 1) already
                    p.normal_(0.0, 0.5)
        want = torch_logits(made, *inputs)
        folder = work / f"from_c3a_{i}"
        made.save_pretrained(folder)
        trainable, spec = c3a.from_c3a(folder, base, structure=family)
        _, frozen = peft.split(base, spec)
        got = np.asarray(peft.apply(model, frozen, trainable, spec, ids, mask, types))
        report(f"PEFT -> surm [{name}, as {spec.structure} {dict(spec.hparams)}, "
               f"{len(spec.targets)} modules]", got, want, trainable, spec)
    print(f"worst {worst:.3g} (tolerance {args.tolerance}); files in {work}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
