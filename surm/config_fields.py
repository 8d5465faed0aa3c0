"""Every field a training config may hold, in one table: its type, its domain, whether it
may differ when a run resumes from its workdir, and, for the optional ones, the value a config
that leaves it out runs with (``complete``: the only defaults the trainer knows).

``check(config)`` refuses a config with one line naming the field, the bad value and a good one,
before the trainer loads anything or writes anything; ``resume_changes(old, new)`` says which
differences between a workdir's ``config.json`` and a new config the resumed run may take:

- ``FREE``: how the run is computed or logged, not what it computes (the mesh, the lora path,
  eval batch size, logging and checkpoint cadence, where the data lies): taken silently;
- ``ON_REQUEST``: what the run computes, changed on purpose (``total_steps`` to extend a run,
  the learning rates after a divergence, how often it validates): taken only when named in
  ``allow`` (``python -m surm.train --allow_resume_change=total_steps``);
- every other field (the model, the PEFT method, the data, the seed, the optimizer's other
  numbers): a resumed run must have the same value.

A field's domain is checked here where it is a plain type and range; what only its owner knows
(a dataset's or a model's name, a target rule, a family's hyper-parameters) is checked by the
owner, also before anything is written (``surm.train.check_config``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Iterator, Mapping

FREE, ON_REQUEST, FIXED = "free", "on request", "fixed"
_BIG = 10 ** 9  # steps, examples: anything above is a typo
_FLOAT32_MAX = 3.4028234663852886e38


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: ``kind`` int, float, bool, str, pair (two numbers) or list (of
    strings); numbers within [low, high] (``open_high``: high excluded); ``choices`` for
    strings; ``none``: may be None; ``example``: a good value, for the error message."""

    kind: str
    low: float | None = None
    high: float | None = None
    open_high: bool = False
    choices: tuple[str, ...] = ()
    none: bool = False
    resume: str = FIXED
    example: str = ""
    default: Any = dataclasses.field(default=None, compare=False)
    optional: bool = False  # a config may leave it out: ``complete`` fills in ``default``
    legacy_bool: bool = False  # an int that older configs wrote as true/false (still read)

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value``, or None."""
        if value is None:
            return None if self.none else "is required"
        if self.kind == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if self.legacy_bool and isinstance(value, bool):
            return None
        if self.kind == "str":
            if not isinstance(value, str):
                return "must be text"
            if self.choices and value not in self.choices:
                return f"must be one of {', '.join(self.choices)}"
            return None
        if self.kind == "list":
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            return None if ok else "must be a list of names"
        if self.kind == "pair":
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                return "must be two numbers"
            return next(filter(None, (self._number(v) for v in value)), None)
        return self._number(value)

    def _number(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {'an integer' if self.kind == 'int' else 'a number'}"
        if self.kind == "int" and not isinstance(value, int):
            return "must be an integer"
        if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            return "must be a finite number"
        if self.low is not None and value < self.low:
            return f"must be at least {self.low:g}"
        if self.high is not None and (value >= self.high if self.open_high else
                                      value > self.high):
            return f"must be {'below' if self.open_high else 'at most'} {self.high:g}"
        return None


def _int(low, high=_BIG, **kw) -> Field:
    return Field("int", low, high, **kw)


def _float(low=None, high=None, **kw) -> Field:
    return Field("float", low, high, **kw)


def _str(*choices: str, **kw) -> Field:
    return Field("str", choices=choices, **kw)


def _bool(**kw) -> Field:
    return Field("bool", **kw)


FIELDS: dict[str, Field] = {
    "seed": _int(0, 2 ** 31 - 1, example="0"),
    "total_steps": _int(1, resume=ON_REQUEST, example="600"),
    "eval_every": _int(0, resume=ON_REQUEST, example="300 (0: only the final test)"),
    "eval_at_start": _bool(resume=ON_REQUEST, example="false", optional=True, default=False),
    "ckpt_every": _int(1, resume=FREE, example="300"),
    "keep_checkpoints": _int(1, 10 ** 6, resume=FREE, example="2", optional=True, default=2),
    "restore_step": _int(0, resume=FREE, example="0 (the latest)", optional=True,
                         default=0),
    "log_every": _int(1, resume=FREE, example="20", optional=True, default=20),
    # model: the registry entry and the model module check names, checkpoints, poolings
    "model.name": _str(example="bert"),
    "model.checkpoint": _str(example="minilm_l6"),
    "model.dtype": _str("float32", "bfloat16", "float16", example="float32"),
    "model.pooling": _str("pooler", "cls", "mean", example="mean"),
    "model.classifier": _str("token", "gap", example="token"),
    "model.variant": _str(example="B/16"),
    "model.image_size": _int(1, 100_000, example="224"),
    "model.depth": _int(1, 10_000, example="12"),
    # input
    "input.dataset": _str(example="tweet_sentiment"),
    "input.data_dir": _str(resume=FREE, example="~/tensorflow_datasets", optional=True,
                           default=""),
    "input.batch_size": _int(1, 10 ** 7, example="32"),
    "input.eval_batch_size": _int(1, 10 ** 7, resume=FREE, example="128", optional=True,
                                  default=128),
    "input.max_length": _int(2, 10 ** 7, example="64"),
    "input.shots": _int(0, example="0 (all)", optional=True, default=0),
    "input.validation_examples": _int(0, example="0 (all)", optional=True, default=0),
    "input.test_examples": _int(0, example="0 (all)", optional=True, default=0),
    "input.num_workers": _int(0, 1024, resume=FREE, example="0", optional=True, default=0),
    "input.normalization": _str("minus_one_to_one", "zero_one", "imagenet",
                                example="minus_one_to_one", optional=True,
                                default="minus_one_to_one"),
    "input.crop_scale": Field("pair", 1e-6, 1.0, none=True, example="0.08,1.0", optional=True),
    "input.hflip": _bool(example="true", optional=True, default=False),
    "input.central_crop": _float(1e-6, 1.0, none=True, example="0.875", optional=True),
    "input.prompt_template": _str(example="'{prompt}'", optional=True, default="{prompt}"),
    # peft: the spec checks the method, its structure, targets and hyper-parameters
    "peft.method": _str(example="lora"),
    "peft.structure": _str(none=True, example="circulant"),
    "peft.targets": _str(example="query,value"),
    "peft.scale": _float(-1e6, 1e6, example="1.0"),
    "peft.alpha": _float(1e-12, 1e6, none=True, example="16"),
    "peft.learn_scale": _bool(example="false"),
    "peft.dropout": _float(0.0, 1.0, open_high=True, example="0.1"),
    "peft.activation": _str("gelu", "relu", "tanh", "identity", example="gelu"),
    "peft.train_bias": _bool(example="false"),
    "peft.train_layernorm": _bool(example="false"),
    "peft.train_extra": Field("list", example="ln_f"),
    "peft.heads": Field("list", example="head"),
    "peft.lora_path": _str("auto", "structured", "dense", "mixed", resume=FREE, example="auto",
                            optional=True, default="auto"),
    # optimizer (surm.optim)
    "optimizer.name": _str("adamw", "sgd", example="adamw"),
    # a huge lr is legal: the run stops at the first NaN (surm.train)
    "optimizer.lr": _float(1e-30, None, resume=ON_REQUEST, example="1e-3"),
    "optimizer.head_lr": _float(0.0, None, resume=ON_REQUEST, none=True,
                                example="1e-3"),
    "optimizer.lr_from": _str(resume=FREE, example="config arguments"),
    "optimizer.weight_decay": _float(0.0, 1e6, example="0.01"),
    "optimizer.b1": _float(0.0, 1.0, open_high=True, example="0.9"),
    "optimizer.b2": _float(0.0, 1.0, open_high=True, example="0.999"),
    "optimizer.momentum": _float(0.0, 1.0, example="0.9"),
    "optimizer.grad_clip": _float(1e-12, 1e12, example="1.0"),
    "optimizer.schedule": _str("linear", "cosine", "constant", resume=ON_REQUEST,
                               example="linear"),
    "optimizer.warmup_frac": _float(0.0, 1.0, resume=ON_REQUEST, example="0.06"),
    # the device mesh (surm.sharding)
    "mesh.data": _int(-1, 1_000_000, resume=FREE, example="-1 (every device)"),
    "mesh.model": _int(1, 1_000_000, resume=FREE, example="1"),
    # -1: every device the others leave; an older config's true/false is -1/1 (``complete``)
    "mesh.fsdp": _int(-1, 1_000_000, resume=FREE, example="8 (1: no FSDP)", optional=True,
                      default=1, legacy_bool=True),
}
# Subtrees whose keys belong to their owner: a family's hyper-parameters (the PEFT spec), a
# random model's architecture (the model's config class); checked when those are built, still
# before anything is written.
OWNED = ("peft.hparams", "model.bert", "model.llama")
# A model of your own (surm.models.register) may read fields of its own under ``model.``: not
# in the table, they are its entry's to check (and never change on resume).
MODEL_OWNED = "model."


class ConfigError(ValueError):
    """A config that cannot run; the message is one line saying which field and how to fix
    it."""


def leaves(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested config (a ConfigDict or dicts); the
    subtrees in OWNED are one leaf each."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items") and name not in OWNED:
            yield from leaves(value, name + ".")
        else:
            yield name, value.to_dict() if hasattr(value, "to_dict") else value


def check(config: Mapping[str, Any]) -> None:
    """Raises ConfigError for the first field that is unknown or outside its domain."""
    for key, value in leaves(config):
        if key in OWNED:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}={value!r} must be a mapping of hyper-parameters")
            continue
        field = FIELDS.get(key)
        if field is None and key.startswith(MODEL_OWNED):
            continue  # a registered model's own field: its entry checks it when it builds
        if field is None:
            raise ConfigError(f"unknown config field {key!r}; the fields a config may hold "
                              f"are listed in surm/config_fields.py")
        why = field.problem(value)
        if why:
            raise ConfigError(f"{key}={_show(value)} {why}; set e.g. --config.{key}="
                              f"{field.example}")


def complete(config: Mapping[str, Any]) -> Any:
    """A copy of ``config`` with every optional field it leaves out set to its default (of a
    block it has: a ``model`` block gains no image size), so that the trainer reads fields,
    never guesses them."""
    import ml_collections
    d = config.to_dict() if hasattr(config, "to_dict") else json_copy(config)
    for key, field in FIELDS.items():
        if not field.optional:
            continue
        *parents, leaf = key.split(".")
        node = d
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = field.default
    mesh = d.get("mesh")
    if isinstance(mesh, dict) and isinstance(mesh.get("fsdp"), bool):  # an older config's
        mesh["fsdp"] = -1 if mesh["fsdp"] else 1
    return ml_collections.ConfigDict(d)


def json_copy(config: Mapping[str, Any]) -> dict:
    return {k: json_copy(v) if isinstance(v, Mapping) else v for k, v in config.items()}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resume_changes(old: Mapping[str, Any], new: Mapping[str, Any],
                   allow: Iterable[str] = ()) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(taken, refused): the fields whose values differ between a workdir's config (``old``)
    and ``new``, as {key: (old, new)}, split into those a resumed run may take (FREE, and
    ON_REQUEST when in ``allow``) and those it may not."""
    allow = set(allow)
    # a field a config leaves out is its default
    a, b = dict(leaves(complete(old))), dict(leaves(complete(new)))
    taken, refused = {}, {}
    for key in sorted(set(a) | set(b)):
        if _same(a.get(key), b.get(key)):
            continue
        field = FIELDS.get(key)
        resume = field.resume if field else FIXED
        ok = resume == FREE or (resume == ON_REQUEST and key in allow)
        (taken if ok else refused)[key] = (a.get(key), b.get(key))
    return taken, refused


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON holds them (a tuple and a list alike)."""
    norm = lambda v: list(map(norm, v)) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return norm(a) == norm(b)


def resumable_on_request() -> list[str]:
    return sorted(k for k, f in FIELDS.items() if f.resume == ON_REQUEST)
