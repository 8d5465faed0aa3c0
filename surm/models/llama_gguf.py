"""A `surm.models.llama` decoder from a GGUF file (llama.cpp's format): the tensors mapped to
the model's names and dequantised once into an ``.npz`` cache (checked on every read: a damaged
one is converted again), and the byte-level BPE tokenizer rebuilt from the metadata."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import sys
import time
import zipfile

import flax
import jax.numpy as jnp
import numpy as np

from surm.models import _loading, gguf
from surm.models.llama import Llama, LlamaConfig

log = logging.getLogger(__name__)


def _layer_names(i: int) -> dict[str, tuple[str, bool]]:
    """GGUF tensor name -> (model path, is a linear weight to transpose), for block ``i``."""
    p, g = f"layers_{i}", f"blk.{i}"
    return {f"{g}.attn_norm.weight": (f"{p}/attn_norm/scale", False),
            f"{g}.attn_q.weight": (f"{p}/attn/q_proj/kernel", True),
            f"{g}.attn_k.weight": (f"{p}/attn/k_proj/kernel", True),
            f"{g}.attn_v.weight": (f"{p}/attn/v_proj/kernel", True),
            f"{g}.attn_output.weight": (f"{p}/attn/o_proj/kernel", True),
            f"{g}.ffn_norm.weight": (f"{p}/mlp_norm/scale", False),
            f"{g}.ffn_gate.weight": (f"{p}/mlp/gate_proj/kernel", True),
            f"{g}.ffn_up.weight": (f"{p}/mlp/up_proj/kernel", True),
            f"{g}.ffn_down.weight": (f"{p}/mlp/down_proj/kernel", True)}


def tensor_map(config: LlamaConfig) -> dict[str, tuple[str, bool]]:
    """Every GGUF tensor the model reads: name -> (model path, transpose)."""
    names = {"token_embd.weight": ("embed/embedding", False),
             "output_norm.weight": ("norm/scale", False)}
    if not config.tie_embeddings:
        names["output.weight"] = ("lm_head/kernel", True)
    for i in range(config.n_layers):
        names.update(_layer_names(i))
    return names


def convert_gguf(path: str | os.PathLike, dtype=np.float32) -> tuple[LlamaConfig, dict]:
    """(config, flat params '/'-path -> array) from a GGUF file. Every tensor of the file must be
    one the model reads and the other way round; an error lists each one that is not."""
    f = gguf.GGUFFile(path)
    config = LlamaConfig.from_gguf(f.metadata, tie_embeddings="output.weight" not in f.tensors)
    names = tensor_map(config)
    missing = sorted(names.keys() - f.tensors.keys())
    extra = sorted(f.tensors.keys() - names.keys())
    if missing or extra:
        raise ValueError(
            f"GGUF file {path} does not fit a {config.n_layers}-block llama:"
            + "".join(f"\n  missing     {n}" for n in missing)
            + "".join(f"\n  unexpected  {n}" for n in extra))
    flat = {}
    for name, (model_path, transpose) in names.items():
        a = f.array(name)
        flat[model_path] = (a.T if transpose else a).astype(dtype)
    expected = _loading.expected_shapes(Llama(config), jnp.zeros((1, 1), jnp.int32))
    _loading.check_tree(flat, expected, os.fspath(path),
                        origin=lambda p: next(n for n, (mp, _) in names.items() if mp == p))
    return config, flat


def cache_dir() -> pathlib.Path:
    """``$SURM_MODEL_DIR``, else ``~/.cache/surm/models``."""
    return pathlib.Path(os.environ.get("SURM_MODEL_DIR") or "~/.cache/surm/models").expanduser()


_CONFIG_KEY = "__config__"


def cached_npz(path: str | os.PathLike, dtype=np.float32,
               directory: str | os.PathLike | None = None) -> pathlib.Path:
    """The dequantised ``.npz`` of the GGUF file ``path``, converted on first use. Its name
    carries the file's SHA-256 and the dtype, so another file is converted anew."""
    path = pathlib.Path(path)
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            sha.update(chunk)
    dtype_name = np.dtype(dtype).name
    if dtype_name not in ("float32", "bfloat16"):
        raise ValueError(f"parameters are float32 or bfloat16, not {dtype_name}")
    out = pathlib.Path(directory or cache_dir()) / (
        f"{path.stem}-{sha.hexdigest()[:16]}-{dtype_name}.npz")
    if not out.is_file():
        log.info("Dequantising %s to %s (once)", path, out)
        config, flat = convert_gguf(path, np.float32)
        fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "dtype"}
        arrays = {k: (v.astype(jnp.bfloat16).view(np.uint16) if dtype_name == "bfloat16" else
                      v.astype(dtype)) for k, v in flat.items()}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays, **{_CONFIG_KEY: np.frombuffer(
            json.dumps(fields).encode(), np.uint8)})
        os.replace(tmp, out)
    return out


# What reading a damaged .npz raises: never loaded any other way (no pickle, ever)
_DAMAGED = (zipfile.BadZipFile, ValueError, EOFError, KeyError, TypeError, OSError)


def _read_cache(npz: pathlib.Path, bf16: bool) -> tuple[LlamaConfig, dict]:
    """(config, flat params) of a cache file; every array read whole, so that the zip's CRC
    checks every byte."""
    with np.load(npz, allow_pickle=False) as data:
        fields = json.loads(data[_CONFIG_KEY].tobytes().decode())
        flat = {k: (data[k].view(jnp.bfloat16) if bf16 else data[k])
                for k in data.files if k != _CONFIG_KEY}
    return LlamaConfig(**fields), flat


def load_gguf(path: str | os.PathLike, dtype=np.float32, cache: bool = True,
              directory: str | os.PathLike | None = None):
    """(config, params, tokenizer) from a GGUF file: the parameters dequantised to ``dtype``
    (float32 or bfloat16), through the ``.npz`` cache unless ``cache`` is False."""
    start = time.perf_counter()
    bf16 = np.dtype(dtype) == np.dtype(jnp.bfloat16)
    if cache:
        npz = cached_npz(path, dtype, directory)
        try:
            config, flat = _read_cache(npz, bf16)
        except _DAMAGED as e:  # cut short, overwritten, a bit flipped (zip CRC): convert again
            print(f"note: the model cache {npz} is damaged ({str(e).splitlines()[0]}); "
                  f"converting {path} again", file=sys.stderr)
            npz.unlink(missing_ok=True)
            config, flat = _read_cache(cached_npz(path, dtype, directory), bf16)
    else:
        config, flat = convert_gguf(path, dtype)
    log.info("Loaded %s in %.1f s", path, time.perf_counter() - start)
    params = flax.traverse_util.unflatten_dict(flat, sep="/")
    return config, params, tokenizer_from_gguf(gguf.GGUFFile(path).metadata)


# ---------------------------------------------------------------- tokenizer

_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special tokens


def tokenizer_from_gguf(meta: dict):
    """A ``tokenizers.Tokenizer`` from GGUF metadata: byte-level BPE (``tokenizer.ggml.model``
    'gpt2') with the vocabulary and merges, control tokens as special tokens. Pre-tokenisation
    is GPT-2's, with digits split one by one for the 'smollm' pre-tokeniser."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {kind!r} is not supported (byte-level BPE, "
                         "'gpt2', is)")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = np.asarray(meta.get("tokenizer.ggml.token_type", np.ones(len(tokens))))
    special = [tokens[i] for i in np.flatnonzero((types == _CONTROL) | (types == _USER_DEFINED))]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok
