"""Local datasets (surm.data.local): CSV/TSV/JSONL files, image folders and .npz arrays become
cached array_record datasets; bad rows, clear errors, cache reuse, and training end to end."""
import collections
import csv
import importlib.util
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from surm import config_args, data, train
from surm.data import local
from surm.data.__main__ import main as data_main
from surm.data.local import cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASS_SIZES = {"negative": 12, "neutral": 10, "positive": 8}


def sentiment_rows():
    return [(f"{label} example number {i}", label)
            for label, n in CLASS_SIZES.items() for i in range(n)]


def write_table(path, rows, header=("text", "label"), delimiter=","):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Every test's local caches go to its own $SURM_DATA_DIR (the subprocesses inherit it)."""
    store = tmp_path / "user-cache"
    monkeypatch.setenv("SURM_DATA_DIR", str(store))
    return store / "local"


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def examples(ds, split):
    source = ds.source(split)
    return [{k: _text(v) for k, v in source[i].items()} for i in range(len(source))]


def held_out(n, fraction=0.1):
    """The documented carving rule: floor(f * n + 0.5) of a class of n."""
    return math.floor(fraction * n + 0.5)


# ---- text files -------------------------------------------------------------------------------

def test_csv_string_labels_sorted_ids_and_stratified_splits(tmp_path):
    rows = sentiment_rows()
    path = write_table(tmp_path / "a" / "reviews.csv", rows[::2] + rows[1::2])
    ds = data.get_dataset(f"csv:{path}")
    assert ds.metadata["label_map"] == {"negative": 0, "neutral": 1, "positive": 2}
    assert ds.spec.num_classes == 3 and ds.spec.modality == "text"
    assert ds.spec.text_keys == ("text",) and ds.spec.metrics == ("accuracy",)
    names = ds.info.features["label"].names
    seen = {}
    for split in data.ROLES:
        got = examples(ds, split)
        counts = collections.Counter(names[e["label"]] for e in got)
        expected = {label: held_out(n) if split != "train" else n - 2 * held_out(n)
                    for label, n in CLASS_SIZES.items()}
        assert counts == expected, split
        assert ds.metadata["class_counts"][split] == expected
        assert all(e["text"].startswith(names[e["label"]]) for e in got)
        seen[split] = {e["text"] for e in got}
    assert sum(map(len, seen.values())) == len(rows)
    assert set.union(*seen.values()) == {text for text, _ in rows}
    line_of = {text: line for line, (text, _) in enumerate(rows[::2] + rows[1::2], start=2)}
    assert all(e["id"] == f"reviews.csv:{line_of[e['text']]}" for e in examples(ds, "test"))

    # The split depends on the content only: the rows in another order, elsewhere, agree.
    again = data.get_dataset(f"csv:{write_table(tmp_path / 'b' / 'x.csv', rows[::-1])}")
    for split in data.ROLES:
        assert {e["text"] for e in examples(again, split)} == seen[split]
    bigger = data.get_dataset(f"csv:{path}?validation=0.25")
    assert bigger.split_sizes()["validation"] == sum(held_out(n, 0.25)
                                                      for n in CLASS_SIZES.values())


def test_tsv_integer_labels_and_split_files(tmp_path, monkeypatch):
    labels = ["2", "10", "1"] * 6
    write_table(tmp_path / "train.tsv", [(f'say "hi", friend {i}', y)
                                         for i, y in enumerate(labels)], delimiter="\t")
    write_table(tmp_path / "test.tsv", [("held out", "10"), ("also held out", "1")],
                delimiter="\t")
    monkeypatch.chdir(tmp_path)  # Relative paths are relative to the working directory.
    ds = data.get_dataset("tsv:train.tsv?test=test.tsv&validation=0.2")
    assert ds.metadata["label_map"] == {"1": 0, "2": 1, "10": 2}  # Sorted by value.
    assert ds.split_sizes() == {"train": 18 - 3 * held_out(6, 0.2),
                                "validation": 3 * held_out(6, 0.2), "test": 2}
    assert {(e["text"], e["label"]) for e in examples(ds, "test")} == {
        ("held out", 2), ("also held out", 0)}
    assert all(e["text"].startswith('say "hi", friend') for e in examples(ds, "train"))
    assert ds.metadata["files"] == {"train": str(tmp_path / "train.tsv"), "validation": 0.2,
                                    "test": str(tmp_path / "test.tsv")}


def test_jsonl_sentence_pairs_regression_and_numeric_classes(tmp_path):
    records = [{"premise": f"premise {i}", "hypothesis": f"hypothesis {i}", "score": i / 4,
                "gold": i % 2} for i in range(30)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    ds = data.get_dataset(
        f"jsonl:{path}?text=premise&text=hypothesis&label=score&regression=true")
    assert ds.spec.regression and ds.spec.num_classes == 1
    assert ds.spec.text_keys == ("text1", "text2")
    assert ds.spec.metrics == ("pearson", "spearman")
    by_premise = {r["premise"]: r for r in records}
    got = [e for split in data.ROLES for e in examples(ds, split)]
    assert len(got) == 30
    for e in got:
        assert e["text2"] == by_premise[e["text1"]]["hypothesis"]
        assert e["label"] == pytest.approx(by_premise[e["text1"]]["score"])
    # Stratified by value: 30 rows, 3 bins by rank; the test split takes one from each.
    assert sorted(int(e["label"] // 2.5) for e in examples(ds, "test")) == [0, 1, 2]
    classes = data.get_dataset(f"jsonl:{path}?text=premise&text=hypothesis&label=gold")
    assert classes.metadata["label_map"] == {"0": 0, "1": 1} and not classes.spec.regression


BROKEN_CSV = (b"text,label\n"
              b"good one,pos\n"
              b"\"wrong, field count\",pos,extra\n"
              b"good two,neg\n"
              b"caf\xe9 au lait,neg\n"
              b"no label here,\n"
              b"\n"
              b"\"two\nlines\",pos\n"
              b"bad,row,again\n" +
              b"".join(b"filler %d,%s\n" % (i, b"pos" if i % 2 else b"neg") for i in range(40)))


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_bytes(BROKEN_CSV)
    with pytest.raises(local.BadRowsError) as e:
        data.get_dataset(f"csv:{path}")
    message = str(e.value)
    for line in (f"{path}:3: 3 fields, the header has 2",
                 f"{path}:5: not valid utf-8 (byte 0xe9 at column 4)",
                 f"{path}:6: empty column 'label'",
                 f"{path}:7: empty line",
                 f"{path}:10: 3 fields, the header has 2"):  # Line numbers past a 2-line row.
        assert line in message
    assert "5 bad rows" in message and "drop_bad=true" in message

    ds = data.get_dataset(f"csv:{path}?drop_bad=true")
    assert ds.metadata["dropped"]["count"] == 5
    assert sum(ds.split_sizes().values()) == 3 + 40
    assert "two\nlines" in {e["text"] for split in data.ROLES for e in examples(ds, split)}
    latin = data.get_dataset(f"csv:{path}?drop_bad=true&encoding=latin-1")
    assert latin.metadata["dropped"]["count"] == 4
    assert "café au lait" in {e["text"] for split in data.ROLES for e in examples(latin, split)}

    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n'
                     '{"text": "c"}\n[1, 2]\n{"text": "", "label": "y"}\n'
                     '{"text": "d", "label": null}\n')
    with pytest.raises(local.BadRowsError) as e:
        data.get_dataset(f"jsonl:{jsonl}")
    for line in (f"{jsonl}:2: not valid JSON", f"{jsonl}:3: no key 'label'",
                 f"{jsonl}:4: a JSON list, not an object", f"{jsonl}:5: empty key 'text'",
                 f"{jsonl}:6: key 'label' is null, not a string or number"):
        assert line in str(e.value)


def test_clear_errors_for_specs_columns_and_files(tmp_path):
    path = write_table(tmp_path / "a.csv", sentiment_rows(), header=("sentence", "y"))
    cases = [
        (f"xls:{path}", data.UnknownDatasetError, "csv:PATH, tsv:PATH, jsonl:PATH"),
        (f"csv:{tmp_path}/missing.csv", FileNotFoundError, "no such file .*missing.csv"),
        (f"csv:{path}", local.MissingColumnError,
         r"no column 'text', 'label' \(2 columns: 'sentence', 'y'\).*\?text=COLUMN&label=COLUMN"),
        (f"csv:{path}?text=sentence&label=stars", local.MissingColumnError, "no column 'stars'"),
        (f"csv:{path}?txt=sentence", local.SpecError, "unknown option 'txt'.*known: text, label"),
        (f"csv:{path}?text=sentence&label=y&test=1.5", local.SpecError, "fraction in"),
        (f"csv:{path}?text=sentence&label=y&validation=0.5&test=0.5", local.SpecError,
         "add up to 1"),
        (f"csv:{path}?label", local.SpecError, "not key=value"),
        (f"csv:{path}?text=sentence&label=y&max_row_lines=0", local.SpecError,
         "max_row_lines='0', expected a whole number >= 1"),
        (f"jsonl:{path}?max_row_lines=5", local.SpecError, "unknown option 'max_row_lines'"),
        (f"csv:{path}?cache_beside=maybe", local.SpecError, "cache_beside='maybe', expected"),
        (f"csv:{tmp_path}", local.SpecError, "is a folder"),
        (f"folder:{path}", local.SpecError, "is a file"),
        (f"jsonl:{write_jsonl(tmp_path / 'a.jsonl', [{'sentence': 's', 'y': 1}] * 3)}",
         local.MissingColumnError, r"no key 'text', 'label' \(2 keys: 'sentence', 'y'\)"),
        (f"csv:{write_table(tmp_path / 'one.csv', [('a', 'x'), ('b', 'x')])}",
         local.LocalDataError, "at least 2"),
        (f"csv:{write_table(tmp_path / 'few.csv', [('a', 'x'), ('b', 'y')])}",
         local.LocalDataError, "validation split carved from .* is empty"),
    ]
    for spec, error, message in cases:
        with pytest.raises(error, match=message):
            data.get_dataset(spec)
    with pytest.raises(data.UnknownDatasetError, match="folder:PATH"):
        data.get_spec("cifar11")


# ---- the cache --------------------------------------------------------------------------------

def _cache_folders(root):
    return sorted(p.name for p in root.iterdir())


def _refuse_to_convert(monkeypatch):
    def refuse(spec):
        raise AssertionError("converted again")
    for fmt in local.PREFIXES:
        monkeypatch.setitem(local._CONVERTERS, fmt, refuse)


def test_cache_is_reused_and_rebuilt_when_files_or_options_change(tmp_path, monkeypatch,
                                                                  user_cache):
    path = write_table(tmp_path / "a.csv", sentiment_rows())
    first = data.get_dataset(f"csv:{path}")
    assert first.data_dir.parent == user_cache
    with monkeypatch.context() as m:
        _refuse_to_convert(m)
        assert data.get_dataset(f"csv:{path}").data_dir == first.data_dir
        assert data.get_spec(f"csv:{path}").num_classes == 3

    write_table(path, sentiment_rows() + [("one more", "positive")])
    changed = data.get_dataset(f"csv:{path}")
    assert changed.data_dir != first.data_dir and sum(changed.split_sizes().values()) == 31
    other = data.get_dataset(f"csv:{path}?validation=0.2")
    assert len({first.data_dir, changed.data_dir, other.data_dir}) == 3
    # Rewritten with the same content: converted again (the key has the time), same digest.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = data.get_dataset(f"csv:{path}")
    assert touched.data_dir != changed.data_dir
    assert touched.metadata["content_sha256"] == changed.metadata["content_sha256"]


def test_an_interrupted_conversion_is_never_used(tmp_path, monkeypatch, user_cache):
    path = write_table(tmp_path / "a.csv", sentiment_rows())
    real = local._CONVERTERS["csv"]

    def crash_midway(spec):
        conversion = real(spec)

        def broken(examples):
            yield from list(examples)[:3]
            raise RuntimeError("simulated crash")
        conversion.splits = {s: broken(ex) for s, ex in conversion.splits.items()}
        return conversion

    with monkeypatch.context() as m:
        m.setitem(local._CONVERTERS, "csv", crash_midway)
        with pytest.raises(RuntimeError, match="simulated crash"):
            data.get_dataset(f"csv:{path}")
    assert _cache_folders(user_cache) == []
    # A hard kill leaves an .incomplete-* folder: never read, the next open converts afresh.
    name = cache.folder_name(local.parse(f"csv:{path}"))
    (user_cache / f".incomplete-{name}-x1").mkdir()
    ds = data.get_dataset(f"csv:{path}")
    assert ds.data_dir.name == name and sum(ds.split_sizes().values()) == 30


def test_a_cache_folder_that_cannot_be_written_is_an_error_not_a_fallback(tmp_path,
                                                                          monkeypatch):
    path = write_table(tmp_path / "data" / "a.csv", sentiment_rows())
    (tmp_path / "data" / cache.CACHE_FOLDER).write_text("not a folder")  # mkdir fails.
    with pytest.raises(local.LocalDataError, match=f"cannot write the cache of .* in "
                       f"{tmp_path / 'data' / cache.CACHE_FOLDER}.*drop cache_beside=true"):
        data.get_dataset(f"csv:{path}?cache_beside=true")
    monkeypatch.setenv("SURM_DATA_DIR", str(tmp_path / "data" / "a.csv"))  # A file.
    with pytest.raises(local.LocalDataError, match="set SURM_DATA_DIR to a folder you can"):
        data.get_dataset(f"csv:{path}")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [cache.CACHE_FOLDER,
                                                                     "a.csv"]


# ---- images -----------------------------------------------------------------------------------

def make_image_folder(root, per_class=5):
    """Classes bird (RGB PNG, RGBA PNG), cat (L JPEG, BMP, nested), dog (P PNG with
    transparency); returns id -> the expected top-left RGB pixel."""
    expected = {}
    for name in ("bird", "cat/inner", "dog"):
        (root / name).mkdir(parents=True)
    for i in range(per_class):
        Image.new("RGB", (10 + i, 8), (200, 10, i)).save(root / f"bird/{i}.png")
        expected[f"bird/{i}.png"] = (200, 10, i)
        Image.new("L", (9, 12), 77).save(root / f"cat/{i}.jpg", quality=95)
        expected[f"cat/{i}.jpg"] = (77, 77, 77)
        palette = Image.new("P", (6, 7))
        palette.putpalette([0, 0, 0, 5, 6, 7] * 128)
        palette.paste(1, (0, 0, 6, 7))
        palette.save(root / f"dog/{i}.png", transparency=0)
        expected[f"dog/{i}.png"] = (5, 6, 7)
    Image.new("RGBA", (8, 8), (10, 20, 30, 128)).save(root / "bird/alpha.png")
    expected["bird/alpha.png"] = (10, 20, 30)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "cat/inner/deep.bmp")
    expected["cat/inner/deep.bmp"] = (1, 2, 3)
    (root / "cat" / ".DS_Store").write_bytes(b"not an image, and ignored")
    return expected


def test_image_folder_with_mixed_formats_and_modes(tmp_path):
    expected = make_image_folder(tmp_path / "pets")
    ds = data.get_dataset(f"folder:{tmp_path / 'pets'}")
    assert ds.metadata["label_map"] == {"bird": 0, "cat": 1, "dog": 2}
    assert ds.spec.modality == "image" and ds.spec.image_key == "image"
    got = {}
    for split in data.ROLES:
        for e in examples(ds, split):
            assert e["image"].dtype == np.uint8 and e["image"].shape[2] == 3
            assert e["id"].split("/")[0] == ("bird", "cat", "dog")[e["label"]]
            got[e["id"]] = tuple(e["image"][0, 0].tolist())
    assert got == expected
    sizes = {"bird": 6, "cat": 6, "dog": 5}
    assert ds.metadata["class_counts"] == {
        "train": {c: n - 2 * held_out(n) for c, n in sizes.items()},
        "validation": {c: held_out(n) for c, n in sizes.items()},
        "test": {c: held_out(n) for c, n in sizes.items()}}
    assert ds.split_sizes() == {"train": 11, "validation": 3, "test": 3}

    # Held-out folders with the same class subfolders.
    make_image_folder(tmp_path / "test_pets", per_class=1)
    split = data.get_dataset(f"folder:{tmp_path / 'pets'}?test={tmp_path / 'test_pets'}")
    assert split.split_sizes()["test"] == 5


def test_image_folder_errors(tmp_path):
    root = tmp_path / "pets"
    make_image_folder(root)
    (root / "bird" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(root / "dog" / "deep16.png")
    with pytest.raises(local.BadRowsError) as e:
        data.get_dataset(f"folder:{root}")
    assert f"{root}/bird/broken.png: not an image Pillow can read" in str(e.value)
    assert f"{root}/dog/deep16.png: I;16 pixels" in str(e.value)
    ds = data.get_dataset(f"folder:{root}?drop_bad=true")
    assert ds.metadata["dropped"]["count"] == 2 and sum(ds.split_sizes().values()) == 17

    (root / "eel").mkdir()
    with pytest.raises(local.LocalDataError, match=f"class folder {root}/eel holds no images"):
        data.get_dataset(f"folder:{root}")
    (root / "eel").rmdir()
    (root / "stray.jpg").write_bytes(b"")
    with pytest.raises(local.BadRowsError, match="stray.jpg: a file beside the class folders"):
        data.get_dataset(f"folder:{root}")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "a.png")
    with pytest.raises(local.LocalDataError, match="has no class folders: put the images"):
        data.get_dataset(f"folder:{flat}")


def test_npz_images_and_labels(tmp_path):
    gray = np.linspace(0, 1, 30 * 4 * 5).reshape(30, 4, 5).astype(np.float32)
    np.savez(tmp_path / "gray.npz", x=gray, y=np.arange(30) % 3)
    ds = data.get_dataset(f"npz:{tmp_path / 'gray.npz'}")
    assert ds.metadata["label_map"] == {"0": 0, "1": 1, "2": 2}
    for split in data.ROLES:
        for e in examples(ds, split):
            index = int(e["id"].removeprefix("gray.npz[").removesuffix("]"))
            want = np.round(gray[index] * 255).astype(np.uint8)
            assert e["label"] == index % 3
            assert (e["image"] == want[..., None].repeat(3, -1)).all()

    rgba = np.random.default_rng(0).integers(0, 256, (12, 6, 6, 4), dtype=np.uint8)
    names = np.array(["zebra", "ant", "moth"] * 4)
    np.savez(tmp_path / "rgba.npz", pixels=rgba, target=names)
    np.savez(tmp_path / "rgba_test.npz", pixels=rgba[:3], target=names[:3])
    ds = data.get_dataset(f"npz:{tmp_path / 'rgba.npz'}?image=pixels&label=target"
                          f"&test={tmp_path / 'rgba_test.npz'}&validation=0.25")
    assert ds.metadata["label_map"] == {"ant": 0, "moth": 1, "zebra": 2}
    assert ds.split_sizes() == {"train": 9, "validation": 3, "test": 3}
    e = ds.source("test")[0]
    index = int(_text(e["id"]).split("[")[1][:-1])
    assert (e["image"] == rgba[index, ..., :3]).all()

    np.savez(tmp_path / "bad.npz", images=rgba.transpose(0, 3, 1, 2), labels=np.arange(12))
    np.savez(tmp_path / "range.npz", images=gray * 2, labels=np.arange(30))
    np.savez(tmp_path / "objects.npz", images=gray, labels=np.array([{"a": 1}] * 30))
    np.savez(tmp_path / "short.npz", images=gray, labels=np.arange(29))
    for name, message in [
        ("rgba.npz", r"no images array 'images' or 'image' or 'x' or 'X' \(arrays: pixels, "
                     r"target\); name it in the spec with image=NAME"),
        ("bad.npz", "looks like N x C x H x W"),
        ("range.npz", r"float images must lie in \[0, 1\]"),
        ("objects.npz", "cannot be read without unpickling"),
        ("short.npz", r"labels of shape \(29,\) for 30 images"),
    ]:
        with pytest.raises(local.LocalDataError, match=message):
            data.get_dataset(f"npz:{tmp_path / name}")


# ---- the pipeline, the CLI, configs and runs --------------------------------------------------

def _tag(example, rng):
    return {"label": np.int32(example["label"]),
            "line": np.int32(int(_text(example["id"]).split(":")[1])),
            "draw": rng.integers(0, 1 << 30)}


def test_loaders_shard_shuffle_and_resume_as_for_any_dataset(tmp_path):
    source = data.get_dataset(f"csv:{write_table(tmp_path / 'a.csv', sentiment_rows())}"
                              ).source("train")

    def loader(**kw):
        return data.make_train_loader(source, _tag, global_batch_size=4, seed=3,
                                      shard_index=0, shard_count=1, **kw)

    def take(it, n):
        return [{k: v.tolist() for k, v in next(it).items()} for _ in range(n)]

    reference = take(loader(), 6)
    assert take(loader(), 6) == reference
    it = loader()
    take(it, 2)
    resumed = loader()
    resumed.set_state(it.get_state())
    assert take(resumed, 4) == reference[2:]
    shards = [{line for b in data.make_train_loader(
        source, _tag, global_batch_size=2, seed=3, shard_index=i, shard_count=2, num_epochs=1)
        for line in b["line"].tolist()} for i in range(2)]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == len(source)


def test_info_shows_label_map_counts_and_examples(tmp_path, capsys):
    path = write_table(tmp_path / "a.csv", sentiment_rows(), header=("sentence", "y"))
    spec = f"csv:{path}?text=sentence&label=y"
    assert data_main(["info", spec]) == 0
    out = capsys.readouterr().out
    for line in (f"{spec}: text, 3 classes, metrics accuracy (local files)",
                 "inputs: text <- column 'sentence'; label <- column 'y'",
                 f"files: train {path}, validation 10% carved from train (stratified)",
                 "label map: negative=0, neutral=1, positive=2", "dropped: 0",
                 "train: 24 (negative 10, neutral 8, positive 6)",
                 "test: 3 (negative 1, neutral 1, positive 1)", "examples (train):"):
        assert line in out
    assert out.count("  a.csv:") == 3
    assert data_main(["info", f"parquet:{path}"]) == 2
    assert data_main(["info", f"csv:{path}"]) == 1
    assert "no column 'text', 'label'" in capsys.readouterr().err


def test_record_run_refuses_a_workdir_that_saw_other_data(tmp_path):
    path = write_table(tmp_path / "a.csv", sentiment_rows())
    workdir = tmp_path / "run"
    workdir.mkdir()
    data.get_dataset(f"csv:{path}").record_run(workdir)
    saved = json.loads((workdir / "dataset.json").read_text())
    assert saved["label_map"] == {"negative": 0, "neutral": 1, "positive": 2}
    assert saved["source"] == f"csv:{path}" and saved["sizes"]["train"] == 24
    write_table(path, sentiment_rows()[:-1])
    with pytest.raises(local.LocalDataError, match="holds a run on other data"):
        data.get_dataset(f"csv:{path}").record_run(workdir)


def test_specs_survive_config_arguments_and_sweeps(tmp_path, capsys):
    path = write_table(tmp_path / "a.csv", sentiment_rows(), header=("sentence", "y"))
    spec = f"csv:{path}?text=sentence&label=y&validation=0.2"
    parsed = config_args.parse(f"dataset={spec},seed=1", dataset="bbc_news", seed=0)
    assert parsed.dataset == spec and parsed.seed == 1
    with pytest.raises(ValueError, match="a value cannot hold one"):
        config_args.parse(f"dataset={spec}&text=a,b", dataset="")

    from surm import sweep
    from surm.sweep.__main__ import main as sweep_main
    assert sweep_main(["--config", str(ROOT / "configs" / "default.py"), "--base",
                       "checkpoint=random", "--families", "circulant", "--datasets", spec,
                       "--root", str(tmp_path / "sweep"), "--print_commands"]) == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    config = sweep.load_config(*argv[4].removeprefix("--config=").split(":", 1))
    assert config.input.dataset == spec


def test_train_on_a_csv_file_from_the_command_line(tmp_path):
    path = write_table(tmp_path / "my data" / "reviews.csv", sentiment_rows())
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "surm.train", "--config",
         f"configs/default.py:dataset=csv:{path},checkpoint=random,steps=3,batch=8,"
         "max_length=16", "--workdir", str(workdir), "--config.input.eval_batch_size=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "train_loss" in l] == [3]
    assert any("test_accuracy" in l for l in lines)
    saved = json.loads((workdir / "dataset.json").read_text())
    assert saved["label_map"] == {"negative": 0, "neutral": 1, "positive": 2}
    assert json.loads((workdir / "config.json").read_text())["input"]["dataset"] == f"csv:{path}"


def load_config(name, arg):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_train_on_an_image_folder(tmp_path):
    folder = tmp_path / "pets"
    make_image_folder(folder)
    config = load_config("vit_transfer", f"dataset=folder:{folder},checkpoint=random,"
                                         "variant=Ti/16,image_size=32,steps=2,batch=4")
    config.input.eval_batch_size = 4
    config.log_every = 1
    config.model.depth = 2  # 2 of ViT-Ti's 12 blocks: the data path is under test, not the model
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["step"] == 2 and 0 <= summary["test_accuracy"] <= 1
    saved = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert saved["label_map"] == {"bird": 0, "cat": 1, "dog": 2}

    bert_on_images = load_config("default", f"dataset=folder:{folder},checkpoint=random")
    with pytest.raises(ValueError, match="holds image data but model.name='bert'"):
        train.check_config(bert_on_images, tmp_path / "other")
