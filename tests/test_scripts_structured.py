"""Smoke tests of scripts/approximate.py and scripts/bench_structured.py on tiny settings."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)


def markdown_rows(text):
    """The rows of the first markdown table in text, as dicts keyed by the header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_approximate_writes_the_table_and_the_verdicts(tmp_path):
    out = tmp_path / "approximate"
    result = run_script("approximate.py", "--n", 32, "--trials", 2, "--fit_steps", 10,
                        "--targets", "wishart", "wishart_corr", "--out", out)
    for name in ("table.md", "results.csv", "results.json", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table.md").read_text()
    assert table.strip() in result.stdout
    rows = markdown_rows(table)
    assert {r["target"] for r in rows} == {"wishart", "wishart_corr"}
    assert len(rows) == 2 * 10  # ten main-table families per target
    for r in rows:
        assert 0 < int(r["params"]) <= 64 and 0 <= float(r["rel. error (mean)"]) < 1.5
        assert 1 <= int(r["rank"]) <= 10
    assert {r["params"] for r in rows if r["family"] == "lowrank"} == {"64"}

    data = json.loads((out / "results.json").read_text())
    assert [v["target"] for v in data["verdicts"]] == ["wishart", "wishart_corr"]
    for v in data["verdicts"]:
        assert isinstance(v["holds"], bool)
        assert ("DOES NOT HOLD" if not v["holds"] else "HOLDS") in v["line"]
        assert v["line"] in result.stdout
    assert all(len(r["errors"]) == 2 for r in data["results"])
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("table,target,family") and len(csv_lines) > 1 + 20


def test_bench_prints_a_table_and_the_json(tmp_path):
    path = tmp_path / "bench.json"
    result = run_script("bench_structured.py", "--sizes", 32, 64, "--reps", 2, "--tokens", 16,
                        "--families", "dense", "lowrank_r8", "circulant", "--json", path)
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    table = [line.split() for line in lines[start + 1:start + 7]]
    assert [(row[0], int(row[1])) for row in table] == [
        (name, n) for name in ("dense", "lowrank_r8", "circulant") for n in (32, 64)]
    assert all(float(row[3]) > 0 for row in table)

    data = json.loads(path.read_text())
    assert len(data["products"]) == 6 and [r["n"] for r in data["fft_vjp"]] == [32, 64]
    dense = [r for r in data["products"] if r["name"] == "dense"]
    assert all(r["ratio_to_dense"] == 1.0 for r in dense) and dense[1]["growth"] > 0
    for row in data["fft_vjp"]:
        for k in ("custom_vjp", "autodiff"):
            assert row[k]["median_s"] > 0 and row[k]["residual_bytes"] > 0

    printed = run_script("bench_structured.py", "--sizes", 32, "--reps", 1, "--tokens", 8,
                         "--families", "dense", "--no-vjp", "--json")
    last = json.loads(printed.stdout.strip().splitlines()[-1])
    assert [r["name"] for r in last["products"]] == ["dense"] and last["fft_vjp"] == []
