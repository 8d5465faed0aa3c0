"""Runs a BERT run's export in transformers (and sentence-transformers, when installed) and
compares the logits with the run's own: the export must compute what the run computed.

    python scripts/check_hf_export.py --workdir runs/default [--out /tmp/exported]

torch and transformers are not project dependencies: install them in a scratch environment that
also sees the project's packages, e.g.

    python -m venv --system-site-packages /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch transformers       # optional: sentence-transformers
    /tmp/hfvenv/bin/python scripts/check_hf_export.py --workdir runs/default

The run is exported (python -m surm.export) into --out (default: a temporary folder). The same
token ids (the exported tokenizer's, at the run's max_length) go through the run's own forward
pass (base weights plus adapters, unmerged) and through the exported folder:

* a ``BertForSequenceClassification`` folder (pooling='pooler') in
  ``AutoModelForSequenceClassification``, which must load every weight (no missing or
  unexpected key);
* a sentence-transformers folder (pooling 'mean' or 'cls'): in ``SentenceTransformer`` when
  installed (its "sentence embedding" is the logits), and always as transformers' ``BertModel``
  followed by the pooling its ``1_Pooling/config.json`` names and the ``2_Dense`` linear head.

Prints the largest absolute logits difference of each route; exits 1 when one is above
--tolerance, 2 when torch or transformers is missing.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

INSTALL = ("this check needs torch and transformers, which are not project dependencies: "
           "python -m venv --system-site-packages /tmp/hfvenv && /tmp/hfvenv/bin/pip install "
           "torch transformers, then run it with /tmp/hfvenv/bin/python")

TEXTS = ["The match ended in a draw after extra time.",
         "Shares fell sharply when the quarterly results came out.",
         "A new phone with a foldable screen goes on sale next week, priced well above the "
         "previous model and aimed at people who want a tablet in their pocket.",
         "ok"]


def surm_logits(run, ids, mask, types):
    """The run's own forward pass (base weights plus adapters, unmerged)."""
    import numpy as np
    from surm import peft
    return np.asarray(peft.apply(run.model, run.frozen, run.trainable, run.spec, ids, mask,
                                 types))


def classifier_logits(folder: pathlib.Path, ids, mask, types):
    import torch
    from transformers import AutoModelForSequenceClassification
    model, info = AutoModelForSequenceClassification.from_pretrained(
        folder, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                         "mismatched_keys")}
    if bad:
        raise SystemExit(f"transformers did not load every weight of {folder}: {bad}")
    print(f"transformers loaded {type(model).__name__} with every weight")
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits


def pipeline_logits(folder: pathlib.Path, ids, mask, types):
    """transformers' BertModel, then the pooling and head the folder names (no
    sentence-transformers needed)."""
    import safetensors.torch
    import torch
    from transformers import BertModel
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    head = safetensors.torch.load_file(str(folder / "2_Dense" / "model.safetensors"))
    encoder, info = BertModel.from_pretrained(folder, output_loading_info=True,
                                              add_pooling_layer=False)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise SystemExit(f"transformers did not load every encoder weight of {folder}: {info}")
    with torch.no_grad():
        hidden = encoder.eval()(input_ids=ids, attention_mask=mask,
                                token_type_ids=types).last_hidden_state
        if pooling.get("pooling_mode_mean_tokens"):
            weights = mask[..., None].to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        elif pooling.get("pooling_mode_cls_token"):
            pooled = hidden[:, 0]
        else:
            raise SystemExit(f"{folder}/1_Pooling/config.json names no pooling this check knows")
        return pooled @ head["linear.weight"].T + head["linear.bias"]


def sentence_transformers_logits(folder: pathlib.Path, ids, mask, types):
    import torch
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(folder), device="cpu")
    with torch.no_grad():
        out = model.eval()({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return out["sentence_embedding"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, help="export folder (new or empty)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        print(INSTALL, file=sys.stderr)
        return 2
    import numpy as np
    from surm import runs
    from surm.interop import export
    from surm.models import bert_io

    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="surm-hf-check-")) / "export"
    folder = pathlib.Path(export.export(args.workdir, out).get("merged", ""))
    if folder.suffix or not (folder / "config.json").is_file():
        print(f"error: {args.workdir} has no merged BERT export to check", file=sys.stderr)
        return 1
    run = runs.load_run(args.workdir)
    tokenizer = bert_io.load_tokenizer(folder, run.config.input.max_length)
    encodings = tokenizer.encode_batch(TEXTS)
    ids, mask, types = (np.asarray([getattr(e, key) for e in encodings], np.int64)
                        for key in ("ids", "attention_mask", "type_ids"))
    want = surm_logits(run, ids, mask, types)
    inputs = [torch.from_numpy(x) for x in (ids, mask, types)]
    hf = json.loads((folder / "config.json").read_text())
    routes = {}
    if bert_io.HF_CLASSIFIER in hf.get("architectures", []):
        routes["transformers AutoModelForSequenceClassification"] = classifier_logits
    else:
        routes["transformers BertModel + 1_Pooling + 2_Dense"] = pipeline_logits
        try:
            import sentence_transformers  # noqa: F401
            routes["sentence-transformers SentenceTransformer"] = sentence_transformers_logits
        except ImportError:
            print("sentence-transformers not installed: checking the pipeline with transformers "
                  "alone")
    print(f"export: {folder} ({len(TEXTS)} texts, max_length {ids.shape[1]}, "
          f"{want.shape[1]} outputs)")
    worst = 0.0
    for name, logits in routes.items():
        got = logits(folder, *inputs).numpy()
        diff = float(np.max(np.abs(got - want)))
        same = bool(np.all(got.argmax(1) == want.argmax(1)))
        print(f"{name}: max |logits - surm| = {diff:.3g} (largest |logit| "
              f"{float(np.max(np.abs(want))):.3g}; same predictions: {same})")
        worst = max(worst, diff)
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
