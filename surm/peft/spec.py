"""What to fine-tune: the PEFT spec and the target rules over '/'-joined parameter paths.

A spec names a *method*, the *structure* of its matrices, the modules it targets and what else
trains:

    method        lora      y = x W0 + scale * S(x)   (S starts at 0)           surm.peft.methods
                  adapter   after a sublayer's output projection h <- h + act(S(h)) + b
                  houlsby   the bottleneck adapter (dense down/up projections, rank=...)
                  bitfit    the biases train; probe: the head alone; full: every weight
    structure     a family of ``surm.structured.FAMILIES`` (``lowrank`` is LoRA) for lora and
                  adapter; none for the others
    hparams       the structure's hyper-parameters, e.g. {"rank": 4} or {"block_size": 96}
    targets       rules selecting linear modules by path (see ``match_targets``)
    patterns      per-target settings, like PEFT's rank_pattern: {rule: {"structure": ...,
                  <hyper-parameter>: ..., "scale": ..., "alpha": ...}}; the first rule that
                  matches a target wins and replaces the spec's values it names (a new
                  structure starts from its own default hyper-parameters)
    heads         rules naming the modules that train in full as output layers (default: the
                  top-level ``head`` or ``classifier``). ``()`` says the model has none; with
                  the default rules, a model with no such module gets a warning naming its
                  likely output layers
    scale         the lora update's multiplier s in y = x W0 + s S(x) (default 1)
    alpha         instead of scale, LoRA's convention: s = alpha / rank (structures with a rank:
                  lowrank, kronecker, ldr), as LoRA and the SURM authors' Kronecker LoRA use it

The configs' arguments and files written by older versions (stored configs, adapter folders,
sweep records) speak of a ``family`` (a structure, or one of houlsby, bitfit, ``linear_probe``,
full) and a ``mode`` (lora or adapter); ``from_family`` is the one place that vocabulary is read.

Target rules, tried against every linear module path (a module owning a ``kernel``):
    a preset name ("qv", "qkv", "qkvo", "mlp", "all-linear", "houlsby"), an exact path, a suffix
    of whole path segments ("attention/self/query"), or ``re:<regex>`` matched against the full
    path. A rule that matches nothing is an error listing the available paths.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterable, Mapping

from surm import structured
from surm.peft import methods

RANKED = ("lowrank", "kronecker", "ldr")  # the families whose update alpha / rank can scale
MODES = ("lora", "adapter")
ACTIVATIONS = ("gelu", "relu", "tanh", "identity")

# Target presets name roles (q, k, v, the attention output o, the MLP's input and output);
# which layers play a role is what each registered model says (``ModelEntry.target_names``:
# surm.models), and, for any Flax model, the names Flax code commonly gives them (flax.linen's
# own attention, an ``attn``/``attention`` module's query/key/value/out, an ``mlp`` module's
# fc1/fc2 or Dense_0/Dense_1).
ROLES = ("q", "k", "v", "o", "mlp_in", "mlp_out")
PRESET_ROLES: dict[str, tuple[str, ...]] = {
    "qv": ("q", "v"),
    "qkv": ("q", "k", "v"),
    "qkvo": ("q", "k", "v", "o"),
    "mlp": ("mlp_in", "mlp_out"),
    "all-linear": ROLES,
    # Houlsby placement: after the attention-output and the MLP-output projections.
    "houlsby": ("o", "mlp_out"),
}
_ATTN = r"(MultiHeadDotProductAttention_\d+|attn|attention|self_attn|self_attention)"
FLAX_NAMES = {"q": (_ATTN + "/(query|q_proj|q)",), "k": (_ATTN + "/(key|k_proj|k)",),
              "v": (_ATTN + "/(value|v_proj|v)",), "o": (_ATTN + "/(out|o_proj|out_proj)",),
              "mlp_in": (r"(mlp|MlpBlock_\d+)/(fc1|Dense_0|dense_0|wi|wi_0|wi_1|c_fc)",),
              "mlp_out": (r"(mlp|MlpBlock_\d+)/(fc2|Dense_1|dense_1|wo|c_proj)",)}


def role_patterns() -> dict[str, str]:
    """{role: one regex of the paths of the layers that play it}: flax.linen's attention names
    and every registered model's (``surm.models.register`` adds a model's own)."""
    from surm import models  # models lie below peft; their entries name their layers
    names = {role: list(FLAX_NAMES.get(role, ())) for role in ROLES}
    for model in models.names():
        for role, patterns in models.get(model).target_names.items():
            names[role] += [p for p in patterns if p not in names[role]]
    return {role: r"(.*/)?(" + "|".join(names[role]) + ")" for role in ROLES if names[role]}


def presets() -> dict[str, tuple[str, ...]]:
    """{preset: the regexes of its roles} (``role_patterns``)."""
    regex = role_patterns()
    return {preset: tuple(regex[r] for r in roles if r in regex)
            for preset, roles in PRESET_ROLES.items()}


# Megatron-style tensor parallelism pairs them: the layers that start a block split their
# outputs, the ones that end it their inputs (surm.sharding).
COLUMN_ROLES, ROW_ROLES = ("q", "k", "v", "mlp_in"), ("o", "mlp_out")


def tensor_parallel_patterns() -> tuple[str, str]:
    """(column, row): one regex each of the layers that split their outputs / inputs."""
    regex = role_patterns()
    return tuple("|".join(f"(?:{regex[r]})" for r in roles if r in regex)
                 for roles in (COLUMN_ROLES, ROW_ROLES))


def __getattr__(name: str):
    if name == "PRESETS":  # computed: registered models add their names
        return presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


HEAD_NAMES = ("head", "classifier")
_LAYERNORM = re.compile(r"(.*/)?(LayerNorm(_\d+)?|encoder_norm)/(scale|bias)")


METHODS = ("lora", "adapter", "houlsby", "bitfit", "probe", "full")
STRUCTURED_METHODS = ("lora", "adapter")  # the methods whose matrices have a structure
# the older ``family`` names of the methods that are not a structure
_METHOD_OF_FAMILY = {"houlsby": "houlsby", "bitfit": "bitfit", "linear_probe": "probe",
                     "full": "full"}
_FAMILY_OF_METHOD = {v: k for k, v in _METHOD_OF_FAMILY.items()}
# the ``family=`` names (config arguments, a sweep's --families) of the methods without a structure
BASELINES = tuple(_METHOD_OF_FAMILY)


def from_family(family: str, mode: str | None = None) -> tuple[str, str | None]:
    """``(method, structure)`` of the configs' vocabulary: ``family`` a structure (its method is
    ``mode``, lora by default) or a method without one (houlsby, bitfit, ``linear_probe``: the
    probe, full). Config arguments and files of older versions are read through it, and only
    they."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"peft mode must be one of {MODES}, got {mode!r}")
    if family in _METHOD_OF_FAMILY:
        if mode == "lora" and family == "houlsby":
            raise ValueError("houlsby is an adapter: use mode=adapter")
        return _METHOD_OF_FAMILY[family], None
    return mode or "lora", family


def to_family(method: str | None, structure: str | None) -> tuple[str, str | None]:
    """The config arguments ``(family, mode)`` that say ``method`` and ``structure`` (mode None:
    the config's own; ``method`` None with a structure leaves it to the config): the inverse of
    ``from_family``, for the configs' command lines."""
    if structure is not None:
        return structure, method
    if method not in _FAMILY_OF_METHOD:
        raise ValueError(f"method {method!r} needs a structure (one of "
                         f"{', '.join(structured.FAMILIES)})")
    return _FAMILY_OF_METHOD[method], "adapter" if method == "houlsby" else None


def upgrade(block: Mapping[str, Any]) -> dict[str, Any]:
    """A peft block (a config's, a spec's JSON) written in the older vocabulary (family, mode)
    in method and structure; a block already in them comes back as it was."""
    d = dict(block)
    if "family" not in d and "mode" not in d:
        return d
    if "method" in d or "structure" in d:
        raise ValueError("a peft block gives family/mode or method/structure, not both")
    if d.get("family") is None:
        raise ValueError(f"a peft block with mode={d.get('mode')!r} names no family; give "
                         f"method and structure")
    d["method"], d["structure"] = from_family(d.pop("family"), d.pop("mode", None))
    return d


# what a per-target pattern may set besides the structure's hyper-parameters
_PATTERN_KEYS = ("structure", "scale", "alpha")


@dataclasses.dataclass(frozen=True)
class Target:
    """The settings of one targeted module: the spec's, with the first matching pattern's."""

    structure: str | None
    hparams: tuple[tuple[str, Any], ...]
    scale: float = 1.0
    alpha: float | None = None

    @property
    def update_scale(self) -> float:
        """The multiplier of the update: ``alpha / rank`` when alpha is set, else ``scale``."""
        if self.alpha is not None:
            return float(self.alpha) / dict(self.hparams)["rank"]
        return float(self.scale)


def _check_scaling(where: str, structure: str | None, hparams: Mapping, scale: float,
                   alpha: float | None) -> None:
    if alpha is None:
        return
    if structure not in RANKED or "rank" not in hparams:
        raise ValueError(f"{where}: alpha (scale = alpha / rank) needs a family with an "
                         f"explicit rank ({', '.join(RANKED)}), not {structure!r} with hparams "
                         f"{dict(hparams)}; set scale instead")
    if scale != 1.0:
        raise ValueError(f"{where}: give alpha or scale, not both (alpha={alpha}, scale={scale})")
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"{where}: alpha must be a positive number, got {alpha!r}")


@dataclasses.dataclass(frozen=True)
class PeftSpec:
    method: str = "lora"
    structure: str | None = "circulant"
    hparams: tuple[tuple[str, Any], ...] = ()
    targets: tuple[str, ...] = ("qv",)
    patterns: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    heads: tuple[str, ...] | None = None
    scale: float = 1.0
    alpha: float | None = None
    learn_scale: bool = False
    dropout: float = 0.0
    activation: str = "gelu"
    init: str = "zero"
    train_bias: bool = False
    train_layernorm: bool = False
    train_extra: tuple[str, ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown peft method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")
        if self.method in STRUCTURED_METHODS:
            if self.structure not in structured.FAMILIES:
                raise ValueError(f"unknown peft structure {self.structure!r} for method "
                                 f"{self.method!r}; choose a structured family "
                                 f"({', '.join(structured.FAMILIES)}), or a method without "
                                 f"one ({', '.join(m for m in METHODS if m not in STRUCTURED_METHODS)})")
        elif self.structure is not None:
            raise ValueError(f"method {self.method!r} has no structure (got "
                             f"{self.structure!r}); structures go with lora or adapter")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"peft activation must be one of {ACTIVATIONS}, got "
                             f"{self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft dropout must be in [0, 1), got {self.dropout}")
        if self.method == "houlsby" and "rank" not in dict(self.hparams):
            raise ValueError("houlsby needs hparams rank=<bottleneck size>, e.g. rank=8")
        _check_scaling("peft", self.structure, dict(self.hparams), self.scale, self.alpha)
        for rule in (*self.targets, *(r for r, _ in self.patterns), *(self.heads or ())):
            if rule.startswith("re:"):
                try:
                    re.compile(rule[3:])
                except re.error as e:
                    raise ValueError(f"target rule {rule!r} is not a valid regex: {e}") from None
        for rule, settings in self.patterns:
            if self.method not in STRUCTURED_METHODS:
                raise ValueError(f"peft patterns set per-target structures; method "
                                 f"{self.method!r} has none")
            self.target(rule, settings=dict(settings))  # validates it

    @classmethod
    def create(cls, **kw: Any) -> "PeftSpec":
        """From plain values (a config dict): hparams and patterns as dicts, targets and heads
        as lists or comma-separated strings. In adapter mode (and for houlsby) the default targets are the
        Houlsby placement."""
        kw = dict(kw)
        if "family" in kw or "mode" in kw:
            hint = ""
            try:
                method, structure = from_family(kw.get("family"), kw.get("mode"))
                hint = f": method={method!r}" + (f", structure={structure!r}" if structure else "")
            except (ValueError, TypeError):
                pass
            raise ValueError(f"PeftSpec takes method and structure, not family/mode (the "
                             f"configs' arguments){hint}")
        if kw.get("method") not in STRUCTURED_METHODS and "method" in kw:
            kw.setdefault("structure", None)
        hp = kw.pop("hparams", None) or {}
        kw["hparams"] = _sorted_items(hp)
        patterns = kw.pop("patterns", None) or {}
        if not isinstance(patterns, Mapping):
            patterns = dict(patterns)
        kw["patterns"] = tuple((str(rule), _sorted_items(settings))
                               for rule, settings in patterns.items())
        targets = kw.pop("targets", None)
        if targets is None or targets == "":
            targets = methods.get(kw.get("method", "lora")).default_targets
        kw["targets"] = _rules(targets)
        if kw.get("heads") is not None:
            kw["heads"] = _rules(kw["heads"])
        kw["train_extra"] = _rules(kw.get("train_extra") or ())  # "ln_f,wte" or a list
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ValueError(f"unknown peft option(s) {unknown}; known: "
                             f"{sorted(known)}")
        return cls(**kw)

    @property
    def label(self) -> str:
        """The method and its structure, for messages: 'lora circulant', 'houlsby'."""
        return f"{self.method} {self.structure}" if self.structure else self.method

    # ---- per target ----------------------------------------------------------------------------
    def target(self, path: str, settings: Mapping[str, Any] | None = None) -> Target:
        """The settings of the targeted module at ``path``: the first pattern whose rule
        matches it, over the spec's (``settings`` instead of the patterns: check one)."""
        if settings is None:
            settings = next((dict(s) for rule, s in self.patterns if rule_selects(rule, path)),
                            {})
        if not settings:
            return Target(self.structure, self.hparams, self.scale, self.alpha)
        settings = dict(settings)
        structure = settings.pop("structure", self.structure)
        if structure not in structured.FAMILIES:
            raise ValueError(f"peft pattern for {path!r}: unknown structure {structure!r}; "
                             f"known: {', '.join(structured.FAMILIES)}")
        hp = {} if structure != self.structure else dict(self.hparams)
        given_scale, given_alpha = "scale" in settings, "alpha" in settings
        scale = float(settings.pop("scale", 1.0 if given_alpha else self.scale))
        alpha = settings.pop("alpha", None)
        hp.update(settings)
        if not (given_scale or given_alpha) and "rank" in hp:
            alpha = self.alpha  # the spec's alpha / rank, at this target's rank
        _check_scaling(f"peft pattern for {path!r}", structure, hp, scale, alpha)
        return Target(structure, _sorted_items(hp), scale, alpha)

    @property
    def update_scale(self) -> float:
        """The spec's own update multiplier (patterns may set others: ``target(path)``)."""
        return Target(self.structure, self.hparams, self.scale, self.alpha).update_scale

    @property
    def method_hparams(self) -> dict[str, Any]:
        """The family's hyper-parameters and the update's scale knobs, where set: what tells
        two runs of one family apart as methods."""
        out = dict(self.hparams)
        if self.alpha is not None:
            out["alpha"] = self.alpha
        if self.scale != 1.0:
            out["scale"] = self.scale
        return out

    @property
    def head_rules(self) -> tuple[str, ...]:
        return HEAD_NAMES if self.heads is None else self.heads

    @property
    def is_structured(self) -> bool:
        return self.method in STRUCTURED_METHODS

    @property
    def has_adapters(self) -> bool:
        return methods.get(self.method).adapters

    @property
    def mergeable(self) -> bool:
        return methods.get(self.method).mergeable

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PeftSpec":
        """A spec from ``to_json``'s text, or from the older files (family and mode)."""
        d = upgrade(json.loads(text))
        d["hparams"] = {k: v for k, v in d["hparams"]}
        d["patterns"] = {rule: {k: v for k, v in s} for rule, s in d.get("patterns") or ()}
        return cls.create(**d)


def _sorted_items(d: Mapping[str, Any] | Iterable) -> tuple[tuple[str, Any], ...]:
    d = dict(d) if not isinstance(d, Mapping) else d
    return tuple(sorted((k, _hashable(v)) for k, v in d.items() if v is not None))


def _rules(rules: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(rules, str):
        return tuple(t.strip() for t in rules.split(",") if t.strip())
    return tuple(rules)


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


def expand_rules(rules: Iterable[str]) -> list[tuple[str, str]]:
    """(rule as written, pattern) pairs; presets expand to their regexes."""
    out = []
    for rule in rules:
        if rule in PRESET_ROLES:
            out += [(rule, "re:" + pattern) for pattern in presets()[rule]]
        else:
            out.append((rule, rule))
    return out


def rule_matches(pattern: str, path: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return path == pattern or path.endswith("/" + pattern)


def rule_selects(rule: str, path: str) -> bool:
    """Whether one rule as written (a preset, a path, a suffix, ``re:...``) selects ``path``."""
    return any(rule_matches(pattern, path) for _, pattern in expand_rules([rule]))


def _under(rules: Iterable[str], path: str) -> bool:
    """Whether a rule matches ``path`` or one of its ancestors (a module owning it)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]
    return any(rule_matches(pattern, p) for _, pattern in expand_rules(rules) for p in prefixes)


def match_targets(rules: Iterable[str], linear_paths: Iterable[str],
                  heads: Iterable[str] = HEAD_NAMES) -> list[str]:
    """The linear module paths selected by the rules, in tree order.

    ValueError if a rule matches nothing (listing the available paths) or if a head is
    targeted (heads train in full)."""
    paths = list(linear_paths)
    selected: set[str] = set()
    for rule in dict.fromkeys(r for r, _ in expand_rules(rules)):
        hits = {p for r, pattern in expand_rules([rule]) for p in paths
                if rule_matches(pattern, p)}
        if not hits:
            shown = "\n  ".join(paths[:40]) + ("\n  ..." if len(paths) > 40 else "")
            raise ValueError(f"target rule {rule!r} matches no linear module (for layers "
                             f"under nn.scan, Einsum or DenseGeneral, pass "
                             f"layers=peft.layers.trace(model, params, *inputs)). Available "
                             f"paths ({len(paths)}):\n  {shown}")
        selected |= hits
    heads = tuple(heads)
    targeted_heads = sorted(p for p in selected if _under(heads, p))
    if targeted_heads:
        raise ValueError(f"target rules select the head(s) {targeted_heads} (peft heads "
                         f"{list(heads)}); a head always trains in full: target other modules, or "
                         f"set peft heads to the modules that are the model's output layers")
    return [p for p in paths if p in selected]


def is_head(spec: PeftSpec, path: str) -> bool:
    """Whether the base parameter at ``path`` belongs to a module of the spec's heads."""
    return _under(spec.head_rules, path)


def trains_in_full(spec: PeftSpec, path: str) -> bool:
    """Whether the base parameter at ``path`` (e.g. 'head/kernel') is trainable."""
    if methods.get(spec.method).trains(spec, path) or is_head(spec, path):
        return True
    if spec.train_bias and path.rsplit("/", 1)[-1] == "bias":
        return True
    if spec.train_layernorm and _LAYERNORM.fullmatch(path):
        return True
    return any(rule_matches(pattern, path) or rule_matches(pattern, path.rsplit("/", 1)[0])
               for _, pattern in expand_rules(spec.train_extra))


def config_to_spec(cfg: Mapping[str, Any]) -> PeftSpec:
    """A spec from the ``peft`` block of a config (a ConfigDict or a dict). Its ``lora_path``
    key, if any, is a compute choice of the trainer (``lora_path_for``), not part of the spec."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    d.pop("lora_path", None)
    return PeftSpec.create(**d)
