"""python -m surm.inspect on the embedded default and its variants (counts from the formulas)."""
import json
import subprocess
import sys

import pytest

# MiniLM-L6: 6 layers, hidden 384; q and v targeted; a 3-class head on mean pooling.
LAYERS, H, HEAD = 6, 384, 384 * 3 + 3


@pytest.mark.parametrize("args,adapter,extra", [
    ("", 2 * LAYERS * H, 0),                                   # one circulant vector per matrix
    (":family=lowrank,rank=4", 2 * LAYERS * 4 * (H + H), 0),   # LoRA r=4
    (":mode=adapter", 2 * LAYERS * H, 2 * LAYERS * H),         # + one bias per adapter
])
def test_inspect_json(args, adapter, extra):
    out = subprocess.run([sys.executable, "-m", "surm.inspect", "--config",
                          f"configs/default.py{args}", "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["adapter"] == adapter
    assert counts["trainable"] == adapter + extra + HEAD
    assert counts["base"] > 22_000_000 and len(counts["targets"]) == 2 * LAYERS
    assert "trainable%" in out.stdout


def test_inspect_rejects_a_rule_matching_nothing():
    out = subprocess.run([sys.executable, "-m", "surm.inspect", "--config",
                          "configs/default.py:targets=nothing/here"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "matches no linear module" in out.stderr and "attention/self/query" in out.stderr


def test_kronecker_factors_config_argument():
    from surm import config_args
    assert config_args.peft_hparams("kronecker", None, factors="16x24") == {
        "rank": 1, "factors": (16, 24)}
    with pytest.raises(ValueError, match="expected AxB"):
        config_args.peft_hparams("kronecker", None, factors="16x")
    with pytest.raises(ValueError, match="family=kronecker only"):
        config_args.peft_hparams("circulant", None, factors="16x24")
