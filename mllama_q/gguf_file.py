"""Opening and validating a GGUF file: our own bounds-checked, memory-mapped reader.

    f = open_gguf(path)             # GGUFFile; raises ModelFileError on any malformed byte
    f.metadata["mllama.block_count"]          -> 40
    f.metadata["tokenizer.ggml.tokens"][9906] -> "Hello"    (decoded when asked for)
    f.tensors["output.weight"].data           -> read-only numpy view of the mapping

The parse happens in the compiled core (csrc/gguf/gguf_reader.cpp: every count, length,
offset, alignment, dimension and tensor byte range is checked against the bytes left and
against overflow before anything is sized from it, so time and memory are linear in the
file size; the checks are listed and sourced there). Nothing is copied: numeric arrays and
tensor data are slices of one read-only array over the mapping, which stays mapped until
the last of them is gone (so `close()` is always safe); string arrays are sequences that
decode one element at a time.

Every failure is a `ModelFileError` (a `ValueError`) naming the file, the key or tensor and
the byte offset; a missing file is `ModelFileNotFoundError` (also a `FileNotFoundError`).
gguf-py is not used at run time (the converter writes with it; tests read with it as the
reference this reader must agree with).

Format: github.com/ggml-org/ggml docs/gguf.md; reference reader: llama.cpp ggml/src/gguf.cpp.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Iterable, Iterator

import numpy as np

from . import gguf_keys as K


class ModelFileError(ValueError):
    """The model file is missing, unreadable, corrupt, truncated or not an mllama GGUF."""


class ModelFileNotFoundError(ModelFileError, FileNotFoundError):
    """The model file does not exist."""


# numpy element type of the tensor types gguf-py also gives as typed arrays (gguf_reader.py
# _build_tensors), plus BF16 as its raw uint16 bits; every other type is rows of block bytes.
_TENSOR_DTYPES = {
    0: np.float32,
    1: np.float16,
    24: np.int8,
    25: np.int16,
    26: np.int32,
    27: np.int64,
    28: np.float64,
    30: np.uint16,
}

_LAYOUTS = None


def type_layouts() -> dict[int, tuple[str, int, int]]:
    """{ggml type id: (name, values per block, bytes per block)} for every type a GGUF may carry."""
    global _LAYOUTS
    if _LAYOUTS is None:
        from . import _core

        _LAYOUTS = dict(_core.ggml_type_layouts())
    return _LAYOUTS


def _string_array_class():
    from . import _core

    return _core.GGUFStringArray


class TensorInfo:
    """One entry of the tensor table.

    name, ggml_type (int), type_name ("q4_k"), shape (numpy order: last axis = GGUF ne[0]),
    offset (absolute byte offset of the data), nbytes, n_elements, and `data`: a read-only,
    zero-copy numpy view of the mapping shaped like gguf-py's `tensor.data` (F32/F16/F64/I8-I64
    as typed arrays of `shape`; BF16 as uint16 bits of `shape`; block types as uint8 rows
    [*shape[:-1], shape[-1] / block_size * type_size]).
    """

    __slots__ = ("name", "ggml_type", "shape", "offset", "nbytes", "n_elements", "entry_offset", "_buffer", "_data")

    def __init__(self, name, ggml_type, ne, offset, nbytes, n_elements, entry_offset, buffer):
        self.name = name
        self.ggml_type = int(ggml_type)
        self.shape = tuple(int(d) for d in reversed(ne))
        self.offset = int(offset)
        self.nbytes = int(nbytes)
        self.n_elements = int(n_elements)
        self.entry_offset = int(entry_offset)
        self._buffer = buffer
        self._data = None

    @property
    def type_name(self) -> str:
        return type_layouts()[self.ggml_type][0]

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            raw = self._buffer[self.offset : self.offset + self.nbytes]
            dt = _TENSOR_DTYPES.get(self.ggml_type)
            if dt is not None:
                self._data = raw.view(dt).reshape(self.shape)
            else:
                _, block, size = type_layouts()[self.ggml_type]
                # The reader checked ne[0] % block == 0, so the byte row is whole.
                self._data = raw.reshape(self.shape[:-1] + (self.shape[-1] // block * size,))
        return self._data

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, {self.type_name}, shape={self.shape}, offset={self.offset})"


class _Metadata(Mapping):
    """Read-only mapping key -> value in file order; each value is built on first access."""

    def __init__(self, reader):
        self._r = reader
        self._keys = reader.keys()
        self._index = {k: i for i, k in enumerate(self._keys)}
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        try:
            return self._cache[key]
        except KeyError:
            pass
        i = self._index[key]  # KeyError for an absent key, as a Mapping should
        v = self._r.kv_value(i)
        self._cache[key] = v
        return v

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._index

    def type_of(self, key: str) -> str:
        return self._r.kv_type(self._index[key])

    def offset_of(self, key: str) -> int:
        return self._r.kv_offset(self._index[key])


class _Closed(Mapping):
    """GGUFFile.metadata after close(): every access says so."""

    def __init__(self, path):
        self._path = path

    def _fail(self, *_):
        raise ValueError(f"{self._path}: the GGUF file is closed")

    __getitem__ = __iter__ = __len__ = __contains__ = type_of = offset_of = _fail


class GGUFFile:
    """A GGUF file opened by `open_gguf` (CONTRACTS.md section A).

    path, version (2 or 3), alignment, size (bytes), data_offset (start of tensor data),
    metadata (read-only Mapping: int / float / bool / str; numeric arrays as read-only 1-D
    numpy views; string arrays as lazy sequences with len, [i], iteration and .tolist();
    nested arrays as lists), tensors ({name: TensorInfo} in file order).
    Also a context manager; `close()` drops this object's hold on the mapping (arrays and
    string sequences taken from it stay valid and keep it mapped while they live).
    """

    def __init__(self, reader, path: str):
        self._r = reader
        self.path = path
        self.version = int(reader.version)
        self.alignment = int(reader.alignment)
        self.size = int(reader.size)
        self.data_offset = int(reader.data_offset)
        buf = reader.buffer
        self.metadata = _Metadata(reader)
        self.tensors: dict[str, TensorInfo] = {t[0]: TensorInfo(*t, buf) for t in reader.tensors()}

    def metadata_type(self, key: str) -> str:
        """'uint32', 'float32', 'bool', 'string', 'array[string]', 'array[array[int32]]', ..."""
        return self.metadata.type_of(key)

    @property
    def closed(self) -> bool:
        return self._r is None

    def close(self) -> None:
        if self._r is not None:
            self._r.close()
            self._r = None
            self.metadata = _Closed(self.path)
            self.tensors = {}

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GGUFFile({self.path!r}, version={self.version}, {len(self.metadata)} metadata, "
            f"{len(self.tensors)} tensors)"
        )


def open_gguf(path) -> GGUFFile:
    """Validate and memory-map a GGUF file. Raises ModelFileNotFoundError when it does not
    exist and ModelFileError for anything else wrong with it (see the module docstring)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ModelFileNotFoundError(f"model file not found: {p}")
    if not os.path.isfile(p):
        raise ModelFileError(f"model path is not a regular file: {p}")
    from . import _core

    Sequence.register(_core.GGUFStringArray)  # isinstance(tokens, Sequence) holds (idempotent)
    # The core raises ModelFileError itself (its messages name the file, entry and offset).
    return GGUFFile(_core.gguf_open(p), p)


def check_tensor_types(f: GGUFFile) -> None:
    """Every tensor has a type the compiled core computes with (the reader reads any type)."""
    from . import _core

    supported = {int(v["ggml_type"]): name for name, v in _core.type_info().items() if v["weight"]}
    for t in f.tensors.values():
        if t.ggml_type not in supported:
            raise ModelFileError(
                f"{f.path}: tensor '{t.name}' has ggml type {t.ggml_type} ({t.type_name}), "
                f"not supported (supported: {', '.join(sorted(supported.values()))})"
            )


# ---------------------------------------------------------------------------
# Typed access to metadata (every reader of metadata goes through these)
# ---------------------------------------------------------------------------
_MISSING = object()


def field_value(f: GGUFFile, key: str, default: Any = None) -> Any:
    """Value of metadata `key` (see GGUFFile.metadata), `default` if absent."""
    md = f.metadata
    if key not in md:
        return default
    return md[key]


def kv(f: GGUFFile, key: str, default: Any = _MISSING) -> Any:
    """Like field_value, falling back to the published 11B value (gguf_keys.DEFAULTS_11B: files
    written by Ollama lack the mllama_q.* keys), then to `default`; ModelFileError if none."""
    if key in f.metadata:
        return f.metadata[key]
    if key in K.DEFAULTS_11B:
        return K.DEFAULTS_11B[key]
    if default is not _MISSING:
        return default
    raise ModelFileError(f"{f.path}: missing metadata key '{key}'")


def _where(f: GGUFFile, key: str) -> str:
    if key in f.metadata:
        return f"{f.path}: metadata '{key}' ({f.metadata_type(key)} at byte {f.metadata.offset_of(key)})"
    return f"{f.path}: metadata '{key}'"


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _typed(f: GGUFFile, key: str, default: Any, ok, what: str) -> Any:
    """The value of `key` (`default` when absent) if ok(value), else a ModelFileError."""
    v = field_value(f, key, default)
    if v is None:
        raise ModelFileError(f"{f.path}: missing metadata key '{key}'")
    if not ok(v):
        raise ModelFileError(f"{_where(f, key)} must be {what}, got {_short(v)}")
    return v


def _is_number(v) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


def get_int(f: GGUFFile, key: str, default: Any = None) -> int:
    """An integer scalar (any GGUF integer type); `default` when absent; else ModelFileError."""
    return int(_typed(f, key, default, _is_int, "an integer"))


def get_float(f: GGUFFile, key: str, default: Any = None) -> float:
    """A number (float or integer scalar); `default` when absent; else ModelFileError."""
    return float(_typed(f, key, default, _is_number, "a number"))


def get_bool(f: GGUFFile, key: str, default: Any = None) -> bool:
    return bool(_typed(f, key, default, lambda v: isinstance(v, (bool, np.bool_)), "a bool"))


def get_str(f: GGUFFile, key: str, default: Any = None) -> str:
    return _typed(f, key, default, lambda v: isinstance(v, str), "a string")


def get_int_list(f: GGUFFile, key: str, default: Any = None) -> list[int]:
    """An integer array (or scalar) as a list of ints; `default` when absent."""

    def ok(v):
        return (
            _is_int(v)
            or (isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.integer))
            or (isinstance(v, (list, tuple)) and all(_is_int(x) for x in v))
        )

    v = _typed(f, key, default, ok, "a list of integers")
    return [int(v)] if _is_int(v) else [int(x) for x in v]


def get_string_array(f: GGUFFile, key: str):
    """A string array (the lazy sequence), None when absent; ModelFileError for another type."""
    v = field_value(f, key)
    if v is None:
        return None
    if not isinstance(v, _string_array_class()):
        raise ModelFileError(f"{_where(f, key)} must be an array of strings, got {_short(v)}")
    return v


def _short(v) -> str:
    if isinstance(v, np.ndarray):
        return f"an array of {v.size} {v.dtype}"
    if isinstance(v, str):
        return repr(v[:60] + ("..." if len(v) > 60 else ""))
    if isinstance(v, (bool, int, float)):
        return repr(v)
    if isinstance(v, list):
        return f"a nested array of {len(v)}"
    try:
        return f"an array of {len(v)} strings"
    except TypeError:
        return type(v).__name__


def check_architecture(f: GGUFFile, path=None) -> None:
    path = f.path if path is None else path
    if K.GENERAL_ARCHITECTURE not in f.metadata:
        raise ModelFileError(f"{path}: no '{K.GENERAL_ARCHITECTURE}' key: not a model GGUF")
    arch = get_str(f, K.GENERAL_ARCHITECTURE)
    if arch != K.ARCH:
        raise ModelFileError(
            f"{path}: architecture is {arch!r}, expected '{K.ARCH}' "
            "(Llama 3.2 Vision); this runtime reads only mllama files"
        )


def require_keys(f: GGUFFile, path, keys: Iterable[str]) -> None:
    missing = [k for k in keys if k not in f.metadata]
    if missing:
        raise ModelFileError(f"{path}: missing metadata key(s): {', '.join(missing)}")


def tensor_entry(t: TensorInfo) -> tuple:
    """(array, ggml_type, numpy shape) for _core: the mapped bytes, never copied."""
    return (t.data, t.ggml_type, t.shape)
