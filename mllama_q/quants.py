"""GGUF block quantization through the compiled core (all cores, GIL released).

    quantize(array, "q4_k") -> uint8 [rows, row_bytes]
    dequantize(data, "q4_k", shape) -> float32 array of `shape`

Sizes come from the extension (`type_info()`), never repeated here.
"""

from __future__ import annotations

import math
import operator
from functools import lru_cache

import numpy as np

from . import _core


@lru_cache(maxsize=None)
def type_info() -> dict:
    """{name: {"ggml_type", "block_size", "type_size", "weight"}} as compiled into the core."""
    return {k: dict(v) for k, v in _core.type_info().items()}


def _info(qtype: str) -> dict:
    if not isinstance(qtype, str):
        raise ValueError(f"type must be a string such as 'q4_k', got {qtype!r}")
    name = qtype.lower()
    infos = type_info()
    if name not in infos:
        raise ValueError(f"unknown type {qtype!r}; expected one of {', '.join(sorted(infos))}")
    return infos[name]


def row_bytes(qtype: str, n: int) -> int:
    """Bytes of one row of n values of `qtype` (n must be a multiple of the block size)."""
    info = _info(qtype)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"row length must be a non-negative integer, got {n!r}")
    if n % info["block_size"]:
        raise ValueError(f"row length {n} is not a multiple of the {qtype} block size {info['block_size']}")
    return n // info["block_size"] * info["type_size"]


def quantize(array, qtype: str) -> np.ndarray:
    """Quantize a float32 array (last axis = row) to `qtype` blocks.

    Returns uint8 of shape [*array.shape[:-1], row_bytes]. The array must be
    float32 and C-contiguous; its last dimension a multiple of the block size.
    """
    _info(qtype)
    if not isinstance(array, np.ndarray):
        raise ValueError(f"expected a numpy.ndarray, got {type(array).__name__}")
    if array.dtype != np.float32:
        raise ValueError(f"expected dtype float32, got {array.dtype}")
    if array.ndim < 1 or array.shape[-1] == 0:
        raise ValueError(f"expected at least one non-empty axis, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError("array must be C-contiguous (use numpy.ascontiguousarray)")
    if not array.flags.aligned:
        raise ValueError("array must be aligned to its float32 elements (use numpy.array(..., copy=True))")
    rb = row_bytes(qtype, array.shape[-1])
    out = _core.quantize(array.reshape(-1, array.shape[-1]), qtype.lower())
    return out.reshape(*array.shape[:-1], rb)


def dequantize(data, qtype: str, shape) -> np.ndarray:
    """Dequantize GGUF bytes of `qtype` to a float32 array of `shape` (last axis = row)."""
    _info(qtype)
    try:
        shape = tuple(operator.index(s) for s in (shape if np.iterable(shape) else (shape,)))
    except TypeError:
        raise ValueError(f"invalid shape {shape!r}: expected a tuple of integers") from None
    if not shape or any(s < 0 for s in shape):
        raise ValueError(f"invalid shape {shape}: expected at least one non-negative dimension")
    if not isinstance(data, np.ndarray):
        raise ValueError(f"expected a numpy.ndarray, got {type(data).__name__}")
    if not data.flags.c_contiguous:
        raise ValueError("data must be C-contiguous (use numpy.ascontiguousarray)")
    cols = shape[-1]
    rows = math.prod(shape[:-1])  # exact (numpy's int64 product would wrap for huge shapes)
    expected = rows * row_bytes(qtype, cols)
    if data.nbytes != expected:
        raise ValueError(f"data has {data.nbytes} bytes, expected {expected} for shape {shape} of {qtype}")
    if rows == 0 or cols == 0:  # no values: nothing to decode, whatever the other extents
        return np.zeros(shape, dtype=np.float32)
    out = _core.dequantize(data, qtype.lower(), rows, cols)
    return out.reshape(shape)
