"""Opening and validating an mllama GGUF file before any tensor is used.

`open_gguf(path)` memory-maps the file with gguf-py's GGUFReader after cheap
header checks, and verifies that every tensor lies inside the file and has a
type the extension supports. `check_architecture` and `require_keys` check the
metadata. Every failure is a `ModelFileError` (a `ValueError`) whose message
names the file and the problem; a missing file is `ModelFileNotFoundError`
(also a `FileNotFoundError`). Nothing here crashes or hangs on hostile input:
the header counts are bounded by the file size before gguf-py walks them.

The GGUF format: github.com/ggml-org/ggml docs/gguf.md (magic "GGUF",
uint32 version, uint64 tensor count, uint64 metadata count, little-endian).
"""
from __future__ import annotations

import os
import struct
from typing import Any, Iterable

import numpy as np

from . import gguf_keys as K

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
HEADER_BYTES = 24  # magic, version, tensor count, kv count


class ModelFileError(ValueError):
    """The model file is missing, unreadable, corrupt, truncated or not an mllama GGUF."""


class ModelFileNotFoundError(ModelFileError, FileNotFoundError):
    """The model file does not exist."""


def _supported_types() -> dict[int, str]:
    """ggml type id -> name of the tensor types the compiled core reads."""
    from . import _core

    return {int(v["ggml_type"]): name for name, v in _core.type_info().items() if v["weight"]}


def open_gguf(path) -> Any:
    """Validate and memory-map a GGUF file; returns a gguf.GGUFReader.

    Checks, in order: the path is a readable file; the header (magic, version,
    plausible counts for the file size); gguf-py can parse the metadata and
    tensor table; every tensor's data lies within the file; every tensor type
    is supported. Raises ModelFileError otherwise.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ModelFileNotFoundError(f"model file not found: {p}")
    if not os.path.isfile(p):
        raise ModelFileError(f"model path is not a regular file: {p}")
    size = os.path.getsize(p)
    if size < HEADER_BYTES:
        raise ModelFileError(f"{p}: not a GGUF file ({size} bytes, too small for a GGUF header)")
    try:
        with open(p, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ModelFileError(f"{p}: cannot read the file ({e})") from e
    if head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{p}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(f"{p}: unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS}; "
                             "a big-endian file is not supported either)")
    # Each metadata entry takes >= 12 bytes (key length, type, a value) and each
    # tensor-table entry >= 24 bytes: larger counts mean a corrupt header.
    if n_kv * 12 > size or n_tensors * 24 > size:
        raise ModelFileError(f"{p}: corrupt or truncated GGUF header ({n_tensors} tensors, {n_kv} metadata "
                             f"entries cannot fit in {size} bytes)")

    try:
        reader = _checked_reader_class()(p, "r")
    except ModelFileError as e:
        raise ModelFileError(f"{p}: {e}") from None
    except Exception as e:  # gguf-py raises ValueError/IndexError/KeyError/... on bad bytes
        raise ModelFileError(f"{p}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e
    for t in reader.tensors:  # belt and braces: the views gguf-py built cover every byte
        if t.data.nbytes != int(t.n_bytes):
            raise ModelFileError(f"{p}: truncated file: tensor '{t.name}' is incomplete")
    return reader


_READER_CLASS = None


def _checked_reader_class():
    """gguf.GGUFReader that checks every tensor's type and byte range after the tensor
    table is parsed and before gguf-py builds the tensor views (whose errors on a
    truncated file would otherwise be numpy reshape messages)."""
    global _READER_CLASS
    if _READER_CLASS is not None:
        return _READER_CLASS
    from gguf import GGUFReader  # gguf-py (runtime dependency; numpy only)
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    types = _supported_types()

    class CheckedReader(GGUFReader):
        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _name_len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                tid = int(raw_dtype[0])
                if tid not in types:
                    try:
                        tname = GGMLQuantizationType(tid).name
                    except ValueError:
                        tname = "unknown"
                    raise ModelFileError(f"tensor '{name}' has ggml type {tid} ({tname}), not supported "
                                         f"(supported: {', '.join(sorted(types.values()))})")
                n_elems = 1
                for d in dims.tolist():
                    n_elems *= int(d)
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tid)]
                if n_elems % block:
                    raise ModelFileError(f"tensor '{name}' has {n_elems} values, not whole {block}-value blocks")
                end = int(start_offs) + int(offset_tensor[0]) + n_elems // block * type_size
                if end > size:
                    raise ModelFileError(f"truncated file: tensor '{name}' needs bytes up to {end}, "
                                         f"the file has {size}")
            return super()._build_tensors(start_offs, fields)

    _READER_CLASS = CheckedReader
    return CheckedReader


def field_value(reader, key: str, default: Any = None) -> Any:
    """Python value of metadata `key` (str, int, float, bool or list), `default` if absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception as e:
        raise ModelFileError(f"metadata '{key}' is unreadable ({type(e).__name__}: {e})") from e


def check_architecture(reader, path) -> None:
    arch = field_value(reader, K.GENERAL_ARCHITECTURE)
    if arch is None:
        raise ModelFileError(f"{path}: no '{K.GENERAL_ARCHITECTURE}' key: not a model GGUF")
    if arch != K.ARCH:
        raise ModelFileError(f"{path}: architecture is '{arch}', expected '{K.ARCH}' "
                             "(Llama 3.2 Vision); this runtime reads only mllama files")


def require_keys(reader, path, keys: Iterable[str]) -> None:
    missing = [k for k in keys if k not in reader.fields]
    if missing:
        raise ModelFileError(f"{path}: missing metadata key(s): {', '.join(missing)}")


def get_int(reader, key: str, default: Any = None) -> int:
    v = field_value(reader, key, default)
    if v is None:
        raise ModelFileError(f"missing metadata key '{key}'")
    try:
        return int(v)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"metadata '{key}' must be an integer, got {v!r}") from e


def get_float(reader, key: str, default: Any = None) -> float:
    v = field_value(reader, key, default)
    if v is None:
        raise ModelFileError(f"missing metadata key '{key}'")
    try:
        return float(v)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"metadata '{key}' must be a number, got {v!r}") from e


def get_int_list(reader, key: str, default: Any = None) -> list[int]:
    v = field_value(reader, key, default)
    if v is None:
        raise ModelFileError(f"missing metadata key '{key}'")
    try:
        return [int(x) for x in np.asarray(v).reshape(-1)]
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"metadata '{key}' must be a list of integers, got {v!r}") from e


def tensor_entry(t) -> tuple:
    """(array, ggml_type, numpy shape) for _core: the mapped bytes, never copied.

    gguf-py gives `t.shape` in GGUF order (ne[0] first) and `t.data` as a view
    of the memory map (float types as float arrays, block types as uint8 rows).
    """
    shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
    return (t.data, int(t.tensor_type), shape)
