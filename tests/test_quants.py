"""Block formats, quantizers and dequantizers against their references.

References (never numbers our own code produced):
  * sizes: gguf-py's GGML_QUANT_SIZES;
  * dequantization: gguf-py's gguf.quants.dequantize;
  * quantization bytes: ggml's own output (ggml_quantize_chunk, no importance
    matrix), stored once in tests/data/ggml_golden.npz by
    tools/make_ggml_golden.py (CI cannot build llama.cpp); f16 also against
    numpy's IEEE conversion, bf16 and q8_0 also against gguf-py's quantizers;
  * quantization error: ggml's tests/test-quantize-fns.cpp thresholds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT

from mllama_q import _core, quants

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_ggml_golden", ROOT / "tools" / "make_ggml_golden.py")
golden_gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_gen)

GGUF_TYPE = {"f32": GT.F32, "f16": GT.F16, "bf16": GT.BF16, "q8_0": GT.Q8_0, "q4_k": GT.Q4_K, "q6_k": GT.Q6_K}
QUANT_TYPES = ("q8_0", "q4_k", "q6_k")
STORED_TYPES = ("f32", "f16", "bf16") + QUANT_TYPES


def bits(a: np.ndarray) -> np.ndarray:
    """float32 as raw bits: exact comparison that also tells -0.0 from 0.0 and compares NaNs."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ------------------------------------------------------------------ sizes
def test_type_sizes_match_gguf():
    info = quants.type_info()
    assert set(GGUF_TYPE) <= set(info)
    for name, v in info.items():
        gt = GT[name.upper()]
        assert v["ggml_type"] == int(gt), name
        assert (v["block_size"], v["type_size"]) == gguf.GGML_QUANT_SIZES[gt], name
    # the weight types are exactly the tensor types we store; q8_k is only an activation format
    assert {name for name, v in info.items() if v["weight"]} == set(GGUF_TYPE)
    assert info["q8_k"]["weight"] is False


@pytest.mark.parametrize("qtype", STORED_TYPES)
def test_row_bytes_match_gguf(qtype):
    block, size = gguf.GGML_QUANT_SIZES[GGUF_TYPE[qtype]]
    for n in (256, 4096, 14336):
        assert quants.row_bytes(qtype, n) == n // block * size
    x = np.zeros((3, 512), np.float32)
    assert quants.quantize(x, qtype).shape == tuple(gguf.quant_shape_to_byte_shape(x.shape, GGUF_TYPE[qtype]))


# ------------------------------------------------------------------ dequantize vs gguf-py
def _random_rows(seed: int, rows: int, cols: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-4, 3, size=(rows, 1))
    x = rng.standard_normal((rows, cols)) * scale
    x[0] = 0.0  # all-zero row
    x[1] = np.abs(x[1])  # positive row (Q4_K min = 0)
    x[2, ::7] *= 50  # outliers
    return x.astype(np.float32)


@pytest.mark.parametrize("qtype", STORED_TYPES)
def test_dequantize_matches_gguf_on_our_data(qtype):
    x = _random_rows(1, 64, 1024)
    q = quants.quantize(x, qtype)
    ours = quants.dequantize(q, qtype, x.shape)
    ref = gguf.quants.dequantize(q, GGUF_TYPE[qtype])
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_array_equal(bits(ours), bits(ref))


def _random_blocks(qtype: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes forming valid blocks: every fp16 field finite (the quants may be anything)."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[GGUF_TYPE[qtype]]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    half_fields = {"q8_0": [0], "q4_k": [0, 2], "q6_k": [208], "f16": list(range(0, size, 2))}.get(qtype, [])
    for off in half_fields:
        h = raw[:, off : off + 2].copy().view(np.uint16)
        exp_all_ones = (h & 0x7C00) == 0x7C00
        h[exp_all_ones] &= 0xBFFF  # inf/nan -> finite (clear the top exponent bit)
        raw[:, off : off + 2] = h.view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", ("f16", "bf16") + QUANT_TYPES)
def test_dequantize_matches_gguf_on_random_blocks(qtype):
    block, size = gguf.GGML_QUANT_SIZES[GGUF_TYPE[qtype]]
    n_blocks = 2048 if block > 1 else 65536
    raw = _random_blocks(qtype, n_blocks, seed=2).reshape(-1, 8 * size)  # 8 blocks per row
    shape = (raw.shape[0], 8 * block)
    ours = quants.dequantize(raw, qtype, shape)
    ref = gguf.quants.dequantize(raw, GGUF_TYPE[qtype])
    np.testing.assert_array_equal(bits(ours), bits(ref))


# ------------------------------------------------------------------ quantization error (ggml's thresholds)
# ggml tests/test-quantize-fns.cpp: data 0.1 + 2*cos(i + offset) for i < 32*128
# (generate_data), error = sqrt(sum (x - dequant(quant(x)))^2) / n
# (array_rmse), and every type used here must stay below
# MAX_QUANTIZATION_TOTAL_ERROR = 0.002.
MAX_QUANTIZATION_TOTAL_ERROR = 0.002


@pytest.mark.parametrize("qtype", ("f16", "bf16") + QUANT_TYPES)
def test_quantization_error_within_ggml_threshold(qtype):
    n = 32 * 128
    # generate_data(0.0, n, dst): dst[i] = 0.1 + 2.0f*cosf(i + 0.0f), summed in double, stored as float
    c = np.cos(np.arange(n, dtype=np.float32))  # float32 like cosf
    x = (0.1 + (np.float32(2.0) * c).astype(np.float64)).astype(np.float32)
    y = quants.dequantize(quants.quantize(x[None], qtype), qtype, (1, n))[0]
    diff = x.astype(np.float64) - y.astype(np.float64)
    err = np.sqrt(np.sum(diff * diff)) / n
    assert 0 < err < MAX_QUANTIZATION_TOTAL_ERROR, f"{qtype}: {err}"


# ------------------------------------------------------------------ bytes identical to ggml
@pytest.fixture(scope="module")
def golden():
    with np.load(ROOT / "tests" / "data" / "ggml_golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("path", _core.quant_paths())
@pytest.mark.parametrize("qtype", golden_gen.TYPES)
def test_bytes_identical_to_ggml(golden, qtype, path):
    x, labels = golden_gen.make_rows(qtype, int(golden["seed"]), int(golden[f"{qtype}/random_rows"]))
    assert golden_gen.digest(x) == str(golden[f"{qtype}/input_sha256"]), (
        "regenerated input rows differ from those the golden bytes were made from (tools/make_ggml_golden.py changed?)"
    )
    want = golden[f"{qtype}/bytes"]
    try:
        _core.set_quant_path(path)
        got = quants.quantize(x, qtype)
    finally:
        _core.set_quant_path("auto")
    assert got.shape == want.shape
    bad = np.nonzero((got != want).any(axis=1))[0]
    assert bad.size == 0, f"{bad.size}/{len(x)} {qtype} rows differ from ggml, e.g. " + "; ".join(
        labels[r] for r in bad[:10]
    )


# ------------------------------------------------------------------ f16 / bf16 edge cases
def test_f16_matches_numpy_ieee():
    rows = [r for _, r in golden_gen.f16_special_rows()]
    rng = np.random.default_rng(3)
    rows.append(rng.integers(0, 2**32, size=65536, dtype=np.uint64).astype(np.uint32).view(np.float32))
    x = np.concatenate(rows).astype(np.float32)
    ours = quants.quantize(x[None], "f16")[0].view(np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert nan.any() and np.isinf(ref.view(np.float16)).any() and (ref & 0x7C00 == 0).any()  # cases present
    np.testing.assert_array_equal(ours[~nan], ref[~nan])
    # ggml turns every NaN into a quiet NaN of the same sign with no payload.
    np.testing.assert_array_equal(ours[nan], np.where(np.signbit(x[nan]), 0xFE00, 0x7E00).astype(np.uint16))
    # and back: exact widening (numpy agrees on every non-NaN half)
    back = quants.dequantize(ours.view(np.uint8), "f16", x.shape)
    np.testing.assert_array_equal(bits(back[~nan]), bits(ref[~nan].view(np.float16).astype(np.float32)))


def test_bf16_matches_gguf_quantizer():
    rows = [r for _, r in golden_gen.f16_special_rows()]
    rng = np.random.default_rng(4)
    rows.append(rng.integers(0, 2**32, size=65536, dtype=np.uint64).astype(np.uint32).view(np.float32))
    x = np.concatenate(rows).astype(np.float32)
    ours = quants.quantize(x[None], "bf16")[0]
    ref = gguf.quants.quantize(x[None], GT.BF16)[0]  # "same as ggml_compute_fp32_to_bf16"
    np.testing.assert_array_equal(ours, ref)


def test_q8_0_matches_gguf_quantizer():
    x = _random_rows(5, 32, 1024)
    np.testing.assert_array_equal(quants.quantize(x, "q8_0"), gguf.quants.quantize(x, GT.Q8_0))


# ------------------------------------------------------------------ API behaviour
def test_quantize_keeps_leading_dims_and_matches_rows():
    x = _random_rows(6, 6, 512).reshape(2, 3, 512)
    q = quants.quantize(x, "q4_k")
    assert q.shape == (2, 3, quants.row_bytes("q4_k", 512)) and q.dtype == np.uint8
    np.testing.assert_array_equal(q.reshape(6, -1), quants.quantize(x.reshape(6, 512), "q4_k"))
    np.testing.assert_array_equal(q[1, 2], quants.quantize(x[1, 2], "q4_k"))
    y = quants.dequantize(q, "Q4_K", x.shape)  # type names are case-insensitive
    assert y.shape == x.shape


def test_thread_count_does_not_change_bytes():
    x = _random_rows(7, 40, 2048)
    n = _core.num_threads()
    try:
        _core.set_num_threads(1)
        one = [quants.quantize(x, t) for t in QUANT_TYPES]
    finally:
        _core.set_num_threads(n)
    for t, q in zip(QUANT_TYPES, one):
        np.testing.assert_array_equal(q, quants.quantize(x, t))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: quants.quantize(np.zeros((2, 256), np.float64), "q4_k"), "float32"),
        (lambda: quants.quantize(np.zeros((2, 256), np.float16), "q8_0"), "float32"),
        (lambda: quants.quantize(np.zeros((2, 256), ">f4"), "q8_0"), "float32"),
        (lambda: quants.quantize([[0.0] * 256], "q8_0"), "numpy.ndarray"),
        (lambda: quants.quantize(np.zeros((2, 100), np.float32), "q4_k"), "multiple of"),
        (lambda: quants.quantize(np.zeros((2, 48), np.float32), "q8_0"), "multiple of"),
        (lambda: quants.quantize(np.zeros((512, 2), np.float32).T, "q4_k"), "contiguous"),
        (lambda: quants.quantize(np.zeros((4, 512), np.float32)[:, ::2], "q4_k"), "contiguous"),
        (lambda: quants.quantize(np.float32(1.0), "q8_0"), "ndarray|axis"),
        (lambda: quants.quantize(np.frombuffer(bytes(1025), np.float32, 256, offset=1), "q8_0"), "aligned"),
        (lambda: quants.quantize(np.zeros((2, 0), np.float32), "q8_0"), "non-empty"),
        (lambda: quants.quantize(np.zeros((2, 256), np.float32), "q5_k"), "unknown type"),
        (lambda: quants.quantize(np.zeros((2, 256), np.float32), 12), "string"),
        (lambda: quants.dequantize(np.zeros(143, np.uint8), "q4_k", (256,)), "143 bytes"),
        (lambda: quants.dequantize(np.zeros(288, np.uint8), "q4_k", (1, 256)), "bytes"),
        (lambda: quants.dequantize(np.zeros(144, np.uint8), "q4_k", (1, 100)), "multiple of"),
        (lambda: quants.dequantize(np.zeros((2, 288), np.uint8)[:, ::2], "q4_k", (2, 256)), "contiguous"),
        (lambda: quants.dequantize(np.zeros(144, np.uint8), "nope", (256,)), "unknown type"),
        (lambda: quants.dequantize(np.zeros(144, np.uint8), "q4_k", ()), "shape"),
        (lambda: quants.dequantize(np.zeros(144, np.uint8), "q4_k", (-1, 256)), "shape"),
        (lambda: quants.dequantize(np.zeros(144, np.uint8), "q4_k", (1.5, 256)), "shape"),
        (lambda: quants.dequantize(b"\0" * 144, "q4_k", (256,)), "numpy.ndarray"),
        (lambda: _core.set_quant_path("sse9"), "unknown quantizer path"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
