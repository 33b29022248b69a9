"""Fuzz family `gguf`: mutated GGUF files loaded by the bare reader and by `Model(...)`.

Seeds (valid files, written once under <cache>/fuzz-seeds-v1/, see `seed_files`):
    micro  a complete synthetic mllama model (mllama_q.cli.synthetic) small enough that the
           metadata and tensor table are ~7 % of its 218 KB: most mutations hit structure
    tiny   the synthetic `tiny` model (2.7 MB, the demo's): real tiny dimensions, Q4_K/Q6_K
    types  every metadata value type (incl. nested arrays), every typed tensor dtype and a few
           block types, written by gguf-py (architecture "fuzz": Model refuses it, the reader
           must read it exactly as gguf-py does)

Mutations (one structural, then with probability 0.3 one blind byte-level op), chosen by a
generator seeded with (seed, case index) and stored in the case as concrete byte edits, so a
saved case replays without the generator:
    field    a length / count / type id / n_dims / dimension / tensor offset / header count /
             numeric value set to an interesting value (0, 1, +-1, powers of two, 2^63, 2^64-1,
             the file size, NaN / inf for floats, random)
    flip     1-8 random bytes or bits in the metadata and tensor table
    cut      truncation (at a field boundary or anywhere)
    rebuild  the file re-serialised with a metadata entry or tensor-table entry duplicated,
             dropped, swapped, or replaced by a value of another type (random scalar, string,
             array, nested array, huge counts), or general.alignment added / changed
    data     garbage over tensor data (Model loads; the forward pass must survive it)
    blind    insert / delete bytes, a random flip, a cut

run(case): the reader opens the file and touches every value, string and tensor (and, for the
`types` seed, must agree with gguf-py whenever both accept the file); then Model(path) with
vision on or off and, if it loads, a 3-token forward pass and a tokenizer round trip. Only a
ModelFileError is a clean failure: any other exception is re-raised as `Unclean`
(not a ValueError), so the runner counts it.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

FILE_SUFFIX = ".gguf"
SEED_VERSION = "v1"
SEED_WEIGHTS = (("micro", 0.70), ("tiny", 0.15), ("types", 0.15))

VT_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
VT_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


class Unclean(Exception):
    """Raised by run() for any failure that is not a ModelFileError (deliberately not a ValueError)."""


# ----------------------------------------------------------------------------- seeds
def _micro_config():
    from mllama_q.cli.synthetic import SynthConfig

    return SynthConfig(
        "fuzz-micro",
        vocab_size=320,
        hidden=64,
        intermediate=128,
        n_layer=2,
        cross_layers=[1],
        n_head=2,
        n_head_kv=1,
        v_hidden=32,
        v_intermediate=64,
        v_layers=2,
        v_global_layers=1,
        v_heads=2,
        v_intermediate_indices=[1],
        image_size=28,
        patch_size=14,
        max_tiles=2,
        aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )


def _write_types(path: Path) -> None:
    import gguf

    V, T = gguf.GGUFValueType, gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "fuzz")
    for i, (vt, val) in enumerate(
        [
            (V.UINT8, 7),
            (V.INT8, -3),
            (V.UINT16, 700),
            (V.INT16, -700),
            (V.UINT32, 70000),
            (V.INT32, -70000),
            (V.FLOAT32, 0.25),
            (V.BOOL, True),
            (V.STRING, "ünï"),
            (V.UINT64, 2**40),
            (V.INT64, -(2**40)),
            (V.FLOAT64, 1e-9),
        ]
    ):
        w.add_key_value(f"s.{i}", val, vt)
    for i, (vt, val) in enumerate(
        [
            (V.UINT8, [1, 2, 3]),
            (V.INT32, [5, -5]),
            (V.FLOAT32, [1.5, 2.5]),
            (V.BOOL, [True, False]),
            (V.STRING, ["a", "bb", "", "c d"]),
            (V.UINT64, [9]),
            (V.FLOAT64, [3.0]),
        ]
    ):
        w.add_key_value(f"a.{i}", val, V.ARRAY, sub_type=vt)
    w.add_key_value("n.0", [[1, 2], [3]], V.ARRAY, sub_type=V.ARRAY)
    w.add_key_value("n.1", [["x"], ["y", "z"]], V.ARRAY, sub_type=V.ARRAY)
    w.add_key_value("n.2", [[[0.5]]], V.ARRAY, sub_type=V.ARRAY)
    w.add_tensor("f32", rng.standard_normal((3, 4)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal(8).astype(np.float16))
    w.add_tensor("i32", rng.integers(-9, 9, (2, 2, 2)).astype(np.int32))
    w.add_tensor("f64", rng.standard_normal(2))
    for t in (T.BF16, T.Q8_0, T.Q4_K):
        size = gguf.GGML_QUANT_SIZES[t][1]
        w.add_tensor(f"raw.{t.name}", rng.integers(0, 256, (2, size), dtype=np.uint8), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def seed_dir() -> Path:
    from mllama_q.cli.synthetic import default_cache_dir

    return default_cache_dir() / f"fuzz-seeds-{SEED_VERSION}"


def seed_files() -> dict[str, Path]:
    """The seed files, written on first use (atomically: tmp + rename)."""
    from mllama_q.cli.synthetic import write_synthetic_gguf

    d = seed_dir()
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("micro", "tiny", "types"):
        p = d / f"{name}.gguf"
        if not p.is_file():
            tmp = d / f".{name}.{os.getpid()}.gguf"
            if name == "micro":
                write_synthetic_gguf(tmp, _micro_config(), "q4_k_m", seed=0, progress=False)
            elif name == "tiny":
                write_synthetic_gguf(tmp, "tiny", "q4_k_m", seed=0, progress=False)
            else:
                _write_types(tmp)
            os.replace(tmp, p)
        out[name] = p
    return out


# ----------------------------------------------------------------------------- seed layout
@dataclass
class Field:
    offset: int
    size: int  # 4 or 8 bytes
    kind: str  # strlen | count | vtype | etype | ndims | dim | ggml_type | toffset | header | value_<vt>


@dataclass
class Layout:
    """Where everything is in a VALID seed (parsed here with struct, independently of the
    reader under test)."""

    data: bytes
    version: int
    kvs: list  # (start, end, key)
    tis: list  # (start, end, name)
    fields: list
    kv_start: int
    ti_start: int
    ti_end: int
    data_start: int
    alignment: int
    sha: str = ""


def _walk(data: bytes) -> Layout:
    pos = 24
    fields = [Field(4, 4, "header"), Field(8, 8, "header"), Field(16, 8, "header")]
    version, n_t, n_kv = struct.unpack_from("<IQQ", data, 4)

    def string(kind="strlen"):
        nonlocal pos
        n = struct.unpack_from("<Q", data, pos)[0]
        fields.append(Field(pos, 8, kind))
        s = data[pos + 8 : pos + 8 + n]
        pos += 8 + n
        return s

    def u32(kind):
        nonlocal pos
        fields.append(Field(pos, 4, kind))
        pos += 4
        return struct.unpack_from("<I", data, pos - 4)[0]

    def value(vt):
        nonlocal pos
        if vt == 8:
            string()
        elif vt == 9:
            et = u32("etype")
            fields.append(Field(pos, 8, "count"))
            n = struct.unpack_from("<Q", data, pos)[0]
            pos += 8
            for _ in range(n):
                value(et)
        else:
            fields.append(Field(pos, VT_SIZES[vt], f"value_{vt}"))
            pos += VT_SIZES[vt]

    kvs, alignment = [], 32
    for _ in range(n_kv):
        start = pos
        key = string().decode()
        vt = u32("vtype")
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", data, pos)[0]
        value(vt)
        kvs.append((start, pos, key))
    ti_start = pos
    tis = []
    for _ in range(n_t):
        start = pos
        name = string().decode()
        for _ in range(u32("ndims")):
            fields.append(Field(pos, 8, "dim"))
            pos += 8
        u32("ggml_type")
        fields.append(Field(pos, 8, "toffset"))
        pos += 8
        tis.append((start, pos, name))
    data_start = pos + (-pos) % alignment
    return Layout(
        data, version, kvs, tis, fields, 24, ti_start, pos, data_start, alignment, hashlib.sha256(data).hexdigest()[:16]
    )


_SEEDS: dict[str, Layout] = {}


def seeds() -> dict[str, Layout]:
    if not _SEEDS:
        for name, p in seed_files().items():
            _SEEDS[name] = _walk(p.read_bytes())
    return _SEEDS


# ----------------------------------------------------------------------------- cases
@dataclass
class GGUFCase:
    index: int
    seed_name: str
    seed_sha: str
    ops: list = field(default_factory=list)  # concrete edits, see apply()
    vision: bool = True
    note: str = ""

    def materialize(self) -> bytes:
        lay = seeds()[self.seed_name]
        if lay.sha != self.seed_sha:
            raise RuntimeError(f"seed {self.seed_name} changed since the case was made ({lay.sha} != {self.seed_sha})")
        return apply(lay, self.ops)

    def describe(self) -> str:
        ops = "; ".join(_op_str(o) for o in self.ops)
        return f"case {self.index}: seed {self.seed_name}, vision={self.vision}: {self.note}: {ops}"


def _op_str(op) -> str:
    parts = []
    for a in op:
        if isinstance(a, (bytes, bytearray)):
            parts.append(a[:24].hex() + ("..." if len(a) > 24 else "") + f"({len(a)}B)")
        elif isinstance(a, list):
            parts.append("[" + ",".join(str(x) if isinstance(x, int) else f"<{len(x)}B>" for x in a[:40]) + "]")
        else:
            parts.append(str(a))
    return " ".join(parts)


def apply(lay: Layout, ops) -> bytes:
    """ops, in order, on the seed's bytes:
    ("set", offset, bytes)         overwrite (may extend past the end)
    ("cut", n)                     keep the first n bytes
    ("insert", offset, bytes) / ("delete", offset, n)
    ("rebuild", version, kvs, tis, n_kv, n_tensors, alignment)
                                   header + metadata entries + tensor-table entries (each an
                                   index into the seed's entries or raw bytes) + padding to
                                   `alignment` + the seed's tensor data; counts as given"""
    data = bytearray(lay.data)
    for op in ops:
        kind = op[0]
        if kind == "set":
            _, off, b = op
            if off > len(data):
                data.extend(bytes(off - len(data)))
            data[off : off + len(b)] = b
        elif kind == "cut":
            del data[op[1] :]
        elif kind == "insert":
            data[op[1] : op[1]] = op[2]
        elif kind == "delete":
            del data[op[1] : op[1] + op[2]]
        elif kind == "rebuild":
            _, version, kvs, tis, n_kv, n_t, align = op
            body = bytearray(b"GGUF" + struct.pack("<IQQ", version, n_t, n_kv))
            for k in kvs:
                body += k if isinstance(k, (bytes, bytearray)) else lay.data[lay.kvs[k][0] : lay.kvs[k][1]]
            for t in tis:
                body += t if isinstance(t, (bytes, bytearray)) else lay.data[lay.tis[t][0] : lay.tis[t][1]]
            body += bytes((-len(body)) % max(1, align))
            data = body + lay.data[lay.data_start :]
        else:
            raise ValueError(f"unknown op {kind!r}")
    return bytes(data)


def _interesting(rng, size: int, orig: int, file_size: int) -> int:
    top = (1 << (8 * size)) - 1
    pool = [
        0,
        1,
        2,
        3,
        4,
        7,
        8,
        12,
        13,
        16,
        31,
        32,
        33,
        63,
        64,
        255,
        256,
        4095,
        65535,
        65536,
        2**31 - 1,
        2**31,
        2**32 - 1,
        2**32,
        2**40,
        2**62,
        2**63 - 1,
        2**63,
        2**64 - 1,
        orig + 1,
        orig - 1,
        orig * 2,
        orig + file_size,
        file_size,
        file_size // 2,
        top,
        top - 1,
    ]
    if rng.random() < 0.2:
        return int(rng.integers(0, top, endpoint=True, dtype=np.uint64))
    return int(pool[rng.integers(len(pool))]) & top


def _str(b) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def _random_value(rng, depth: int = 0) -> tuple[int, bytes]:
    """(value type, payload) of a random, structurally VALID value (array counts small)."""
    vt = int(rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]))
    if vt == 9 and depth >= 3:
        vt = 4
    if vt == 8:
        n = int(rng.choice([0, 1, 5, 300]))
        return vt, _str(
            bytes(rng.integers(32, 127, n, dtype=np.uint8))
            if rng.random() < 0.8
            else bytes(rng.integers(0, 256, n, dtype=np.uint8))
        )
    if vt == 9:
        et = int(rng.choice([0, 4, 5, 6, 7, 8, 9, 11]))
        n = int(rng.choice([0, 1, 2, 3, 16, 1000]))
        if et == 9:
            parts = [_random_array(rng, depth + 1) for _ in range(min(n, 4))]
            return vt, struct.pack("<IQ", 9, len(parts)) + b"".join(parts)
        if et == 8:
            return vt, struct.pack("<IQ", 8, n) + b"".join(_str(f"t{i}") for i in range(n))
        if et == 7:
            return vt, struct.pack("<IQ", 7, n) + bytes(rng.integers(0, 2, n, dtype=np.uint8))
        return vt, struct.pack("<IQ", et, n) + bytes(rng.integers(0, 256, n * VT_SIZES[et], dtype=np.uint8))
    if vt == 7:
        return vt, bytes([int(rng.integers(0, 2))])
    if vt in (6, 12):
        v = float(rng.choice([0.0, -1.0, 1e-30, 1e30, math.inf, -math.inf, math.nan, 0.5]))
        return vt, struct.pack(VT_FMT[vt], v)
    return vt, bytes(rng.integers(0, 256, VT_SIZES[vt], dtype=np.uint8))


def _random_array(rng, depth: int) -> bytes:
    """Payload of a random valid array value (element type, count, elements)."""
    for _ in range(8):
        vt, payload = _random_value(rng, depth)
        if vt == 9:
            return payload
    return struct.pack("<IQ", 4, 1) + struct.pack("<I", 5)


def _extreme(rng, vt: int) -> bytes:
    if vt in (6, 12):
        return struct.pack(
            VT_FMT[vt],
            float(
                rng.choice([0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 1e-45, 3.4e38, 1e300 if vt == 12 else 1e38])
            ),
        )
    size = VT_SIZES[vt]
    top = (1 << (8 * size)) - 1
    pool = [0, 1, top, top // 2, top // 2 + 1, 2, 3, 10**6 & top]
    v = pool[int(rng.integers(len(pool)))]  # (rng.choice would turn 2^64 - 1 into a float)
    return v.to_bytes(size, "little")


def _mutate(rng, lay: Layout) -> tuple[list, str]:
    """One structural mutation of the seed + maybe one blind op; returns (ops, note)."""
    size = len(lay.data)
    meta_end = lay.ti_end
    ops: list = []
    r = rng.random()
    if r < 0.35:
        # a kind first, then a field of it: string lengths would otherwise be most picks
        kinds = sorted({f.kind for f in lay.fields})
        kind = kinds[int(rng.integers(len(kinds)))]
        group = [f for f in lay.fields if f.kind == kind]
        f = group[int(rng.integers(len(group)))]
        orig = int.from_bytes(lay.data[f.offset : f.offset + f.size], "little")
        if f.kind.startswith("value_") and rng.random() < 0.6:
            new = _extreme(rng, int(f.kind.split("_")[1]))
        elif f.kind in ("vtype", "etype", "ggml_type") and rng.random() < 0.7:
            ids = list(range(0, 42)) + [2**31 - 1, 2**32 - 1]
            new = ids[int(rng.integers(len(ids)))].to_bytes(4, "little")
        else:
            new = _interesting(rng, f.size, orig, size).to_bytes(f.size, "little")
        ops.append(("set", f.offset, new))
        note = f"field {f.kind} at {f.offset}"
    elif r < 0.55:
        n = int(rng.integers(1, 9))
        for _ in range(n):
            off = int(rng.integers(0, meta_end)) if rng.random() < 0.9 else int(rng.integers(0, size))
            b = lay.data[off] ^ (1 << int(rng.integers(8))) if rng.random() < 0.5 else int(rng.integers(256))
            ops.append(("set", off, bytes([b])))
        note = f"{n} byte flips"
    elif r < 0.65:
        if rng.random() < 0.6:
            f = lay.fields[int(rng.integers(len(lay.fields)))]
            cut = f.offset + int(rng.integers(0, f.size + 1))
        else:
            cut = int(rng.integers(0, size))
        ops.append(("cut", cut))
        note = f"cut at {cut}"
    elif r < 0.95:
        ops.append(_rebuild(rng, lay))
        note = "rebuild"
    else:
        n = int(rng.integers(1, 64))
        off = int(rng.integers(lay.data_start, size - n)) if size - n > lay.data_start else lay.data_start
        ops.append(("set", off, bytes(rng.integers(0, 256, n, dtype=np.uint8))))
        note = f"{n} garbage bytes in tensor data"
    if rng.random() < 0.3:
        b = rng.random()
        off = int(rng.integers(0, meta_end))
        if b < 0.3:
            ops.append(("insert", off, bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))))
        elif b < 0.6:
            ops.append(("delete", off, int(rng.integers(1, 16))))
        elif b < 0.85:
            ops.append(("set", off, bytes([int(rng.integers(256))])))
        else:
            ops.append(("cut", int(rng.integers(0, size))))
        note += " + blind"
    return ops, note


def _rebuild(rng, lay: Layout) -> tuple:
    kvs = list(range(len(lay.kvs)))
    tis = list(range(len(lay.tis)))
    version, align = lay.version, lay.alignment
    what = int(rng.integers(9))
    if what == 0 and kvs:  # duplicate a metadata entry
        i = int(rng.integers(len(kvs)))
        kvs.insert(int(rng.integers(len(kvs) + 1)), kvs[i])
    elif what == 1 and tis:  # duplicate a tensor-table entry
        i = int(rng.integers(len(tis)))
        tis.insert(int(rng.integers(len(tis) + 1)), tis[i])
    elif what == 2 and kvs:  # drop a metadata entry (a required key goes missing)
        kvs.pop(int(rng.integers(len(kvs))))
    elif what == 3 and tis:  # drop a tensor
        tis.pop(int(rng.integers(len(tis))))
    elif what == 4 and len(kvs) > 1:  # swap two entries (order must not matter)
        a, b = rng.choice(len(kvs), 2, replace=False)
        kvs[a], kvs[b] = kvs[b], kvs[a]
        if len(tis) > 1:
            a, b = rng.choice(len(tis), 2, replace=False)
            tis[a], tis[b] = tis[b], tis[a]
    elif what in (5, 6) and kvs:  # a value of another type under a real key (type confusion)
        i = int(rng.integers(len(kvs)))
        key = lay.kvs[kvs[i]][2]
        vt, payload = _random_value(rng)
        kvs[i] = _str(key) + struct.pack("<I", vt) + payload
    elif what == 7:  # general.alignment added or changed (offsets then no longer line up)
        aligns = [0, 1, 2, 3, 8, 16, 64, 4096, 2**31, 2**32 - 1]
        align = aligns[int(rng.integers(len(aligns)))]
        kvs = [k for k in kvs if lay.kvs[k][2] != "general.alignment"]
        kvs.insert(int(rng.integers(len(kvs) + 1)), _str("general.alignment") + struct.pack("<II", 4, align))
        if align == 0 or align & (align - 1):
            align = 32
        elif align > 4096:
            align = 4096
    else:  # a new entry with a random (valid) value, or garbage bytes as an entry
        vt, payload = _random_value(rng)
        blob = _str(f"fuzz.key{int(rng.integers(1000))}") + struct.pack("<I", vt) + payload
        if rng.random() < 0.2:
            blob = bytes(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8))
        kvs.insert(int(rng.integers(len(kvs) + 1)), blob)
    n_kv, n_t = len(kvs), len(tis)
    if rng.random() < 0.1:
        n_kv = max(0, n_kv + [-1, 1, 2**20][int(rng.integers(3))])
    return ("rebuild", version, kvs, tis, n_kv, n_t, align)


def generate(seed: int, n: int) -> Iterator[GGUFCase]:
    # Runs in the runner's parent: the seeds and every module run() needs are loaded here once,
    # so each forked child inherits them instead of importing them again.
    import mllama_q.generate  # noqa: F401
    import mllama_q.model  # noqa: F401
    import mllama_q.processor  # noqa: F401
    import mllama_q.tokenizer  # noqa: F401

    lays = seeds()
    names = [s for s, _ in SEED_WEIGHTS]
    weights = np.array([w for _, w in SEED_WEIGHTS])
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        ops, note = _mutate(rng, lays[name])
        yield GGUFCase(i, name, lays[name].sha, ops, vision=bool(rng.random() < 0.5), note=note)


# ----------------------------------------------------------------------------- run
_SCRATCH: list[str] = []


def _scratch() -> str:
    if not _SCRATCH:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        d = tempfile.mkdtemp(prefix="mllama-q-fuzz-gguf-", dir=base)
        atexit.register(shutil.rmtree, d, True)  # the runner's children leave with os._exit
        _SCRATCH.append(d)
    return _SCRATCH[0]


def _touch_value(v) -> None:
    from mllama_q.gguf_file import ModelFileError

    if isinstance(v, np.ndarray):
        v.sum() if v.dtype != np.bool_ else v.any()
    elif isinstance(v, list):
        for x in v:
            _touch_value(x)
    elif hasattr(v, "json_list"):  # a lazy string array
        n = len(v)
        for i in (0, n // 2, n - 1) if n else ():
            try:
                v[i]
            except ModelFileError:
                pass
        try:
            v.json_list()
            v.tolist()
        except ModelFileError:
            pass


def _check_reader(path: str) -> None:
    """Open with the bare reader and read everything; self-consistency is asserted."""
    from mllama_q.gguf_file import ModelFileError, open_gguf

    f = open_gguf(path)  # ModelFileError: refused
    size = f.size
    for k in f.metadata:
        f.metadata_type(k)
        try:
            _touch_value(f.metadata[k])
        except ModelFileError:
            pass
    for t in f.tensors.values():
        if not (t.offset % f.alignment == 0 and t.offset + t.nbytes <= size and t.offset >= f.data_offset):
            raise Unclean(f"reader accepted tensor {t.name!r} at {t.offset}+{t.nbytes} in a {size}-byte file")
        d = t.data
        if d.nbytes != t.nbytes:
            raise Unclean(f"tensor {t.name!r}: view of {d.nbytes} bytes for {t.nbytes}")
        if d.size:
            d.reshape(-1).view(np.uint8)[::251].sum()
    f.close()


def _agrees_with_gguf_py(path: str) -> None:
    """The `types` seed's mutants: when both readers accept a file, they must read the same."""
    import gguf

    from mllama_q.gguf_file import ModelFileError, open_gguf

    try:
        ours = open_gguf(path)
    except ModelFileError:
        return
    try:
        ref = gguf.GGUFReader(path)
    except Exception:  # noqa: BLE001 - gguf-py refuses what we accept: see the reader's list
        return  # (it fails on files it cannot view, e.g. tensors past the end, differently)
    if list(ours.tensors) != [t.name for t in ref.tensors] or list(ours.metadata) != [
        k for k in ref.fields if not k.startswith("GGUF.")
    ]:
        raise Unclean("our reader and gguf-py list different keys or tensors")
    for t in ref.tensors:
        o = ours.tensors[t.name]
        if (o.offset, o.nbytes, o.ggml_type) != (int(t.data_offset), int(t.n_bytes), int(t.tensor_type)):
            raise Unclean(
                f"tensor {t.name!r}: ours {(o.offset, o.nbytes, o.ggml_type)}, gguf-py "
                f"{(int(t.data_offset), int(t.n_bytes), int(t.tensor_type))}"
            )
    for k, fld in ref.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            want = fld.contents()
        except Exception:  # noqa: BLE001 - e.g. a string that is not UTF-8: we fail on access too
            continue
        try:
            v = ours.metadata[k]
        except ModelFileError:
            raise Unclean(f"metadata {k!r}: gguf-py reads it, we do not") from None
        if isinstance(v, list) and len(_leaf_kinds(v)) > 1:
            continue  # gguf-py reads every sub-array with element 0's type (its FIXME); we do not
        got = v if isinstance(v, (int, float, bool, str)) else _flat(v)
        if got != want and not (isinstance(want, float) and math.isnan(want) and math.isnan(got)):
            if isinstance(want, list) and _nan_equal(got, want):
                continue
            raise Unclean(f"metadata {k!r}: ours {str(got)[:100]} != gguf-py {str(want)[:100]}")


def _leaf_kinds(v) -> set:
    if isinstance(v, list):
        return set().union(*(_leaf_kinds(x) for x in v)) if v else set()
    return {str(v.dtype) if isinstance(v, np.ndarray) else "string"}


def _flat(v):
    if isinstance(v, list):
        return [x for item in v for x in _flat(item)]
    return v.tolist()


def _nan_equal(a, b) -> bool:
    return len(a) == len(b) and all(
        x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)) for x, y in zip(a, b)
    )


def _check_model(path: str, vision: bool) -> None:
    from mllama_q.model import Model

    m = Model(path, vision=vision, n_ctx=32, n_threads=1)  # ModelFileError: a clean refusal
    if m.text_hparams["vocab_size"] >= 3:
        m.forward([0, 1, 2])
    tok = m.tokenizer
    if tok is not None:
        ids = tok.encode("Hello <|image|> wörld 123")
        tok.decode(ids)
        dec = tok.stream_decoder()
        for i in ids:
            dec.push(i)
        dec.flush()


def run(case: GGUFCase) -> None:
    """Raises ModelFileError when the mutant is refused (clean), Unclean for anything else wrong."""
    from mllama_q.gguf_file import ModelFileError

    path = os.path.join(_scratch(), f"case-{os.getpid()}.gguf")
    with open(path, "wb") as f:
        f.write(case.materialize())
    try:
        refused = None
        try:
            _check_reader(path)
        except ModelFileError as e:
            refused = e
        if case.seed_name == "types":
            _agrees_with_gguf_py(path)
        else:
            try:
                _check_model(path, case.vision)
            except ModelFileError as e:
                refused = refused or e
            else:
                if refused is not None:
                    raise Unclean(f"the reader refused the file but Model loaded it: {refused}")
        if refused is not None:
            raise refused
    except (ModelFileError, Unclean):
        raise
    except Exception as e:  # noqa: BLE001 - anything but ModelFileError is a finding
        raise Unclean(f"{type(e).__name__}: {e}") from e
    finally:
        os.unlink(path)
