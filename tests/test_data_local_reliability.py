"""Local data that must never be lost, written where it does not belong, or misread: a runaway
quote in a CSV, the cache's location and what errors echo of a file, and text encodings."""
import pytest

from surm import data
from surm.data import local
from surm.data.__main__ import main as data_main
from surm.data.local import cache, spec as local_spec


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


# ---- a quote that is never closed ------------------------------------------------------------

def test_an_unclosed_quote_drops_exactly_the_lines_it_swallows(tmp_path):
    path = tmp_path / "short.csv"
    lines = rows_file(path, 60, unclosed_after=20, quoted_at=35)
    bad_line = 2 + 20  # The header is line 1, row 0 line 2; the bad line comes after row 19.
    quote_line = bad_line + 1 + 35 - 20
    with pytest.raises(local.BadRowsError) as e:
        data.get_dataset(f"csv:{path}")
    swallowed = quote_line - bad_line + 1
    assert f"{swallowed} bad rows" in str(e.value)
    assert f"{path}:{bad_line}-{quote_line}:" in str(e.value)
    ds = data.get_dataset(f"csv:{path}?drop_bad=true")
    dropped = ds.metadata["dropped"]
    assert dropped["count"] == swallowed
    assert total(ds) + dropped["count"] == len(lines)  # Every line is kept or counted.
    kept = {e["id"].decode() for split in data.ROLES for e in ds.source(split)}
    assert f"short.csv:{bad_line - 1}" in kept and f"short.csv:{quote_line + 1}" in kept


@pytest.mark.parametrize("drop_bad", ["", "?drop_bad=true"])
def test_a_runaway_quote_is_its_own_error_naming_its_line(tmp_path, drop_bad):
    path = tmp_path / "issue.csv"
    rows_file(path, 401, unclosed_after=101, quoted_at=300)  # 198 lines apart.
    with pytest.raises(local.LocalDataError) as e:
        data.get_dataset(f"csv:{path}{drop_bad}")
    assert not isinstance(e.value, local.BadRowsError)  # Not a bad row drop_bad could drop.
    message = str(e.value)
    assert f"{path}:103:" in message and "quote" in message
    assert f"max_row_lines={local_spec.DEFAULT_MAX_ROW_LINES}" in message
    assert "oops" not in message  # The line is named, not echoed.
    # Raising the limit reads the runaway as one malformed 199-line row, counted as such.
    ds = data.get_dataset(f"csv:{path}?drop_bad=true&max_row_lines=1000")
    assert total(ds) + ds.metadata["dropped"]["count"] == 402


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


# ---- encodings --------------------------------------------------------------------------------

def _texts(ds):
    return sorted(e["text"].decode() for split in data.ROLES for e in ds.source(split))


MARKS = {"utf-8": b"\xef\xbb\xbf", "utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff",
         "utf-32-le": b"\xff\xfe\x00\x00", "utf-32-be": b"\x00\x00\xfe\xff"}


@pytest.mark.parametrize("encoding", sorted(MARKS))
def test_a_file_with_a_byte_order_mark_is_read_as_it_says(tmp_path, encoding):
    rows_file(tmp_path / "plain.csv", 30)
    reference = data.get_dataset(f"csv:{tmp_path / 'plain.csv'}")
    path = tmp_path / "marked.csv"
    rows_file(path, 30, encoding=encoding)
    path.write_bytes(MARKS[encoding] + path.read_bytes())
    ds = data.get_dataset(f"csv:{path}")
    assert _texts(ds) == _texts(reference)
    assert ds.metadata["label_map"] == reference.metadata["label_map"]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_utf16_or_utf32_without_a_mark_is_named_with_the_fix(tmp_path, encoding):
    path = tmp_path / "bare.csv"
    rows_file(path, 30, encoding=encoding)
    with pytest.raises(local.LocalDataError) as e:
        data.get_dataset(f"csv:{path}")
    message = str(e.value)
    assert "\n" not in message and "\\x00" not in message
    assert encoding.upper() in message and f"encoding={encoding}" in message
    ds = data.get_dataset(f"csv:{path}?encoding={encoding}")
    assert total(ds) == 30


def test_an_encoding_that_contradicts_the_byte_order_mark_is_refused(tmp_path):
    path = tmp_path / "marked.csv"
    rows_file(path, 30, encoding="utf-16-le")
    path.write_bytes(MARKS["utf-16-le"] + path.read_bytes())
    with pytest.raises(local.LocalDataError, match="UTF-16-LE byte-order mark.*encoding="):
        data.get_dataset(f"csv:{path}?encoding=latin-1")
    plain = tmp_path / "plain.csv"
    rows_file(plain, 30)
    with pytest.raises(local.LocalDataError, match="no byte-order mark .* nor the NUL bytes"):
        data.get_dataset(f"csv:{plain}?encoding=utf-16")
    bare = tmp_path / "bare.csv"
    rows_file(bare, 30, encoding="utf-16-be")  # utf-16 takes the byte order the NULs show.
    assert total(data.get_dataset(f"csv:{bare}?encoding=utf-16")) == 30


# ---- nothing reinterpreted silently -------------------------------------------------------------

def test_a_column_named_twice_is_refused(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("text,label,label\n" + "".join(f"row {i},a,b\n" for i in range(30)))
    with pytest.raises(local.LocalDataError, match=r"twice.csv: the header names 'label' more "
                                                   r"than once \(line 1\)"):
        data.get_dataset(f"csv:{path}")


def test_numeric_labels_are_one_class_however_they_are_written(tmp_path):
    """0, 0.0, "0" and 0.00 (JSONL, CSV) are the class '0': two classes here, not six."""
    import json
    jsonl = tmp_path / "n.jsonl"
    values = [0, 0.0, "0", 1, 1.0, "1.00"]
    jsonl.write_text("".join(json.dumps({"text": f"row {i}", "label": values[i % 6]}) + "\n"
                             for i in range(60)))
    csv_path = tmp_path / "n.csv"
    csv_path.write_text("text,label\n" + "".join(f"row {i},{('0', '0.0', '1', '1.00')[i % 4]}\n"
                                                 for i in range(60)))
    for spec in (f"jsonl:{jsonl}", f"csv:{csv_path}"):
        ds = data.get_dataset(spec)
        assert ds.metadata["label_map"] == {"0": 0, "1": 1}, spec
        assert ds.label_names() == ["0", "1"]


def test_a_class_too_small_to_reach_a_carved_split_is_named(tmp_path, capsys):
    path = tmp_path / "rare.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(60))
                    + "the only one,rare\n")
    ds = data.get_dataset(f"csv:{path}")
    assert ds.metadata["class_counts"]["test"]["rare"] == 0
    err = capsys.readouterr().err
    assert "class 'rare' (1 example) too small to reach the carved validation split" in err
    assert "carved test split" in err


def test_a_damaged_conversion_cache_is_converted_again_never_read(tmp_path, capsys, user_cache):
    path = tmp_path / "ok.csv"
    rows_file(path, 60)
    first = data.get_dataset(f"csv:{path}")
    sizes = first.split_sizes()
    capsys.readouterr()
    again = data.get_dataset(f"csv:{path}")  # intact: reused as it is, without a word
    assert again.data_dir == first.data_dir and "damaged" not in capsys.readouterr().err
    shard = next(p for p in first.data_dir.rglob("*train.array_record*"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    rebuilt = data.get_dataset(f"csv:{path}")
    assert "is damaged" in capsys.readouterr().err
    assert rebuilt.split_sizes() == sizes
    assert data.get_dataset(f"csv:{path}").data_dir == rebuilt.data_dir
    assert "damaged" not in capsys.readouterr().err


# ---- files that are not plain data -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gzip", "bzip2", "zip"])
def test_a_compressed_data_file_is_named_with_the_command_that_opens_it(tmp_path, kind):
    """A compressed CSV, JSONL or LM text file was read as undecodable lines ("is empty")."""
    import bz2
    import gzip
    import zipfile
    from surm import lm
    plain = "text,label\n" + "".join(f"row {i},a\n" for i in range(30))
    path = tmp_path / f"rows.csv.{kind}"
    if kind == "gzip":
        path.write_bytes(gzip.compress(plain.encode()))
    elif kind == "bzip2":
        path.write_bytes(bz2.compress(plain.encode()))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("rows.csv", plain)
    tool = {"gzip": "gunzip", "bzip2": "bunzip2", "zip": "unzip"}[kind]
    for fmt in ("csv", "jsonl"):
        with pytest.raises(local.SpecError, match=f"is a {kind}-compressed file; decompress it "
                                                  f"first \\({tool} {path.name}\\)"):
            data.get_dataset(f"{fmt}:{path}")
    with pytest.raises(ValueError, match=f"is a {kind}-compressed file"):
        lm.read_local(path)


def test_a_named_pipe_is_named_as_one_never_read(tmp_path):
    """Reading a FIFO blocks until a writer comes: it is refused as what it is (it was called
    "a folder")."""
    import os
    from surm import lm
    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    for spec in (f"csv:{fifo}", f"folder:{fifo}"):
        with pytest.raises(local.SpecError, match=r"is a named pipe \(FIFO\), not a regular"):
            data.get_dataset(spec)
    with pytest.raises(ValueError, match=r"is a named pipe \(FIFO\)"):
        lm.read_local(fifo)
