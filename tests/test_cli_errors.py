"""No command prints a Python traceback for a user's mistake: each case of bad input to each
command line is one ``error:`` line (after anything else it printed), the exit status it
documents, and nothing written."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ["-m", "surm.train", "--config", "configs/default.py:checkpoint=random"]


def _cases(tmp: pathlib.Path):
    file = tmp / "a_file"
    return {
        "train: a typo'd :k=v argument": (
            ["-m", "surm.train", "--config", "configs/default.py:checkpoint=random,stpes=2",
             "--workdir", str(tmp / "w")], 2, "unknown config argument 'stpes'"),
        "train: an override of a field the config lacks": (
            [*TRAIN, "--workdir", str(tmp / "w"), "--config.unknown=1"], 2,
            "names no field of the config: unknown"),
        "train: an override in the configs' older words (peft.family)": (
            [*TRAIN, "--workdir", str(tmp / "w"), "--config.peft.family=lowrank"], 2,
            "override --config.peft.structure"),
        "train: a value of the wrong type": (
            [*TRAIN, "--workdir", str(tmp / "w"), "--config.total_steps=abc"], 2,
            "--config.total_steps=abc"),
        "train: a value out of its domain": (
            [*TRAIN, "--workdir", str(tmp / "w"), "--config.ckpt_every=0"], 1,
            "ckpt_every=0 must be at least 1"),
        "train: a NaN scale": (
            [*TRAIN, "--workdir", str(tmp / "w"), "--config.peft.scale=nan"], 1,
            "peft.scale=nan must be a finite number"),
        "train: a max_length past the model's positions": (
            ["-m", "surm.train", "--config",
             "configs/default.py:checkpoint=random,dataset=bbc_news,max_length=1000",
             "--workdir", str(tmp / "w")], 1, "longer than bert takes (512 positions)"),
        "train: causal-LM text that is not UTF-8": (
            ["-m", "surm.train", "--config",
             f"configs/causal_lm.py:checkpoint=random,dataset=text:{tmp / 'latin1.txt'}",
             "--workdir", str(tmp / "w")], 1, "latin1.txt is not UTF-8"),
        "train: an empty workdir": ([*TRAIN, "--workdir", ""], 2, "--workdir are required"),
        "train: a workdir that is a file": (
            [*TRAIN, "--workdir", str(file)], 1, "is a file, not a folder"),
        "train: a gs:// workdir": (
            [*TRAIN, "--workdir", "gs://bucket/run"], 1, "gs:// paths are not read"),
        "export: a gs:// workdir": (
            ["-m", "surm.export", "--workdir", "gs://bucket/run", "--out", str(tmp / "o")], 1,
            "gs:// paths are not read"),
        "sweep: a gs:// root": (
            ["-m", "surm.sweep", "--config", "configs/default.py", "--base", "checkpoint=random",
             "--families", "circulant", "--root", "gs://bucket/sweep"], 2,
            "gs:// paths are not read"),
        "train: a workdir under a file": (
            [*TRAIN, "--workdir", str(file / "run")], 1, "is a file, not a folder"),
        "generate: a NaN temperature": (
            ["-m", "surm.generate", "--workdir", str(tmp), "--prompt", "hi", "--temperature",
             "nan"], 2, "--temperature must be a finite number"),
        "generate: a folder without a run": (
            ["-m", "surm.generate", "--workdir", str(tmp), "--prompt", "hi"], 1,
            "not a finished surm.train workdir"),
        "export: a folder without a run": (
            ["-m", "surm.export", "--workdir", str(tmp), "--out", str(tmp / "o")], 1,
            "not a finished surm.train workdir"),
        "data info: an unknown dataset": (
            ["-m", "surm.data", "info", "no_such_data"], 2, "Unknown dataset 'no_such_data'"),
        "sweep: a root that is a file": (
            ["-m", "surm.sweep", "--config", "configs/default.py", "--base", "checkpoint=random",
             "--families", "circulant", "--root", str(file)], 2, "is a file"),
        "c3a export: a folder without a run": (
            ["-m", "surm.interop.c3a", "export", str(tmp), str(tmp / "c")], 1,
            "not a finished surm.train workdir"),
    }


CASES = sorted(_cases(pathlib.Path("/tmp")))


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_error_line_and_its_exit_status(case, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "latin1.txt").write_bytes("café crème\n\n".encode("latin-1") * 100)
    argv, status, message = _cases(tmp_path)[case]
    (tmp_path / "cache").mkdir()  # datasets prepared on first use go here, not in the run
    before = sorted(p.name for p in tmp_path.iterdir())
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, "SURM_DATA_DIR": str(tmp_path / "cache")})
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == status, done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert err and (err[-1].startswith("error: ") or  # argparse: "PROG: error: ..."
                    err[-1].startswith(f"python -m {argv[1]}: error: "))
    assert message in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
