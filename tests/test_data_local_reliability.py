"""Local data that must never be written where it does not belong: the cache's location and
what errors echo of a file."""
import pytest

from surm import data
from surm.data import local
from surm.data.__main__ import main as data_main
from surm.data.local import cache


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Every test's local caches go to its own $SURM_DATA_DIR."""
    store = tmp_path / "user-cache"
    monkeypatch.setenv("SURM_DATA_DIR", str(store))
    return store / "local"


def rows_file(path, count, *, unclosed_after=None, quoted_at=None, encoding="utf-8"):
    """A text,label CSV of ``count`` good rows; a line with an unclosed quote after row
    ``unclosed_after``, and a quoted text at row ``quoted_at``. Returns the data lines."""
    lines = []
    for i in range(count):
        if i == unclosed_after:
            lines.append('x4,"oops I forgot to close,sports')
        text = f'"row {i}, quoted"' if i == quoted_at else f"row {i}"
        lines.append(f"{text},{('pos', 'neg', 'mid')[i % 3]}")
    path.write_bytes(("text,label\n" + "".join(l + "\n" for l in lines)).encode(encoding))
    return lines


def total(ds):
    return sum(ds.split_sizes().values())


# ---- where the cache goes, and what errors show of a file -------------------------------------

def test_the_cache_goes_to_the_user_cache_folder_never_beside_the_data(tmp_path, user_cache,
                                                                      capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    rows_file(folder / "a.csv", 30)
    assert data_main(["info", f"csv:{folder / 'a.csv'}"]) == 0
    assert f"cache: {user_cache}/csv-a-" in capsys.readouterr().out
    ds = data.get_dataset(f"csv:{folder / 'a.csv'}")
    assert ds.data_dir.parent == user_cache
    assert sorted(p.name for p in folder.iterdir()) == ["a.csv"]  # Nothing written beside.

    beside = data.get_dataset(f"csv:{folder / 'a.csv'}?cache_beside=true")  # When asked.
    assert beside.data_dir.parent == folder / cache.CACHE_FOLDER
    assert beside.metadata["content_sha256"] == ds.metadata["content_sha256"]


def test_a_system_file_read_as_csv_writes_nothing_beside_it_and_is_not_echoed(tmp_path,
                                                                              capsys):
    system = tmp_path / "etc"
    system.mkdir()
    secret = "root:x:0:0:root:/root:/bin/bash:" + "s3cr3t-" * 8
    (system / "passwd").write_text(secret + "\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n")
    assert data_main(["info", f"csv:{system / 'passwd'}"]) == 1
    err = capsys.readouterr().err
    assert "no column 'text', 'label'" in err and "1 column" in err
    assert "s3cr3t" not in err and "/bin/bash" not in err
    assert sorted(p.name for p in system.iterdir()) == ["passwd"]
