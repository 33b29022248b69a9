"""CPU matmul Y = X · Wᵀ on every kernel path this CPU supports.

References (never our own code):
  * W: `gguf.quants.dequantize` (gguf-py) in float64;
  * X as the quantized kernels see it: the Q8_0 activations through
    `gguf.quants.quantize` (bit-exact with ggml's quantize_row_q8_0_ref), the
    Q8_K activations through `q8_K_ref` below, a line-by-line transcription of
    ggml's quantize_row_q8_K_ref (ggml-quants.c).

Two checks per case:
  1. vs the exact float64 product X·Wᵀ, within a bound derived from the
     activation quantization: each X value moves by at most half a quant step
     (plus the fp16 rounding of Q8_0's scale), so |Y - Y64| <= sum_k |W_k| * step_k / 2 * c.
  2. vs float64 (dequantized X)·Wᵀ: the integer part of the kernels is exact,
     so only float32 rounding is left: a tight relative bound.
Float weights (F32/F16/BF16) use X as is and the float32 bound of check 2.

Test weights are random VALID blocks (random quant bytes, controlled finite
fp16 scales) so these tests do not depend on any quantizer.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants as gq

from mllama_q import _core

PATHS = list(_core.cpu_paths())
QTYPES = {"q8_0": GT.Q8_0, "q4_k": GT.Q4_K, "q6_k": GT.Q6_K}
BLOCK = {"q8_0": (32, 34), "q4_k": (256, 144), "q6_k": (256, 210)}

# (M, N, K): every M of the spec, N with tile remainders (1, 5 = 4+1, 250 = 62*4+2),
# K non-power-of-two multiples of 256; small N for large M to stay fast.
CASES = [
    (1, 1, 256),
    (1, 250, 1280),
    (2, 5, 768),
    (3, 96, 1280),
    (7, 250, 256),
    (8, 33, 512),
    (13, 17, 768),
    (16, 96, 768),
    (64, 5, 1280),
    (300, 5, 768),
    (300, 1, 256),
]


@pytest.fixture(autouse=True)
def _restore_path():
    # Restore the path the process started with (MLLAMA_Q_CPU_PATH may have forced one:
    # "auto" here would switch a forced-avx2 suite to avx512 for every later test).
    before = _core.cpu_path()
    yield
    _core.set_cpu_path(before)


def random_quant_weights(rng, qtype: str, n: int, k: int) -> np.ndarray:
    """Random valid blocks: random bytes, then the fp16 scale fields set to finite values."""
    bs, ts = BLOCK[qtype]
    nb = n * k // bs
    raw = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)

    def put_f16(col, lo, hi):
        v = (rng.uniform(lo, hi, nb) * rng.choice([-1.0, 1.0], nb)).astype(np.float16)
        raw[:, col : col + 2] = v.view(np.uint8).reshape(nb, 2)

    if qtype == "q8_0":
        put_f16(0, 1e-3, 1e-2)  # d
    elif qtype == "q4_k":
        put_f16(0, 1e-4, 1e-3)  # d
        put_f16(2, 1e-4, 1e-3)  # dmin
    else:
        put_f16(ts - 2, 1e-4, 1e-3)  # d (last field)
    return raw.reshape(n, -1)


def float_weights(rng, wtype: str, n: int, k: int):
    """(bytes [n, row_bytes], exact float64 values [n, k])."""
    f = rng.standard_normal((n, k)).astype(np.float32)
    if wtype == "f32":
        return f.view(np.uint8).reshape(n, -1), f.astype(np.float64)
    if wtype == "f16":
        h = f.astype(np.float16)
        return h.view(np.uint8).reshape(n, -1), h.astype(np.float64)
    b = (f.view(np.uint32) >> 16).astype(np.uint16)  # bf16 = top half of the float
    return b.view(np.uint8).reshape(n, -1), (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def q8_K_blocks(x: np.ndarray):
    """ggml's quantize_row_q8_K_ref transcribed (float32 maths): (d [nb], qs [nb, 256], bsums [nb, 16])."""
    b = x.reshape(-1, 256).astype(np.float32)
    imax = np.abs(b).argmax(axis=1)  # first index of the largest |x|
    mx = b[np.arange(len(b)), imax]
    d = np.zeros(len(b), np.float32)
    qs = np.zeros(b.shape, np.int8)
    nz = mx != 0
    iscale = (np.float32(-127.0) / mx[nz]).astype(np.float32)
    q = np.minimum(np.rint((iscale[:, None] * b[nz]).astype(np.float32)), 127)  # nearest_int: ties to even
    qs[nz] = q.astype(np.int8)
    d[nz] = (np.float32(1.0) / iscale).astype(np.float32)
    bsums = qs.reshape(-1, 16, 16).astype(np.int16).sum(axis=2, dtype=np.int16)
    return d, qs, bsums


def q8_K_ref(x: np.ndarray) -> np.ndarray:
    """Dequantized Q8_K activations, as ggml's quantize_row_q8_K_ref makes them."""
    d, qs, _ = q8_K_blocks(x)
    return (qs.astype(np.float32) * d[:, None]).reshape(x.shape).astype(np.float64)


def q8_0_ref(x: np.ndarray) -> np.ndarray:
    m, k = x.shape
    q = gq.quantize(x.astype(np.float32), GT.Q8_0)
    return gq.dequantize(q, GT.Q8_0).reshape(m, k).astype(np.float64)


def act_step_bound(x: np.ndarray, block: int, fp16_scale: bool) -> np.ndarray:
    """Per-value bound on |x - dequant(quant(x))|: half a quant step amax/127,
    plus, for Q8_0's fp16 scale, |q| <= 127 times its relative rounding 2^-11."""
    m, k = x.shape
    amax = np.abs(x.astype(np.float64)).reshape(m, k // block, block).max(axis=2)
    step = amax / 127.0
    c = 0.5 + (127 * 2.0**-11 if fp16_scale else 1e-6)
    return np.repeat(step * c, block, axis=1)  # [m, k]


def run(path, x, w, wtype, n, k):
    _core.set_cpu_path(path)
    return _core.matmul(x, w, wtype, n, k).astype(np.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wtype", ["q4_k", "q6_k", "q8_0"])
def test_quantized_matmul_vs_float64(path, wtype):
    rng = np.random.default_rng(zlib.crc32(f"{path}/{wtype}".encode()))
    for m, n, k in CASES + ([(9, 5, 96), (3, 7, 800)] if wtype == "q8_0" else []):  # odd Q8_0 block counts
        x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10)).astype(np.float32)
        w = random_quant_weights(rng, wtype, n, k)
        wd = gq.dequantize(w, QTYPES[wtype]).reshape(n, k).astype(np.float64)
        y = run(path, x, w, wtype, n, k)
        assert y.shape == (m, n)

        # 1. exact product, within the activation-quantization bound
        y64 = x.astype(np.float64) @ wd.T
        blk, fp16 = (32, True) if wtype == "q8_0" else (256, False)
        bound = act_step_bound(x, blk, fp16) @ np.abs(wd).T
        absmag = np.abs(x.astype(np.float64)) @ np.abs(wd).T
        assert np.all(np.abs(y - y64) <= bound * 1.0001 + 1e-5 * absmag), (path, wtype, m, n, k)

        # 2. same activation quants as the kernel: only float32 rounding differs
        xq = q8_0_ref(x) if wtype == "q8_0" else q8_K_ref(x)
        yq = xq @ wd.T
        magq = np.abs(xq) @ np.abs(wd).T
        err = np.abs(y - yq) / np.maximum(magq, 1e-30)
        assert err.max() < 1e-5, (path, wtype, m, n, k, err.max())


# The panel route (M >= 16 where a path has one: Q4_K/Q6_K/Q8_0 on AVX2 and AVX-512, whose
# Q8_0 panel shifts W by 128): a second panel of 1 row (M = 17), several panel chunks of 8
# panels (M = 300: 19 panels, the last with 12 rows), odd N (W groups of 4 / 2 / 1, two 32-row W
# chunks for N = 37) and an odd Q8_0 block count (K = 800: 25 blocks).
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wtype", ["q8_0", "q4_k", "q6_k"])
def test_panel_sizes_vs_float64_and_scalar(path, wtype):
    rng = np.random.default_rng(zlib.crc32(f"panel/{path}/{wtype}".encode()))
    k = 800 if wtype == "q8_0" else 768
    for m in (16, 17, 64, 300):
        for n in (7, 37):
            x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10)).astype(np.float32)
            w = random_quant_weights(rng, wtype, n, k)
            wd = gq.dequantize(w, QTYPES[wtype]).reshape(n, k).astype(np.float64)
            y = run(path, x, w, wtype, n, k)
            xq = q8_0_ref(x) if wtype == "q8_0" else q8_K_ref(x)
            yq = xq @ wd.T
            magq = np.abs(xq) @ np.abs(wd).T
            err = np.abs(y - yq) / np.maximum(magq, 1e-30)
            assert err.max() < 1e-5, (path, wtype, m, n, err.max())
            ys = run("scalar", x, w, wtype, n, k)
            assert (np.abs(y - ys) / np.maximum(magq, 1e-30)).max() < 1e-5, (path, wtype, m, n)


# Batch invariance (csrc/cpu/matmul.h Route), what the text decoder's sessions and the server
# rely on: whichever route computes a row, its bits do not depend on M or on the other rows
# (here: every subset of rows equals the same rows computed with all the others), and "auto"
# is the panel from 16 rows on, the tiles below. The panel for fewer than 16 rows (a padded
# panel: the decoder's short prompt chunks) stays within the kernels' float32 bound. K = 768
# and 4608 (the AVX-512 tiles' block pairs and single blocks, kPairMaxK = 4096).
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wtype", ["q4_k", "q6_k", "q8_0", "f16"])
def test_routes_are_batch_invariant(path, wtype):
    rng = np.random.default_rng(zlib.crc32(f"route/{path}/{wtype}".encode()))
    _core.set_cpu_path(path)
    n = 13
    for k in (768, 4608):
        x = (rng.standard_normal((40, k)) * rng.uniform(0.1, 10)).astype(np.float32)
        if wtype == "f16":
            w, wd = float_weights(rng, wtype, n, k)
        else:
            w = random_quant_weights(rng, wtype, n, k)
            wd = gq.dequantize(w, QTYPES[wtype]).reshape(n, k).astype(np.float64)
        full = {r: _core.matmul(x, w, wtype, n, k, route=r) for r in ("tiles", "panel")}
        for rows in (slice(0, 1), slice(7, 10), slice(3, 20), slice(1, 40)):
            for r in ("tiles", "panel"):
                got = _core.matmul(np.ascontiguousarray(x[rows]), w, wtype, n, k, route=r)
                assert np.array_equal(got, full[r][rows]), (path, wtype, k, r, rows)
            auto = _core.matmul(np.ascontiguousarray(x[rows]), w, wtype, n, k)
            assert np.array_equal(auto, full["panel" if rows.stop - rows.start >= 16 else "tiles"][rows])
        if wtype != "f16":
            xq = q8_0_ref(x) if wtype == "q8_0" else q8_K_ref(x)
            yq = xq @ wd.T
            magq = np.abs(xq) @ np.abs(wd).T
            for r in ("tiles", "panel"):
                err = np.abs(full[r] - yq) / np.maximum(magq, 1e-30)
                assert err.max() < 1e-5, (path, wtype, k, r, err.max())
        else:
            assert np.array_equal(full["tiles"], full["panel"])  # one kernel for float types


@pytest.mark.parametrize("path", PATHS)
def test_q8_0_extreme_codes(path):
    """Q8_0 products at the int8 extremes: every X quant is +-127 (each row constant in
    magnitude) and every W code is -128, -127 or 127, so each pair of products is
    +-2 * 128 * 127 = 32512, the most an int16 lane can hold (a kernel that offsets
    a code by 128 or adds two pairs in int16 saturates and fails here)."""
    rng = np.random.default_rng(zlib.crc32(f"extreme/{path}".encode()))
    n, k = 6, 320
    w = random_quant_weights(rng, "q8_0", n, k).reshape(-1, 34)
    w[:, 2:] = rng.choice(np.array([0x80, 0x81, 0x7F], np.uint8), size=(w.shape[0], 32))
    w[: w.shape[0] // 2, 2:] = 0x80  # half the blocks all -128
    w = w.reshape(n, -1)
    wd = gq.dequantize(w, GT.Q8_0).reshape(n, k).astype(np.float64)
    for m in (1, 2, 5, 16, 17):
        x = (rng.choice([-1.0, 1.0], size=(m, k)) * rng.uniform(0.5, 2, size=(m, 1))).astype(np.float32)
        xq = q8_0_ref(x)
        assert np.all(np.abs(np.abs(xq) - np.abs(x)) < 1e-3 * np.abs(x))  # |q| = 127 everywhere
        y = run(path, x, w, "q8_0", n, k)
        yq = xq @ wd.T
        magq = np.abs(xq) @ np.abs(wd).T
        assert (np.abs(y - yq) / magq).max() < 1e-5, (path, m)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wtype", ["f32", "f16", "bf16"])
def test_float_matmul_vs_float64(path, wtype):
    rng = np.random.default_rng(zlib.crc32(f"{path}/{wtype}".encode()))
    # K values that are not multiples of 8 / 16 exercise the SIMD tails.
    for m, n, k in CASES + [(5, 7, 100), (2, 3, 257), (1, 9, 7)]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w, wd = float_weights(rng, wtype, n, k)
        y = run(path, x, w, wtype, n, k)
        y64 = x.astype(np.float64) @ wd.T
        mag = np.abs(x.astype(np.float64)) @ np.abs(wd).T
        # float32 products are exact in float64; summation error <= K * 2^-24 * sum|x w|
        bound = k * 2.0**-24 * mag
        assert np.all(np.abs(y - y64) <= bound), (path, wtype, m, n, k)
        # and in practice far below that worst case (pairwise / lane-split sums)
        assert (np.abs(y - y64) / np.maximum(mag, 1e-30)).max() < 1e-5


@pytest.mark.skipif(len(PATHS) < 2, reason="only the scalar path runs on this CPU")
@pytest.mark.parametrize("wtype", ["q4_k", "q6_k", "q8_0", "f32", "f16", "bf16"])
def test_simd_paths_match_scalar(wtype):
    rng = np.random.default_rng(7)
    for m, n, k in [(1, 250, 1280), (7, 96, 768), (64, 5, 256)]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        if wtype in QTYPES:
            w = random_quant_weights(rng, wtype, n, k)
            wd = gq.dequantize(w, QTYPES[wtype]).reshape(n, k).astype(np.float64)
        else:
            w, wd = float_weights(rng, wtype, n, k)
        mag = np.abs(x.astype(np.float64)) @ np.abs(wd).T
        ys = run("scalar", x, w, wtype, n, k)
        for p in PATHS[1:]:
            yp = run(p, x, w, wtype, n, k)
            assert (np.abs(yp - ys) / mag).max() < 1e-5, (p, wtype, m, n, k)


@pytest.mark.parametrize("path", PATHS)
def test_activation_q8_K_bytes_match_ggml(path):
    """The activation quantizer of each path gives ggml's quantize_row_q8_K_ref bytes,
    including zero blocks, ties of |max| with both signs, and huge/tiny magnitudes."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(256 * 8).astype(np.float32)
    x[256:512] = 0  # zero block
    x[512:768] *= 1e-30  # tiny
    x[768:1024] *= 1e30  # huge
    x[1024 + 5], x[1024 + 9] = -7.0, 7.0  # |max| tie: the first (negative) wins
    x[1280:1536] = np.round(x[1280:1536] * 4) / 4  # many exact .5 ties after scaling
    x[1536:1792] = 3.0  # constant block
    raw = _core.quantize_q8_K_path(x, path)
    blk = raw.reshape(-1, 292)
    d, qs, bsums = q8_K_blocks(x)
    np.testing.assert_array_equal(blk[:, :4].copy().view(np.float32)[:, 0], d)
    np.testing.assert_array_equal(blk[:, 4:260].view(np.int8), qs)
    np.testing.assert_array_equal(blk[:, 260:].copy().view(np.int16), bsums)


@pytest.mark.parametrize("path", PATHS)
def test_activation_q8_0_bytes_match_ggml(path):
    """Q8_0 activations of each path == gguf-py's Q8_0 quantize (bit-exact with ggml's reference),
    including exact .5 ties (roundf rounds them away from zero), zero and huge/tiny blocks."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal(32 * 64).astype(np.float32)
    x[32:64] = 0
    x[64:96] *= 1e-30
    x[96:128] *= 1e30
    x[128:160] = np.arange(-16, 16) * 0.5  # amax 8 -> many x*id exactly at .5
    x[160:192] = np.float32(127 / 2) * np.sign(rng.standard_normal(32))
    x[192:2048] = np.round(x[192:2048] * 8) / 8
    raw = _core.quantize_q8_0_path(x, path)
    with np.errstate(over="ignore"):  # the 1e30 block's scale is inf in fp16
        ref = gq.quantize(x.reshape(1, -1), GT.Q8_0).reshape(-1)
    np.testing.assert_array_equal(raw, ref)


def test_matmul_m0_and_thread_counts():
    rng = np.random.default_rng(3)
    w = random_quant_weights(rng, "q4_k", 9, 512)
    assert _core.matmul(np.zeros((0, 512), np.float32), w, "q4_k", 9, 512).shape == (0, 9)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    n0 = _core.num_threads()
    try:
        _core.set_num_threads(1)
        y1 = _core.matmul(x, w, "q4_k", 9, 512)
        _core.set_num_threads(3)
        y3 = _core.matmul(x, w, "q4_k", 9, 512)
    finally:
        _core.set_num_threads(n0)
    np.testing.assert_array_equal(y1, y3)  # each output is computed by one thread: no order change


def test_bad_input_raises_value_error():
    rng = np.random.default_rng(5)
    w = random_quant_weights(rng, "q4_k", 4, 256)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="float32"):
        _core.matmul(x.astype(np.float64), w, "q4_k", 4, 256)
    with pytest.raises(ValueError, match="2-D"):
        _core.matmul(x[0], w, "q4_k", 4, 256)
    with pytest.raises(ValueError, match="columns"):
        _core.matmul(x[:, :128].copy(), w, "q4_k", 4, 256)
    with pytest.raises(ValueError, match="multiple"):
        _core.matmul(rng.standard_normal((2, 100)).astype(np.float32), w, "q4_k", 4, 100)
    with pytest.raises(ValueError, match="bytes"):
        _core.matmul(x, w[:3], "q4_k", 4, 256)
    with pytest.raises(ValueError, match="contiguous"):
        _core.matmul(np.asfortranarray(rng.standard_normal((3, 256)).astype(np.float32)), w, "q4_k", 4, 256)
    with pytest.raises(ValueError, match="contiguous"):
        _core.matmul(x, np.concatenate([w, w], axis=1)[:, ::2], "q4_k", 4, 256)
    with pytest.raises(ValueError, match="unknown tensor type"):
        _core.matmul(x, w, "q5_k", 4, 256)
    with pytest.raises(ValueError, match="activation format"):
        _core.matmul(x, w, "q8_k", 4, 256)
    with pytest.raises(ValueError, match="route must be"):
        _core.matmul(x, w, "q4_k", 4, 256, route="fast")
    with pytest.raises(ValueError, match="unknown CPU path"):
        _core.set_cpu_path("sse9")


def test_unsupported_forced_path_from_env_is_a_clear_error(child_env):
    """MLLAMA_Q_CPU_PATH naming a path that does not exist raises, never falls back silently."""
    code = (
        "import numpy as np\nfrom mllama_q import _core\n"
        "try:\n"
        "    _core.matmul(np.zeros((1, 32), np.float32), np.zeros((1, 128), np.uint8), 'f32', 1, 32)\n"
        "except ValueError as e:\n    print('VE', e)\n"
    )
    # The child imports this process's mllama_q (child_env), not a source tree without _core
    # that happens to be its working directory.
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(MLLAMA_Q_CPU_PATH="neon"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tempfile.gettempdir(),
    )
    assert "VE MLLAMA_Q_CPU_PATH: unknown CPU path 'neon'" in out.stdout, out.stdout + out.stderr


def test_feature_detection_is_consistent():
    f = _core.cpu_features()
    assert PATHS[0] == "scalar"
    assert ("avx2" in PATHS) == (f["avx2"] and f["fma"] and f["f16c"])
    assert ("avx512" in PATHS) == (
        "avx2" in PATHS and f["avx512f"] and f["avx512bw"] and f["avx512vl"] and f["avx512dq"] and f["avx512vnni"]
    )
    # (A compiler without -mavxvnni, GCC < 11, builds without the path: this then fails, on purpose.)
    # The developer check build (CMake MLLAMA_Q_AVXVNNI_EVEX) runs avxvnni on AVX-512 VNNI CPUs too.
    evex = _core.avxvnni_evex_build() and f["avx512vl"] and f["avx512vnni"]
    assert ("avxvnni" in PATHS) == ("avx2" in PATHS and (f["avxvnni"] or evex))
    # (A compiler without -mamx-int8, GCC < 11, builds without the amx path: this then fails, on purpose.)
    assert ("amx" in PATHS) == ("avx512" in PATHS and f["amx"])
    assert PATHS == [p for p in ("scalar", "avx2", "avxvnni", "avx512", "amx") if p in PATHS]  # the table's order


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_vendor_detection_and_prefetch_distance():
    """The CPUID vendor the decode prefetch distance is chosen by agrees with the kernel's
    /proc/cpuinfo vendor_id; Zen cores (AMD, Hygon) get 8192 bytes, the others 2048."""
    vendors = {
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("vendor_id")
    }
    if not vendors:
        pytest.skip("no vendor_id in /proc/cpuinfo (not x86)")
    amd = vendors <= {"AuthenticAMD", "HygonGenuine"}
    assert _core.cpu_features()["amd"] == amd
    assert _core.w_prefetch_bytes() == (8192 if amd else 2048)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_amx_detection_matches_the_kernel():
    """cpu_features()['amx'] (CPUID + XCR0 + the arch_prctl tile permission) against the
    kernel's own view: the amx_tile and amx_int8 flags Linux lists once it enables the tile
    state. A refused permission on an AMX CPU would leave the path off silently: this fails."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert _core.cpu_features()["amx"] == ({"amx_tile", "amx_int8"} <= flags)


@pytest.mark.parametrize("name", ["avx2", "avxvnni", "avx512", "amx"])
def test_forcing_a_path_this_cpu_lacks_is_a_clear_error(name, child_env):
    """A known path this CPU (or build) cannot run is refused with the paths it can, from
    set_cpu_path and from MLLAMA_Q_CPU_PATH (e.g. avxvnni on a CPU without AVX-VNNI)."""
    if name in PATHS:
        pytest.skip(f"this CPU runs {name}")
    with pytest.raises(ValueError, match=f"CPU path '{name}' is not supported by this CPU/build"):
        _core.set_cpu_path(name)
    code = "from mllama_q import _core\ntry:\n    _core.cpu_path()\nexcept ValueError as e:\n    print('VE', e)\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(MLLAMA_Q_CPU_PATH=name),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tempfile.gettempdir(),
    )
    assert f"VE MLLAMA_Q_CPU_PATH: CPU path '{name}' is not supported" in out.stdout, out.stdout + out.stderr


@pytest.mark.skipif("avxvnni" not in PATHS, reason="no avxvnni path: this CPU has no AVX-VNNI (or AVX2)")
@pytest.mark.parametrize("wtype", ["q8_0", "q4_k", "q6_k"])
def test_avxvnni_same_floats_as_avx2(wtype):
    """The avxvnni path is the AVX2 kernels with vpdpbusd / vpdpwssd for the int8 multiply-adds:
    the same int32 block sums (the AVX2 sequence never saturates on these formats) and the same
    float operations, so the same bits, on the tiles (M < 16, decode M <= 2) and the panels
    (M >= 16). (Correctness against gguf-py's dequantization: the tests above, on every path.)"""
    rng = np.random.default_rng(zlib.crc32(f"vnni/{wtype}".encode()))
    k = 800 if wtype == "q8_0" else 768
    for m in (1, 2, 3, 8, 13, 16, 17, 300):
        n = 37
        x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10)).astype(np.float32)
        w = random_quant_weights(rng, wtype, n, k)
        np.testing.assert_array_equal(run("avxvnni", x, w, wtype, n, k), run("avx2", x, w, wtype, n, k))


@pytest.mark.skipif("amx" not in PATHS, reason="no amx path: this CPU has no AMX-INT8 (or AVX-512 VNNI)")
@pytest.mark.parametrize("wtype", ["q8_0", "q4_k", "q6_k"])
def test_amx_same_floats_as_avx512(wtype):
    """The amx path is the avx512 path with the Q8_0 panel (M >= 16) on AMX tiles: TDPBSSD's
    int32 block sums are dot_q8_0's, and the float epilogue is the avx512 panel's in the same
    order, so the same bits; W row counts around the 16-row tile groups (the rest goes to the
    avx512 panel), K of 1 and 2 blocks and odd block counts (the even / odd tile pipeline).
    Q4_K / Q6_K: the avx512 kernels themselves (a check of the path's table)."""
    rng = np.random.default_rng(zlib.crc32(f"amx/{wtype}".encode()))
    ks = (32, 64, 800, 1280) if wtype == "q8_0" else (768,)
    for k in ks:
        for m, n in ((16, 16), (17, 37), (31, 15), (300, 48), (40, 33)):
            x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10)).astype(np.float32)
            w = random_quant_weights(rng, wtype, n, k)
            np.testing.assert_array_equal(run("amx", x, w, wtype, n, k), run("avx512", x, w, wtype, n, k))


def test_kernels_run_in_a_forked_child():
    """A process that used the thread pool and then forks (multiprocessing's fork start method,
    a pre-forking server, the fuzz runner): the child has none of the pool's worker threads,
    and its kernels must still run (single-threaded) with the same results, not wait forever."""
    import os
    import select
    import signal
    import time

    if not hasattr(os, "fork"):
        pytest.skip("no fork() on this platform")
    rng = np.random.default_rng(11)
    w = random_quant_weights(rng, "q4_k", 256, 512)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    n0 = _core.num_threads()
    _core.set_num_threads(2)
    try:
        y = _core.matmul(x, w, "q4_k", 256, 512)  # the pool's workers exist and have run a loop
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: one thread; report the result bytes, never return into pytest
            try:
                os.close(r)
                out = _core.matmul(x, w, "q4_k", 256, 512).tobytes()
                _core.set_num_threads(2)  # the pool can be sized again in the child
                out += _core.matmul(x, w, "q4_k", 256, 512).tobytes()
                with os.fdopen(wfd, "wb") as f:
                    f.write(out)
            finally:
                os._exit(0)
        os.close(wfd)
        data, deadline = b"", time.monotonic() + 120
        with os.fdopen(r, "rb") as f:
            while time.monotonic() < deadline:
                if not select.select([f], [], [], 1.0)[0]:
                    continue
                chunk = os.read(f.fileno(), 1 << 20)
                if not chunk:
                    break
                data += chunk
            else:
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert data, "the forked child's matmul did not finish within 120 s (it waited for workers)"
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        got = np.frombuffer(data, np.float32).reshape(2, *y.shape)
        np.testing.assert_array_equal(got[0], y)
        np.testing.assert_array_equal(got[1], y)
    finally:
        _core.set_num_threads(n0)


# AVX-512 Q4_K / Q6_K tiles: two blocks per step (X as block pairs) up to K = 4096, one
# block per step above; both sides of that limit, odd block counts (K = 1280: 5 blocks,
# 4352: 17) and every tile row count M = 1..8 (8 x 1 tiles, remainders of 4, 2, 1), on
# every path, against the float64 product of the reference activation quants and scalar.
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wtype", ["q4_k", "q6_k"])
def test_k_quant_tiles_around_pair_limit_vs_float64_and_scalar(path, wtype):
    rng = np.random.default_rng(zlib.crc32(f"pair/{path}/{wtype}".encode()))
    for k in (1280, 4096, 4352):
        w = random_quant_weights(rng, wtype, 9, k)
        wd = gq.dequantize(w, QTYPES[wtype]).reshape(9, k).astype(np.float64)
        x = rng.standard_normal((8, k)).astype(np.float32)
        for m in range(1, 9):
            xq = q8_K_ref(x[:m])
            magq = np.abs(xq) @ np.abs(wd).T
            y = run(path, x[:m], w, wtype, 9, k)
            assert (np.abs(y - xq @ wd.T) / np.maximum(magq, 1e-30)).max() < 1e-5, (path, wtype, m, k)
            if path != "scalar":
                ys = run("scalar", x[:m], w, wtype, 9, k)
                assert (np.abs(y - ys) / np.maximum(magq, 1e-30)).max() < 1e-5, (path, wtype, m, k)
