"""The grid of a sweep: its syntax, the methods it expands to, and the configs of its runs.

A ``--families`` item is ``FAMILY[:KEY=V1;V2...][:KEY2=...]``, in the configs' vocabulary: a
structure (run by each of ``--modes``, lora or adapter; the config's own when none is given) or a
method without one (houlsby, bitfit, linear_probe, full), and the values listed for some of its
config arguments. Inside the sweep a method is a PEFT method and its structure
(``surm.peft.spec.from_family``). ``lr`` and ``head_lr`` are *tuned* axes: their values are
tried and one is chosen on validation (``surm.sweep.selection``; ``head_lr=lr`` trains the head at each lr tried);
every other key (rank, block_size, form, factors, alpha,
...) is a hyper-parameter of the method, each combination a method of its own.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Mapping, Sequence

from absl import flags
from ml_collections import config_flags

from surm import data, peft, structured

#: the config arguments a grid tunes (chosen on validation) rather than compares
TUNED = ("lr", "head_lr")
TIED = "lr"  # head_lr=lr: the head trains at each tried lr


class SweepError(ValueError):
    """A grid, budget or root that cannot work; the message says how to fix it."""


def parse_value(text: str) -> Any:
    """'4' -> 4, '0.5' -> 0.5, '16x48' -> (16, 48), anything else stays a string."""
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    parts = text.split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return tuple(int(p) for p in parts)
    return text


def format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_hparams(hparams: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in sorted(hparams.items()))


@dataclasses.dataclass(frozen=True)
class FamilyGrid:
    """One --families item: a family and the values listed for some of its config arguments."""

    name: str
    values: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def _product(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        chosen = [(k, v) for k, v in self.values if k in keys]
        return [dict(zip([k for k, _ in chosen], combo))
                for combo in itertools.product(*(v for _, v in chosen))]

    def combos(self) -> list[dict[str, Any]]:
        """Every combination of the method's hyper-parameters (the tuned axes left out)."""
        return self._product([k for k, _ in self.values if k not in TUNED])

    def tuned(self) -> list[dict[str, Any]]:
        """Every combination of the listed tuned values ([{}] when none is listed);
        ``head_lr=lr`` ties the head's lr to each listed lr."""
        combos = self._product(TUNED)
        for combo in combos:
            if combo.get("head_lr") == TIED:
                if "lr" not in combo:
                    raise SweepError(f"{self.name}: head_lr=lr ties the head's lr to the lr "
                                     f"values, but the item lists no lr")
                combo["head_lr"] = combo["lr"]
        return combos

    @property
    def tuned_values(self) -> dict[str, tuple[Any, ...]]:
        return {k: v for k, v in self.values if k in TUNED}


def parse_family(item: str) -> FamilyGrid:
    name, *assignments = item.strip().split(":")
    if name not in structured.FAMILIES + peft.BASELINES:
        raise SweepError(f"unknown family {name!r} in --families item {item!r}; choose from "
                         f"{', '.join(structured.FAMILIES + peft.BASELINES)}")
    values = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key or not text:
            raise SweepError(f"--families item {item!r}: {assignment!r} is not KEY=V1;V2..., "
                             f"e.g. lowrank:rank=1;4;8 or circulant:lr=1e-3;1e-2")
        listed = tuple(parse_value(v) for v in text.split(";") if v.strip())
        if not listed:
            raise SweepError(f"--families item {item!r}: no values listed for {key.strip()!r}")
        tied = key.strip() == "head_lr" and listed == (TIED,)
        if key.strip() in TUNED and not tied and not all(
                isinstance(v, (int, float)) and v > 0 for v in listed):
            raise SweepError(f"--families item {item!r}: {key.strip()} values must be positive "
                             f"numbers (or head_lr=lr: the head at each lr), got {text!r}")
        values[key.strip()] = listed
    return FamilyGrid(name, tuple(values.items()))


def parse_families(specs: Iterable[str]) -> list[FamilyGrid]:
    return [parse_family(item) for spec in specs for item in spec.split(",") if item.strip()]


def parse_assignments(text: str, what: str) -> dict[str, str]:
    """'k=v,k=v' -> {k: v} (values kept as text)."""
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"{what} item {item!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


@dataclasses.dataclass(frozen=True)
class Grid:
    """What a sweep runs: config file, shared arguments, methods, modes, seeds, datasets.

    ``tune_seed``: when set, the tuned axes (lr, head_lr) are searched on that seed alone and
    the other seeds run only at the values it chose; otherwise every seed searches them."""

    config: str
    base: tuple[tuple[str, str], ...] = ()
    families: tuple[FamilyGrid, ...] = ()
    modes: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    datasets: tuple[str, ...] | None = None
    dataset_arg: str = "dataset"
    sets: tuple[tuple[str, str], ...] = ()
    tune_seed: int | None = None

    def __post_init__(self):
        for mode in self.modes or ():
            if mode not in peft.MODES:
                raise SweepError(f"--modes: unknown mode {mode!r}; choose from {peft.MODES}")
        if not self.families:
            raise SweepError("no families to sweep: give --families, e.g. "
                             "--families circulant,lowrank:rank=4")
        if self.tune_seed is not None and self.tune_seed not in (self.seeds or ()):
            raise SweepError(f"--tune_seed {self.tune_seed} is not one of --seeds "
                             f"{list(self.seeds or [])}: tune on one of the seeds you run")


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of a grid: the PEFT method (None: the config's own, lora or adapter, for a
    structure), its structure (None for houlsby, bitfit, probe, full), hyper-parameters, and the
    values of the tuned axes this run takes."""

    method: str | None
    structure: str | None
    hparams: Mapping[str, Any]
    tuned: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def item(self) -> str:
        """The --families item it came from (the configs' ``family``)."""
        return peft.spec.to_family(self.method, self.structure)[0]

    def config_args(self) -> dict[str, str]:
        family, mode = peft.spec.to_family(self.method, self.structure)
        args = {"family": family,
                **{k: format_value(v) for k, v in {**self.hparams, **self.tuned}.items()}}
        if mode is not None:
            args["mode"] = mode
        return args


def methods_for(item: str, modes: Sequence[str] | None) -> list[tuple[str | None, str | None]]:
    """The (method, structure) pairs a --families item runs: a structure by each of ``modes``
    (None: the config's own), a method without one by itself."""
    if item in peft.BASELINES:
        return [peft.spec.from_family(item)]
    return [(mode, item) for mode in (modes or [None])]


def grid_methods(grid: Grid, *, tuned: bool = True) -> list[Method]:
    """Every method x hyper-parameters (x tuned values, unless ``tuned=False``)."""
    return [Method(method, structure, hp, t) for fam in grid.families
            for method, structure in methods_for(fam.name, grid.modes) for hp in fam.combos()
            for t in (fam.tuned() if tuned else [{}])]


# ---- configs ------------------------------------------------------------------------------------

def train_config_flags(config_file: str, args: str, sets: Iterable[tuple[str, str]]) -> list[str]:
    """The --config flags of ``python -m surm.train`` for FILE:ARGS and --config.K=V overrides."""
    return ([f"--config={config_file}:{args}" if args else f"--config={config_file}"]
            + [f"--config.{k}={v}" for k, v in sets])


def load_config(config_file: str, args: str | Mapping[str, Any] = "",
                sets: Iterable[tuple[str, str]] = ()):
    """The ConfigDict ``surm.train`` gets for --config FILE:ARGS --config.K=V...

    Same absl/ml_collections parsing as the trainer, so anything the trainer rejects fails here."""
    if not isinstance(args, str):
        args = ",".join(f"{k}={format_value(v)}" for k, v in args.items())
    argv = ["sweep", *train_config_flags(config_file, args, sets)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                    sys_argv=argv)
    try:
        values(argv)
        return values.config
    except (AttributeError, KeyError) as e:  # an override of an entry the config lacks
        while e.args and isinstance(e.args[0], BaseException):  # ml_collections nests them
            e = e.args[0]
        raise SweepError(f"the config has no entry {' '.join(str(e.args[0]).split())}") from None
    except (flags.Error, OSError, ValueError, TypeError) as e:
        raise SweepError(last_line(str(e))) from None


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


#: a row's structure for a method without one (houlsby, bitfit, probe, full)
NO_STRUCTURE = "-"


def structure_of(text: str) -> str | None:
    """A row's structure, None for a method without one (``NO_STRUCTURE``, or empty)."""
    return None if text in (NO_STRUCTURE, "") else text


def describe(config) -> dict:
    """What names a run: dataset, method, structure ('-': none), hparams, lr, head_lr, seed, and
    its headline metric (all read from the resolved config, so defaults are recorded too)."""
    spec = peft.config_to_spec(config.peft)
    dataset = config.input.dataset
    opt = config.optimizer
    return {"dataset": dataset, "method": spec.method, "structure": spec.structure or NO_STRUCTURE,
            "hparams": format_hparams(spec.method_hparams),
            "lr": float(opt.lr), "head_lr": float(opt.get("head_lr") or opt.lr),
            "seed": config.seed, "metric": _metric(config)}


def _metric(config) -> str:
    """The run's headline metric: the dataset's first, or perplexity for a causal LM."""
    from surm import lm, models
    if models.is_causal_lm(models.get(config.model.name)):
        return lm.METRIC
    return data.get_spec(config.input.dataset).metrics[0]
