"""Models by name, each behind one interface: what the trainer, the export, ``surm.inspect`` and
the scripts need of a model, so that none of them branches on model names.

    entry = models.get(config.model.name)
    module, params, example_inputs = entry.build(config.model, num_classes, rng)
    outputs = module.apply({"params": params}, *entry.inputs(batch), train=False)

An entry (a `ModelEntry`) says

    name          the ``model.name`` that selects it
    modality      "image" or "text": the data it reads (the trainer refuses other data)
    input_keys    the batch keys its call takes, in the call's order (the trainer feeds and
                  shards only these)
    build(cfg, num_classes, rng) -> (module, params, example_inputs)
                  the Flax module for ``num_classes`` outputs (1: regression), its parameters
                  (loaded from the checkpoint the ``model`` block ``cfg`` names, or random from
                  ``rng``) and example inputs of its call
    inputs(batch) the call's positional inputs: the batch's ``input_keys``, in order
    check(cfg)    what can be checked of ``cfg`` before anything is loaded (files that must
                  exist); raises ValueError or FileNotFoundError. Default: nothing
    tokenizer(cfg, max_length)   text models: the ``tokenizers.Tokenizer`` their text is
                  encoded with (padded and truncated to ``max_length``)
    task          "classification" (default) or "causal_lm" (next-token loss and
                  perplexity, text packed into blocks: `surm.lm`)
    save(folder, run, params) -> path   writes a run's merged model (``params``) into the
                  empty ``folder`` in the model's own format and returns what
                  ``model.checkpoint`` takes to build it again (`surm.export`); None where the
                  model has no such format

The module is called as ``module.apply({"params": p}, *inputs, train=bool)``, so it takes the
inputs positionally and a ``train`` keyword (dropout on when True). The classification head's
parameters live under ``head`` (or ``classifier``): heads train in full (`surm.peft`). An image
model's preprocessing reads the input size from ``model.image_size``.

Bring your own model: subclass `ModelEntry`, register an instance, and name it in the config
(``model.name``). Register it where the config is read (the config file itself may import the
module that registers it) and before ``surm.runs.load_run`` or ``surm.export`` read such a run.
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Mapping

MODALITIES = ("image", "text")


class ModelEntry:
    """One registered model (module docstring). Subclasses set ``name``, ``modality`` and
    ``input_keys`` and define ``build``; ``check``, ``tokenizer`` (text) and ``save`` as they
    have them."""

    name: str
    modality: str
    input_keys: tuple[str, ...]
    # "classification" (outputs: one row of logits per example, a ``label`` per example) or
    # "causal_lm" (outputs: logits per token; the batch holds a ``loss_mask``: `surm.lm`).
    task: str = "classification"

    # Which layers play each role of the PEFT target presets (surm.peft.spec.ROLES: q, k, v, o,
    # mlp_in, mlp_out), as regexes of their paths' ends: presets like "qv" find them.
    target_names: Mapping[str, tuple[str, ...]] = {}

    # Optional hooks: None where the model has none.
    tokenizer: Callable[[Mapping[str, Any], int], Any] | None = None
    save: Callable[[pathlib.Path, Any, dict], pathlib.Path] | None = None

    def build(self, cfg: Mapping[str, Any], num_classes: int, rng) -> tuple[Any, dict, tuple]:
        raise NotImplementedError(f"model {self.name!r} defines no build()")

    def inputs(self, batch: Mapping[str, Any]) -> tuple:
        return tuple(batch[key] for key in self.input_keys)

    def check(self, cfg: Mapping[str, Any]) -> None:
        pass

    def chat_template(self, cfg: Mapping[str, Any]) -> str | None:
        """A causal LM's chat template (Jinja, as Hugging Face's); None where it has none."""
        del cfg
        return None

    def max_length(self, model) -> int | None:
        """The longest token sequence the built ``model`` takes (None: no limit, or no
        tokens); a config asking for more is refused before anything is written."""
        del model
        return None

    def __repr__(self) -> str:
        return f"<model {self.name!r}: {self.modality}, inputs {self.input_keys}>"


_ENTRIES: dict[str, ModelEntry] = {}


def register(entry: ModelEntry, *, replace: bool = False) -> ModelEntry:
    """Adds ``entry`` under ``entry.name``; ValueError if the name is taken (``replace=True``
    replaces it) or the entry is incomplete. Returns ``entry``."""
    name = getattr(entry, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{entry!r}: a model entry needs a name (a non-empty string)")
    if getattr(entry, "modality", None) not in MODALITIES:
        raise ValueError(f"model {name!r}: modality={getattr(entry, 'modality', None)!r}; "
                         f"expected one of {', '.join(MODALITIES)}")
    keys = getattr(entry, "input_keys", None)
    if (not isinstance(keys, tuple) or not keys
            or not all(isinstance(k, str) and k for k in keys)):
        raise ValueError(f"model {name!r}: input_keys={keys!r}; expected a non-empty tuple of "
                         f"batch keys, in the order the model's call takes them")
    if entry.modality == "text" and entry.tokenizer is None:
        raise ValueError(f"model {name!r} reads text but has no tokenizer(cfg, max_length)")
    if name in _ENTRIES and not replace:
        raise ValueError(f"model name {name!r} is already registered ({_ENTRIES[name]!r}); "
                         f"pass replace=True to replace it")
    _ENTRIES[name] = entry
    return entry


def is_causal_lm(entry: ModelEntry) -> bool:
    """Whether ``entry`` is a causal language model (``task == "causal_lm"``; an entry that
    does not say is a classifier)."""
    return getattr(entry, "task", "classification") == "causal_lm"


def get(name: str) -> ModelEntry:
    """The entry registered as ``name``; ValueError naming the known ones otherwise."""
    if name not in _ENTRIES:
        raise ValueError(f"unknown model.name {name!r}; known: {', '.join(names())} (others "
                         f"are added with surm.models.register)")
    return _ENTRIES[name]


def names() -> tuple[str, ...]:
    """The registered names, sorted."""
    return tuple(sorted(_ENTRIES))
