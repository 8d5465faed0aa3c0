"""Seeded fuzzing of local data files: random bytes, CSVs with random shapes and quoting, JSONL
lines of random JSON. Each file either loads with exact accounting (the examples of every
split plus the rows left out equal the file's lines) or fails with the data error
(``LocalDataError``: a message naming the problem), never another exception."""
import json
import random

import pytest

from surm import data
from surm.data import local

WORDS = ["good", "bad", "so-so", "très", "naïve", "a b", "x,y", 'say "hi"', "", " ", "0", "1.0"]
LABELS = ["pos", "neg", "mid"]


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURM_DATA_DIR", str(tmp_path / "user-cache"))


def _csv_field(rng: random.Random, text: str) -> str:
    kind = rng.random()
    if kind < 0.6 and not any(c in text for c in ',"'):
        return text
    if kind < 0.97:
        return '"' + text.replace('"', '""') + '"'
    return '"' + text  # a quote left open: swallows lines until one closes it


def _csv_file(rng: random.Random) -> tuple[bytes, int]:
    lines = []
    for _ in range(rng.randint(20, 80)):
        r = rng.random()
        if r < 0.04:
            lines.append(b"")  # an empty line
        elif r < 0.08:
            lines.append(b"\xff\xfe broken \xc3(" + b",pos")  # not UTF-8
        elif r < 0.13:
            fields = [_csv_field(rng, rng.choice(WORDS)) for _ in range(rng.choice([1, 3]))]
            lines.append(",".join(fields).encode())  # the wrong number of fields
        else:
            lines.append((_csv_field(rng, rng.choice(WORDS) + " " + rng.choice(WORDS)) + ","
                          + _csv_field(rng, rng.choice(LABELS))).encode())
    return b"text,label\n" + b"".join(line + b"\n" for line in lines), len(lines)


def _json_value(rng: random.Random, depth: int = 0):
    return rng.choice([lambda: rng.choice(WORDS), lambda: rng.randint(-3, 3),
                       lambda: rng.choice([0.5, 1.0, float("1e300")]), lambda: None,
                       lambda: rng.random() < 0.5,
                       lambda: [] if depth else [_json_value(rng, 1)],
                       lambda: {} if depth else {"k": _json_value(rng, 1)}])()


def _jsonl_file(rng: random.Random) -> tuple[bytes, int]:
    lines = []
    for _ in range(rng.randint(20, 80)):
        r = rng.random()
        if r < 0.05:
            lines.append("{broken")
        elif r < 0.1:
            lines.append(json.dumps(_json_value(rng)))  # not an object
        elif r < 0.3:
            lines.append(json.dumps({"text": _json_value(rng), "label": _json_value(rng)}))
        else:
            lines.append(json.dumps({"text": rng.choice(WORDS) + " " + rng.choice(WORDS),
                                     "label": rng.choice(LABELS)}, ensure_ascii=rng.random() < .5))
    return "".join(line + "\n" for line in lines).encode(), len(lines)


def _random_bytes(rng: random.Random) -> tuple[bytes, int]:
    raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 3000)))
    return raw, None


@pytest.mark.parametrize("seed", range(24))
def test_a_random_file_loads_with_exact_accounting_or_fails_as_a_data_error(tmp_path, seed):
    rng = random.Random(seed)
    kind = ("csv", "jsonl", "bytes")[seed % 3]
    content, lines = {"csv": _csv_file, "jsonl": _jsonl_file, "bytes": _random_bytes}[kind](rng)
    suffix = "jsonl" if kind == "jsonl" else rng.choice(["csv", "tsv"]) if kind == "bytes" \
        else "csv"
    path = tmp_path / f"f{seed}.{suffix}"
    path.write_bytes(content)
    try:
        ds = data.get_dataset(f"{suffix}:{path}?drop_bad=true")
    except local.LocalDataError as e:
        assert str(e).strip(), "an error without a message"
        return
    loaded = sum(ds.split_sizes().values())
    dropped = ds.metadata["dropped"]["count"]
    if lines is not None:
        assert loaded + dropped == lines, (loaded, dropped, lines)
    assert loaded > 0
