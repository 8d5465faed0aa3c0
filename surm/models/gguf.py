"""Reads GGUF files (llama.cpp's format) with numpy: metadata, tensor infos, dequantised tensors.

GGUF v2/v3 layout (little-endian): the magic ``GGUF``, a uint32 version, a uint64 tensor count,
a uint64 metadata count; the metadata as (string key, uint32 value type, value); the tensor
infos as (string name, uint32 n_dims, uint64 dims[n_dims], uint32 ggml type, uint64 offset);
then, at the next multiple of ``general.alignment`` (default 32), the data section, each
tensor at its offset from the start of that section. A string is a uint64 length and UTF-8
bytes; an array is a uint32 element type, a uint64 count and the elements.

``dims`` lists the fastest-varying axis first, so the numpy shape is ``dims`` reversed: a
linear layer stored from a PyTorch (out, in) weight has dims (in, out) and numpy shape
(out, in).

Dequantised types: F32, F16, BF16, Q8_0 (blocks of 32: a float16 scale d and 32 int8, x = d q)
and Q4_1 (blocks of 32: float16 d and m, 16 bytes whose low nibbles are elements 0..15 and
high nibbles elements 16..31, x = d q + m). Any other type is an error naming the tensor.

The file is memory-mapped and parsed field by field; nothing in it is unpickled or executed.
"""
from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# metadata value types
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
            10: "<u8", 11: "<i8", 12: "<f8"}
_STRUCT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9

# ggml tensor types: id -> name (for messages); the readable ones have a dequantiser below
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
F32, F16, Q4_1, Q8_0, BF16 = 0, 1, 3, 8, 30

_Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])  # 34 bytes
_Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])  # 20 bytes
# type -> (elements per block, bytes per block)
_BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q8_0: (32, _Q8_0_BLOCK.itemsize),
           Q4_1: (32, _Q4_1_BLOCK.itemsize)}


class GGUFError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF dims reversed)
    ggml_type: int
    offset: int  # absolute, in the file

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.ggml_type, f"unknown type {self.ggml_type}")

    @property
    def nbytes(self) -> int:
        block, size = _BLOCKS[self.ggml_type]
        return int(np.prod(self.shape, dtype=np.int64)) // block * size


class _Cursor:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError(f"{self.path}: truncated at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated string at byte {self.pos}")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.take(_STRUCT[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise GGUFError(f"{self.path}: truncated array {key!r}")
                out = np.frombuffer(self.buf, dtype, count, self.pos).copy()
                self.pos = end
                return out
            return [self.value(etype, key) for _ in range(count)]
        raise GGUFError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")


class GGUFFile:
    """A parsed GGUF file: ``metadata`` (key -> value; arrays of numbers as numpy arrays),
    ``tensors`` (name -> `TensorInfo`, in file order) and ``array(name)``, which dequantises."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if os.path.getsize(self.path) < 24:  # magic, version and two counts
            raise GGUFError(f"{self.path} is not a GGUF file: {os.path.getsize(self.path)} "
                            f"bytes (empty or cut short)")
        self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(self._buf, self.path)
        if bytes(self._buf[:4]) != MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (magic {bytes(self._buf[:4])!r})")
        cur.pos = 4
        self.version = cur.take("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (2, 3)")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.take("<I"), key)
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
            raw.append((name, tuple(reversed(dims)), cur.take("<I"), cur.take("<Q")))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in raw:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name!r} appears twice")
            self.tensors[name] = TensorInfo(name, shape, ggml_type, start + offset)

    def array(self, name: str, dtype=np.float32) -> np.ndarray:
        """The tensor ``name`` dequantised to ``dtype`` (float32 arithmetic), numpy shape."""
        info = self.tensors[name]
        if info.ggml_type not in _BLOCKS:
            raise GGUFError(
                f"{self.path}: tensor {name!r} has type {info.type_name}; this reader "
                f"dequantises {', '.join(GGML_TYPE_NAMES[t] for t in sorted(_BLOCKS))}")
        block = _BLOCKS[info.ggml_type][0]
        if info.shape and info.shape[-1] % block:
            raise GGUFError(f"{self.path}: tensor {name!r} ({info.type_name}) has rows of "
                            f"{info.shape[-1]}, not a multiple of its block of {block}")
        end = info.offset + info.nbytes
        if end > len(self._buf):
            raise GGUFError(f"{self.path}: tensor {name!r} runs past the end of the file")
        data = self._buf[info.offset:end]
        return dequantize(data, info.ggml_type, info.shape).astype(dtype, copy=False)


def dequantize(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of ``shape`` from the raw bytes (uint8) of one tensor of ``ggml_type``."""
    data = np.ascontiguousarray(data)
    if ggml_type == F32:
        out = data.view("<f4").astype(np.float32)
    elif ggml_type == F16:
        out = data.view("<f2").astype(np.float32)
    elif ggml_type == BF16:
        out = (data.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif ggml_type == Q8_0:
        blocks = data.view(_Q8_0_BLOCK)
        out = blocks["d"].astype(np.float32)[:, None] * blocks["qs"].astype(np.float32)
    elif ggml_type == Q4_1:
        blocks = data.view(_Q4_1_BLOCK)
        qs = blocks["qs"]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
        out = (blocks["d"].astype(np.float32)[:, None] * q
               + blocks["m"].astype(np.float32)[:, None])
    else:
        raise GGUFError(f"no dequantiser for {GGML_TYPE_NAMES.get(ggml_type, ggml_type)}")
    return out.reshape(shape)
