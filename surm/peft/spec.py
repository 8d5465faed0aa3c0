"""What to fine-tune: the PEFT spec and the target rules over '/'-joined parameter paths.

A spec names a *method*, the modules it targets and what else trains:

    family        a structured family (``surm.structured.FAMILIES``; ``lowrank`` is LoRA), or a
                  baseline: ``houlsby`` (bottleneck adapter), ``bitfit`` (biases), ``linear_probe``
                  (head only), ``full`` (every weight)
    mode          ``lora``: y = x W0 + scale * S(x)   (S starts at 0)
                  ``adapter``: after a sublayer's output projection h <- h + act(S(h)) + b
    hparams       the family's hyper-parameters, e.g. {"rank": 4} or {"block_size": 96}
    targets       rules selecting linear modules by path (see ``match_targets``)
    scale         the lora update's multiplier s in y = x W0 + s S(x) (default 1)
    alpha         instead of scale, LoRA's convention: s = alpha / rank (families with a rank:
                  lowrank, kronecker, ldr), as LoRA and the SURM authors' Kronecker LoRA use it

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

BASELINES = ("houlsby", "bitfit", "linear_probe", "full")
RANKED = ("lowrank", "kronecker", "ldr")  # the families whose update alpha / rank can scale
MODES = ("lora", "adapter")
ACTIVATIONS = ("gelu", "relu", "tanh", "identity")

# Linear layers of the two model families, ViT (google names) and BERT (Hugging Face names).
_Q = r"(.*/)?(attention/self/query|MultiHeadDotProductAttention_\d+/query)"
_K = r"(.*/)?(attention/self/key|MultiHeadDotProductAttention_\d+/key)"
_V = r"(.*/)?(attention/self/value|MultiHeadDotProductAttention_\d+/value)"
_O = r"(.*/)?(attention/output/dense|MultiHeadDotProductAttention_\d+/out)"
_MLP_IN = r"(.*/)?(layer/\d+/intermediate/dense|MlpBlock_\d+/Dense_0)"
_MLP_OUT = r"(.*/)?(layer/\d+/output/dense|MlpBlock_\d+/Dense_1)"
PRESETS: dict[str, tuple[str, ...]] = {
    "qv": (_Q, _V),
    "qkv": (_Q, _K, _V),
    "qkvo": (_Q, _K, _V, _O),
    "mlp": (_MLP_IN, _MLP_OUT),
    "all-linear": (_Q, _K, _V, _O, _MLP_IN, _MLP_OUT),
    # Houlsby placement: after the attention-output and the MLP-output projections.
    "houlsby": (_O, _MLP_OUT),
}
HEAD_NAMES = ("head", "classifier")
_LAYERNORM = re.compile(r"(.*/)?(LayerNorm(_\d+)?|encoder_norm)/(scale|bias)")


@dataclasses.dataclass(frozen=True)
class PeftSpec:
    family: str = "circulant"
    mode: str = "lora"
    hparams: tuple[tuple[str, Any], ...] = ()
    targets: tuple[str, ...] = ("qv",)
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
        if self.family not in structured.FAMILIES + BASELINES:
            raise ValueError(f"unknown peft family {self.family!r}; choose a structured family "
                             f"({', '.join(structured.FAMILIES)}) or a baseline "
                             f"({', '.join(BASELINES)})")
        if self.mode not in MODES:
            raise ValueError(f"peft mode must be one of {MODES}, got {self.mode!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"peft activation must be one of {ACTIVATIONS}, got "
                             f"{self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft dropout must be in [0, 1), got {self.dropout}")
        if self.family == "houlsby" and "rank" not in dict(self.hparams):
            raise ValueError("houlsby needs hparams rank=<bottleneck size>, e.g. rank=8")
        if self.family == "houlsby" and self.mode != "adapter":
            raise ValueError("houlsby is an adapter: use mode='adapter'")
        if self.alpha is not None:
            if self.family not in RANKED or "rank" not in dict(self.hparams):
                raise ValueError(f"peft alpha (scale = alpha / rank) needs a family with an "
                                 f"explicit rank ({', '.join(RANKED)}), not {self.family!r} "
                                 f"with hparams {dict(self.hparams)}; set scale instead")
            if self.scale != 1.0:
                raise ValueError(f"give peft alpha or scale, not both (alpha={self.alpha}, "
                                 f"scale={self.scale})")
            if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
                raise ValueError(f"peft alpha must be a positive number, got {self.alpha!r}")
        for rule in self.targets:
            if rule.startswith("re:"):
                try:
                    re.compile(rule[3:])
                except re.error as e:
                    raise ValueError(f"target rule {rule!r} is not a valid regex: {e}") from None

    @classmethod
    def create(cls, **kw: Any) -> "PeftSpec":
        """From plain values (a config dict): hparams as a dict, targets as a list or a
        comma-separated string. In adapter mode (and for houlsby) the default targets are the
        Houlsby placement."""
        kw = dict(kw)
        if kw.get("family") == "houlsby":
            kw.setdefault("mode", "adapter")
        hp = kw.pop("hparams", None) or {}
        kw["hparams"] = tuple(sorted((k, _hashable(v)) for k, v in dict(hp).items()
                                     if v is not None))
        targets = kw.pop("targets", None)
        if targets is None or targets == "":
            adapter_like = kw.get("mode") == "adapter" or kw.get("family") == "houlsby"
            targets = ("houlsby",) if adapter_like else ("qv",)
        elif isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        kw["targets"] = tuple(targets)
        kw["train_extra"] = tuple(kw.get("train_extra") or ())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ValueError(f"unknown peft option(s) {unknown}; known: {sorted(known)}")
        return cls(**kw)

    @property
    def update_scale(self) -> float:
        """The multiplier of the update: ``alpha / rank`` when alpha is set, else ``scale``."""
        if self.alpha is not None:
            return float(self.alpha) / dict(self.hparams)["rank"]
        return float(self.scale)

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
    def is_structured(self) -> bool:
        return self.family in structured.FAMILIES

    @property
    def has_adapters(self) -> bool:
        return self.is_structured or self.family == "houlsby"

    @property
    def mergeable(self) -> bool:
        return self.is_structured and self.mode == "lora"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PeftSpec":
        d = json.loads(text)
        d["hparams"] = {k: v for k, v in d["hparams"]}
        return cls.create(**d)


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


def expand_rules(rules: Iterable[str]) -> list[tuple[str, str]]:
    """(rule as written, pattern) pairs; presets expand to their regexes."""
    out = []
    for rule in rules:
        if rule in PRESETS:
            out += [(rule, "re:" + pattern) for pattern in PRESETS[rule]]
        else:
            out.append((rule, rule))
    return out


def rule_matches(pattern: str, path: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return path == pattern or path.endswith("/" + pattern)


def match_targets(rules: Iterable[str], linear_paths: Iterable[str]) -> list[str]:
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
            raise ValueError(f"target rule {rule!r} matches no linear module. Available "
                             f"paths ({len(paths)}):\n  {shown}")
        selected |= hits
    heads = sorted(p for p in selected if p.split("/")[0] in HEAD_NAMES)
    if heads:
        raise ValueError(f"target rules select the classification head {heads}; the head "
                         f"always trains in full, target other modules")
    return [p for p in paths if p in selected]


def trains_in_full(spec: PeftSpec, path: str) -> bool:
    """Whether the base parameter at ``path`` (e.g. 'head/kernel') is trainable."""
    if spec.family == "full" or path.split("/")[0] in HEAD_NAMES:
        return True
    if (spec.train_bias or spec.family == "bitfit") and path.rsplit("/", 1)[-1] == "bias":
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
