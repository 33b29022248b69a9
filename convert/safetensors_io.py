"""Read safetensors files through mmap, a few rows at a time, without torch.

File format (https://github.com/huggingface/safetensors, "Format"):
    u64 little-endian N | N bytes of JSON header | raw tensor bytes
The header maps tensor name -> {"dtype", "shape", "data_offsets": [begin, end]}
(offsets relative to the first byte after the header) plus an optional
"__metadata__" string map. Data are C-order, little-endian.

Memory: `read_rows` maps only the byte range of the requested rows and unmaps it
before returning, so the process's resident set never holds more of the input
than one chunk (a long-lived whole-file mapping would keep every page read so
far resident and counted in RSS). The page cache still serves repeated reads.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConvertError

# safetensors dtype -> (numpy storage dtype, bytes per element). BF16 is read as
# its raw 16-bit pattern and widened in `_to_float32`.
SUPPORTED_DTYPES = {"F32": (np.dtype("<f4"), 4), "F16": (np.dtype("<f2"), 2), "BF16": (np.dtype("<u2"), 2)}
KNOWN_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype string, one of SUPPORTED_DTYPES
    shape: tuple
    start: int  # absolute byte offset of the data in the file
    nbytes: int
    path: Path

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widen a freshly mapped array to a new float32 array (never a view of the map)."""
    if dtype == "BF16":
        # bf16 is the top half of an IEEE float32: shift the 16 bits into place.
        out = np.left_shift(raw, 16, dtype=np.uint32)
        return out.view(np.float32)
    return raw.astype(np.float32)  # F16 -> exact widening; F32 -> copy


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, data mapped on demand."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise ConvertError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            self.size = os.fstat(self._fd).st_size
            self.tensors = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self) -> dict:
        p = self.path
        if self.size < 8:
            raise ConvertError(f"{p}: corrupt safetensors header (file is {self.size} bytes)")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n == 0 or n > _MAX_HEADER or 8 + n > self.size:
            raise ConvertError(f"{p}: corrupt safetensors header (header length {n}, file size {self.size})")
        try:
            header = json.loads(os.pread(self._fd, n, 8).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError; nesting too deep
            raise ConvertError(f"{p}: corrupt safetensors header (invalid JSON: {type(e).__name__}: {e})") from None
        if not isinstance(header, dict):
            raise ConvertError(f"{p}: corrupt safetensors header (not a JSON object)")
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = info["dtype"]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConvertError(f"{p}: corrupt safetensors header (bad entry for tensor {name})") from None
            if dtype not in KNOWN_DTYPES:
                raise ConvertError(f"{p}: corrupt safetensors header (unknown dtype {dtype!r} for tensor {name})")
            numel = 1
            for s in shape:
                if s < 0:
                    raise ConvertError(f"{p}: corrupt safetensors header (negative dimension in tensor {name})")
                numel *= s
            if begin < 0 or end < begin or end - begin != numel * KNOWN_DTYPES[dtype] or base + end > self.size:
                raise ConvertError(
                    f"{p}: corrupt safetensors header (tensor {name}: offsets [{begin}, {end}) do not match "
                    f"shape {list(shape)} of {dtype} within a {self.size}-byte file)"
                )
            out[name] = TensorEntry(name, dtype, shape, base + begin, end - begin, p)
        return out

    def prefetch(self, entry: TensorEntry, row0: int = 0, row1: int | None = None) -> None:
        """Ask the kernel to start reading rows [row0, row1) into the page cache (async)."""
        start, length = self._byte_range(entry, row0, row1)
        if length and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, start, length, os.POSIX_FADV_WILLNEED)

    def _byte_range(self, entry: TensorEntry, row0: int, row1: int | None):
        rows = entry.shape[0] if entry.shape else 1
        row1 = rows if row1 is None else row1
        row_bytes = entry.nbytes // rows if rows else 0
        return entry.start + row0 * row_bytes, (row1 - row0) * row_bytes

    def read_rows(self, entry: TensorEntry, row0: int = 0, row1: int | None = None) -> np.ndarray:
        """float32 copy of rows [row0, row1) of `entry` (axis 0): shape [row1-row0, *shape[1:]].

        A 0-d (scalar) tensor reads as shape [1].
        """
        if entry.dtype not in SUPPORTED_DTYPES:
            raise ConvertError(
                f"{entry.path}: tensor {entry.name} has unsupported dtype {entry.dtype} "
                f"(supported: {', '.join(SUPPORTED_DTYPES)})"
            )
        np_dtype, esize = SUPPORTED_DTYPES[entry.dtype]
        shape = entry.shape if entry.shape else (1,)
        rows = shape[0]
        row1 = rows if row1 is None else row1
        if not 0 <= row0 <= row1 <= rows:
            raise ValueError(f"rows [{row0}, {row1}) out of range for {entry.name} with {rows} rows")
        start, length = self._byte_range(entry, row0, row1)
        out_shape = (row1 - row0, *shape[1:])
        if length == 0:
            return np.zeros(out_shape, np.float32)
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        delta = start - aligned
        mm = mmap.mmap(self._fd, delta + length, access=mmap.ACCESS_READ, offset=aligned)
        try:
            raw = np.frombuffer(mm, dtype=np_dtype, count=length // esize, offset=delta)
            out = _to_float32(raw, entry.dtype)
            del raw  # release the buffer export so the map can close
        finally:
            mm.close()
        return out.reshape(out_shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
