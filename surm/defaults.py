"""Default learning rates per method, taken from the study's runs tuned on validation.

Every config's lr and head lr, when not given, come from ``surm/tuned_lrs.json``, which
``derive`` writes from the study's record (``docs/results/<part>.csv``; ``python -m
surm.study defaults``). For each kind of model (``text``: the BERT configs; ``image``: the
ViT config; ``lm``: the causal-LM config) and each method (``method_key``: 'lora circulant',
'adapter block_circulant', 'houlsby', 'full'), the default is the median, on a log scale, of the learning rates the method's tuning
chose across the datasets and regimes of that kind (the lower of the two middle ones), so it is
always one of them. Each entry says where it came from. A method the study did not tune takes
the value of its nearest tuned relative, and says so: the same product with other signs
(skew_circulant <- circulant), the general form of a symmetric one (symmetric_toeplitz <-
toeplitz), the same structure with the other method (lora <-> adapter), and lastly (structured
methods only) lora circulant; then the other kinds'. A method without a structure (Houlsby,
BitFit, probe, full) is never given another method's lr.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Iterable, Mapping, Sequence

FILE = pathlib.Path(__file__).with_name("tuned_lrs.json")
KINDS = ("text", "image", "lm")
RELATIVES = {"skew_circulant": "circulant", "symmetric_toeplitz": "toeplitz",
             "dense": "lowrank"}
OTHER_METHOD = {"lora": "adapter", "adapter": "lora"}
FALLBACK = "lora circulant"


def method_key(method: str, structure: str | None = None) -> str:
    """A method's key in the table: 'lora circulant', 'houlsby' (``PeftSpec.label``)."""
    return f"{method} {structure}" if structure not in (None, "", "-") else method


def load(path: pathlib.Path = FILE) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"{path}: the tuned learning rates cannot be read ({e}); "
                                f"rebuild it with `python -m surm.study defaults`") from None


def lookup(kind: str, method: str, structure: str | None = None,
           table: Mapping | None = None) -> dict:
    """{"lr", "head_lr", "from"} of a method: tuned, or a relative's (see the module doc); a
    kind with nothing tuned yet takes the other kind's, and says so."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    table = table or load()
    key = method_key(method, structure)
    candidates: tuple[tuple[str, str], ...] = ((key, ""),)
    if key != method:  # it has a structure; a method without one keeps its own lr scale
        candidates += ((method_key(method, RELATIVES.get(structure, structure)), "a relative"),
                       (method_key(OTHER_METHOD.get(method, method), structure),
                        "the other method"),
                       (FALLBACK, "the fallback"))
    for source_kind in (kind, *(k for k in KINDS if k != kind)):
        methods = table.get(source_kind, {}).get("methods", {})
        for candidate, why in candidates:
            if candidate in methods:
                entry = dict(methods[candidate])
                notes = []
                if candidate != key:
                    notes.append(f"{key} not tuned, {why}'s")
                if source_kind != kind:
                    notes.append(f"not tuned on {kind}, {source_kind}'s")
                if notes:
                    entry["from"] = f"{candidate} ({'; '.join(notes)}): {entry['from']}"
                return entry
    raise KeyError(f"no tuned learning rate for {key} in {FILE}: give lr= (and head_lr=), or run "
                   f"the study's tuning of it and `python -m surm.study defaults`")


def _lower_log_median(values: Sequence[float]) -> float:
    ordered = sorted(values, key=math.log)
    return ordered[(len(ordered) - 1) // 2]


def _where(pick: Mapping) -> str:
    hparams = f" ({pick['hparams']})" if pick["hparams"] else ""
    return (f"{pick['part']}/{pick['dataset']}{hparams}: lr {pick['lr']:g}, "
            f"head {pick['head_lr']:g}")


def derive(parts: Mapping[str, Iterable[tuple[str, Mapping[tuple, Mapping[str, float]]]]]
           ) -> dict:
    """The table from the study's choices: {kind: [(part name, {(dataset, method, structure,
    hparams, seed): {"lr", "head_lr"}})]}, the values each method's tuning chose on validation
    (``surm.sweep.choices``: a method still tuning has none, rather than one chosen among the
    lrs that ran)."""
    table = {}
    for kind, kind_parts in parts.items():
        chosen: dict[str, list[dict]] = {}
        names = []
        for name, picked in kind_parts:
            if picked:
                names.append(name)
            for (dataset, method, structure, hparams, _), values in picked.items():
                key = method_key(method, structure)
                chosen.setdefault(key, []).append(
                    {"part": name, "dataset": dataset, "hparams": hparams, **values})
        methods = {}
        for key, picks in sorted(chosen.items()):
            lr = _lower_log_median([p["lr"] for p in picks])
            head = _lower_log_median([p["head_lr"] for p in picks])
            if all(p["lr"] == p["head_lr"] for p in picks):
                head = lr  # the head was tied to the lr in every tuning
            methods[key] = {"lr": lr, "head_lr": head, "picks": picks,
                            "from": "chosen on validation in " + "; ".join(map(_where, picks))}
        table[kind] = {"parts": names, "methods": methods}
    return table
