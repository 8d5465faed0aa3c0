"""big_vision-style config arguments: ``configs/x.py:family=lowrank,rank=4`` -> get_config(arg).

``parse(arg, **defaults)`` returns a ConfigDict of the defaults updated from the ``k=v`` pairs,
each value converted to its default's type (bools take true/false/1/0; a default of None keeps
the string, or an int/float when it reads as one). An unknown key is an error naming the known
ones, so a typo never passes silently.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from surm.peft import spec as peft_spec


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"config argument {key}={text!r}: expected true or false")
    if default is None:
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return None if text.lower() == "none" else text
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(f"config argument {key}={text!r}: expected a "
                         f"{type(default).__name__}") from None


def parse(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    values = dict(defaults)
    for item in (arg or "").split(","):
        if not item.strip():
            continue
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"config argument {item!r} is not of the form key=value (','"
                             f" separates arguments, so a value cannot hold one; set such a "
                             f"value with --config.KEY=VALUE)")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
        values[key] = _convert(key, text.strip(), defaults[key])
    return ml_collections.ConfigDict(values)


def learning_rates(a: ml_collections.ConfigDict, kind: str) -> dict[str, Any]:
    """``lr`` and ``head_lr`` of a config: the arguments where given, else the method's tuned
    defaults (``surm.defaults``, from the study's runs chosen on validation), with ``lr_from``
    saying where they came from."""
    from surm import defaults

    given = {k: a.get(k) for k in ("lr", "head_lr")}
    if all(v is not None for v in given.values()):
        return {**given, "lr_from": "config arguments"}
    tuned = defaults.lookup(kind, *peft_spec.from_family(a.family, a.mode))
    out = {k: v if v is not None else tuned[k] for k, v in given.items()}
    taken = [k for k, v in given.items() if v is None]
    return {**out, "lr_from": f"{' and '.join(taken)} tuned ({kind}, surm/tuned_lrs.json): "
                              f"{tuned['from']}"}


def peft_block(a: ml_collections.ConfigDict, *, dropout: float = 0.0) -> dict[str, Any]:
    """The ``peft`` block of a config from its parsed arguments (family and mode, read as a
    method and its structure: ``surm.peft.spec.from_family``; targets with ';' between rules,
    rank, block_size, form, factors, alpha, scale), every other knob at its default."""
    method, structure = peft_spec.from_family(a.family, a.mode)
    return dict(method=method, structure=structure, targets=a.targets.replace(";", ","),
                hparams=peft_hparams(a.family, a.rank, a.block_size, a.form,
                                     a.get("factors") or None),
                scale=float(a.get("scale") or 1.0), alpha=a.get("alpha"), learn_scale=False,
                dropout=dropout, activation="gelu", train_bias=False, train_layernorm=False,
                train_extra=[], lora_path="auto")


def peft_hparams(family: str, rank: int | None, block_size: int | None = None,
                 form: str | None = None, factors: str | None = None) -> dict[str, Any]:
    """The family hyper-parameters that a config's generic arguments mean for ``family``.

    ``factors`` ("AxB": the first Kronecker factor is A x B) applies to kronecker only."""
    hp: dict[str, Any] = {}
    if family in ("lowrank", "ldr", "kronecker", "houlsby"):
        hp["rank"] = rank if rank is not None else {"lowrank": 8, "houlsby": 8}.get(family, 1)
    if family == "block_circulant" and block_size is not None:
        hp["block_size"] = block_size
    if form is not None:
        hp["form"] = form
    if factors:
        if family != "kronecker":
            raise ValueError(f"config argument factors={factors} applies to family=kronecker "
                             f"only, not {family}")
        parts = str(factors).lower().split("x")
        if len(parts) != 2 or not all(t.strip().isdigit() for t in parts):
            raise ValueError(f"config argument factors={factors!r}: expected AxB, e.g. 16x24 "
                             f"(the first Kronecker factor's shape)")
        hp["factors"] = (int(parts[0]), int(parts[1]))
    return hp
