"""Backend ops (csrc/backend/backend.h) on every backend, against float64 / torch references and,
for the CUDA backend, against the CPU backend.

Every op test takes the `be` fixture, parametrised over BACKENDS: "cpu" always runs;
"cuda" (csrc/cuda/) skips cleanly without a usable CUDA device
(mllama_q.backends()["cuda"]["usable"]). The CPU cases of the CUDA-sized shapes also check
the harness itself (random blocks, references) on any machine. The CPU backend's kernel paths
(scalar / AVX2 / AVX-512 direct and flash attention) are tested at the end.

Every CUDA allocation is filled with NaN bytes (MLLAMA_Q_CUDA_POISON=1, read when the CUDA
backend is created) so an output element a kernel forgot to write fails the finite checks;
inputs are fresh random data for every case (`rng`: seeded by the test's id, so a case sees
the same data whatever runs before it), and repeated runs must give identical bits.

Weights are random *valid* GGUF blocks (random scales and quants, any bytes are a valid block
apart from the fp16 scales), dequantized for the reference by gguf-py's
gguf.quants.dequantize (the formats reference; where gguf is not installed, by
mllama_q.quants.dequantize, which test_quants.py ties to it).

Tolerances (relative Frobenius error vs float64):
  * matmul at M = 1 on Q4_K / Q6_K / Q8_0 (and on the CPU at every M): x is quantized to
    8 bits per 32-value block (d = max|x| / 127), an error of ~0.5 % of |x| -> 2e-2;
  * matmul at M > 1 on CUDA (tensor cores): x and W rounded to f16 (11-bit mantissa) -> 3e-3;
  * float weights at M = 1: f32 arithmetic -> 1e-5;
  * norms, elementwise: f32 -> 1e-6 on the CPU, 1e-5 on CUDA (fast math);
  * attention: f32 with the fast exp -> 1e-5 on the CPU, 1e-4 on CUDA; CUDA's tensor-core
    attention (nq >= 64, hd 64/80/128) rounds q, k, v, p to f16 -> 5e-3.
"""

import os
import zlib

import numpy as np
import pytest

os.environ.setdefault("MLLAMA_Q_CUDA_POISON", "1")  # read when the CUDA backend is created

import mllama_q  # noqa: E402
from mllama_q import _core  # noqa: E402

torch = pytest.importorskip("torch")
from op_refs import attention_ref, rel, rope_ref  # noqa: E402

F = torch.nn.functional
try:
    import gguf
except ImportError:  # the GPU machine's image may lack gguf (or its pyyaml dependency)
    gguf = None

CUDA = mllama_q.backends()["cuda"]
BACKENDS = ["cpu", "cuda"]
WTYPES = ["f32", "f16", "bf16", "q8_0", "q4_k", "q6_k"]
QUANTIZED = {"q8_0", "q4_k", "q6_k"}
NORM_TOL = {"cpu": 1e-6, "cuda": 1e-5}


@pytest.fixture(scope="module", params=BACKENDS)
def be(request):
    """The backend under test (module-scoped: one CUDA context for the whole module)."""
    if request.param == "cuda" and not CUDA["usable"]:
        pytest.skip(f"no usable CUDA device (CUDA built: {CUDA['built']})")
    return _core.Backend(request.param)


@pytest.fixture(scope="module")
def cpu():
    """The CPU backend, as the comparison for the CUDA backend."""
    return _core.Backend("cpu")


@pytest.fixture
def rng(request):
    """Random data for one test case, seeded by its id (independent of test order and workers)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def kind(be) -> str:
    return "cpu" if be.name == "cpu" else "cuda"


def scales_f16(rng, shape, lo=0.5, hi=1.5, exp=-7):
    return (rng.uniform(lo, hi, shape) * 2.0**exp).astype(np.float16).view(np.uint8).reshape(*shape, 2)


def random_weight(rng, wtype, n, k):
    """Random valid GGUF bytes for n rows of k values: uint8 [n, row_bytes]."""
    if wtype == "f32":
        return rng.standard_normal((n, k)).astype(np.float32).view(np.uint8)
    if wtype == "f16":
        return (rng.standard_normal((n, k)) * 0.5).astype(np.float16).view(np.uint8)
    if wtype == "bf16":
        bits = rng.standard_normal((n, k)).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8).reshape(n, 2 * k)
    if wtype == "q8_0":
        nb = k // 32
        blk = np.empty((n, nb, 34), np.uint8)
        blk[..., 0:2] = scales_f16(rng, (n, nb), exp=-6)
        blk[..., 2:] = rng.integers(-128, 128, (n, nb, 32)).astype(np.int8).view(np.uint8)
        return blk.reshape(n, nb * 34)
    if wtype == "q4_k":
        nb = k // 256
        blk = rng.integers(0, 256, (n, nb, 144), dtype=np.uint8)
        blk[..., 0:2] = scales_f16(rng, (n, nb), exp=-8)  # d
        blk[..., 2:4] = scales_f16(rng, (n, nb), exp=-9)  # dmin
        return blk.reshape(n, nb * 144)
    if wtype == "q6_k":
        nb = k // 256
        blk = rng.integers(0, 256, (n, nb, 210), dtype=np.uint8)
        blk[..., 208:210] = scales_f16(rng, (n, nb), exp=-9)  # d (scales are random int8)
        return blk.reshape(n, nb * 210)
    raise ValueError(wtype)


def dequant(w, wtype, n, k):
    """Reference weights: gguf-py's dequantize (the formats reference). Without gguf,
    mllama_q.quants.dequantize, which tests/test_quants.py checks equals gguf-py's."""
    if gguf is not None:
        qt = getattr(gguf.GGMLQuantizationType, wtype.upper())
        return gguf.quants.dequantize(w, qt).reshape(n, k).astype(np.float64)
    from mllama_q import quants

    return quants.dequantize(np.ascontiguousarray(w), wtype, (n, k)).astype(np.float64)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        _core.Backend("tpu")


def test_backend_name(be):
    if kind(be) == "cuda":
        assert be.name.startswith("cuda:0")
    else:
        assert be.name == "cpu"


# ---- matmul -----------------------------------------------------------------------

SHAPES = [(256, 64), (1024, 200), (2304, 384), (4096, 129)]  # (K, N): K multiples of 256, odd N for tails


@pytest.mark.parametrize("wtype", WTYPES)
@pytest.mark.parametrize("M", [1, 2, 7, 64, 300, 512])
@pytest.mark.parametrize("K,N", SHAPES)
def test_matmul_vs_reference_and_cpu(be, cpu, rng, wtype, M, K, N):
    if M >= 300 and K >= 2304 and wtype not in ("q4_k", "f16"):
        pytest.skip("large M x K covered by q4_k and f16 (keeps the CPU reference fast)")
    w = random_weight(rng, wtype, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32) if N % 2 else None
    y = be.matmul(x, w, wtype, N, K, bias)
    assert y.shape == (M, N) and np.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    ref = x.astype(np.float64) @ dequant(w, wtype, N, K).T
    if bias is not None:
        ref += bias
    if M == 1 or (kind(be) == "cpu" and wtype in QUANTIZED):  # the CPU backend quantizes x at every M
        tol = 2e-2 if wtype in QUANTIZED else 1e-5
    else:
        tol = 3e-3
    assert rel(y, ref) < tol
    y_cpu = cpu.matmul(x, w, wtype, N, K, bias)
    assert rel(y, y_cpu) < tol + rel(y_cpu, ref)
    # deterministic: the same inputs give the same bits
    assert np.array_equal(be.matmul(x, w, wtype, N, K, bias), y)


@pytest.mark.parametrize("wtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("M", [1, 5])
def test_matmul_float_odd_k(be, rng, wtype, M):
    """Float weights with K not a multiple of 8 take the scalar loaders."""
    K, N = 100, 33
    w = random_weight(rng, wtype, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y = be.matmul(x, w, wtype, N, K, None)
    assert np.isfinite(y).all()
    assert rel(y, x.astype(np.float64) @ dequant(w, wtype, N, K).T) < (1e-5 if M == 1 else 3e-3)


def test_matmul_q8_0_k_not_multiple_of_256(be, rng):
    K, N = 32 * 13, 70
    w = random_weight(rng, "q8_0", N, K)
    for M in (1, 3):
        x = rng.standard_normal((M, K)).astype(np.float32)
        y = be.matmul(x, w, "q8_0", N, K, None)
        tol = 2e-2 if M == 1 or kind(be) == "cpu" else 3e-3
        assert rel(y, x.astype(np.float64) @ dequant(w, "q8_0", N, K).T) < tol


def test_matmul_real_decode_shapes(be, rng):
    """11B decode shapes (M = 1): q/o (4096x4096), k/v (1024x4096), down (4096x14336)."""
    for wtype, (N, K) in [
        ("q4_k", (4096, 4096)),
        ("q4_k", (1024, 4096)),
        ("q6_k", (4096, 14336)),
        ("q8_0", (1024, 4096)),
    ]:
        w = random_weight(rng, wtype, N, K)
        x = rng.standard_normal((1, K)).astype(np.float32)
        y = be.matmul(x, w, wtype, N, K, None)
        assert rel(y, x.astype(np.float64) @ dequant(w, wtype, N, K).T) < 2e-2


def test_matmul_rejects_activation_type(be):
    w = np.zeros((4, 292), np.uint8)
    with pytest.raises(ValueError):
        be.matmul(np.ones((1, 256), np.float32), w, "q8_k", 4, 256)


# ---- get_rows / store_rows ------------------------------------------------------------


@pytest.mark.parametrize("wtype", WTYPES)
def test_get_rows(be, rng, wtype):
    rows, cols = 37, 512
    t = random_weight(rng, wtype, rows, cols)
    ids = rng.integers(0, rows, 23).astype(np.int32)
    ids[0] = rows - 1
    out = be.get_rows(t, wtype, rows, cols, ids)
    ref = dequant(t, wtype, rows, cols)[ids]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_get_rows_of_quantized_table(be, rng):
    """Rows of a table quantized by mllama_q.quants (Q8_0: d * q is exact in f32) equal gguf-py's."""
    from mllama_q import quants

    table = rng.standard_normal((10, 64)).astype(np.float32)
    q = quants.quantize(table, "q8_0")
    ids = np.array([3, 0, 9, 3], np.int32)
    ref = dequant(q, "q8_0", 10, 64).astype(np.float32)[ids]
    assert np.array_equal(be.get_rows(q, "q8_0", 10, 64, ids), ref)
    with pytest.raises(ValueError, match="out of range"):
        be.get_rows(q, "q8_0", 10, 64, np.array([10], np.int32))


def test_get_rows_odd_width_and_errors(be, rng):
    t = rng.standard_normal((5, 13)).astype(np.float32)
    ids = np.array([4, 0, 2], np.int32)
    assert np.array_equal(be.get_rows(t, "f32", 5, 13, ids), t[ids])
    with pytest.raises(ValueError, match="out of range"):
        be.get_rows(t, "f32", 5, 13, np.array([5], np.int32))
    with pytest.raises(ValueError, match="out of range"):
        be.get_rows(t, "f32", 5, 13, np.array([-1], np.int32))


@pytest.mark.parametrize("wtype", ["q8_0", "f16", "q4_k"])
def test_get_rows_long_rows(be, rng, wtype):
    """Rows longer than one CPU task (64K values) are split at block boundaries."""
    cols = 3 * 65536 + 256
    t = random_weight(rng, wtype, 3, cols)
    ids = np.array([2, 0], np.int32)
    out = be.get_rows(t, wtype, 3, cols, ids)
    ref = dequant(t, wtype, 3, cols)[ids]
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_get_rows_many_ids(be, rng):
    """70000 ids: more than one CUDA launch (65535 rows each)."""
    t = rng.standard_normal((300, 16)).astype(np.float32)
    ids = rng.integers(0, 300, 70000).astype(np.int32)
    assert np.array_equal(be.get_rows(t, "f32", 300, 16, ids), t[ids])


@pytest.mark.parametrize("rows,cols,scale", [(4, 24, 1.0), (9, 1000, 100.0)])
def test_store_rows_f16(be, rng, rows, cols, scale):
    src = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    assert np.array_equal(be.store_rows_f16(src), src.astype(np.float16).view(np.uint16))


# ---- norms and elementwise ----------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", [(1, 4096), (7, 4096), (300, 1280), (3, 100)])
def test_rms_norm(be, rng, rows, cols):
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 3
    w = rng.standard_normal(cols).astype(np.float32)
    xt = torch.from_numpy(x).double()
    ref = xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.from_numpy(w).double()
    out = be.rms_norm(x, w, 1e-5)
    assert np.isfinite(out).all() and rel(out, ref.numpy()) < NORM_TOL[kind(be)]


@pytest.mark.parametrize("rows,cols", [(9, 1280), (1, 7680), (2, 33)])
def test_layer_norm(be, rng, rows, cols):
    x = (rng.standard_normal((rows, cols)) * 2 + 0.5).astype(np.float32)
    w = rng.standard_normal(cols).astype(np.float32)
    b = rng.standard_normal(cols).astype(np.float32)
    ref = F.layer_norm(
        torch.from_numpy(x).double(), (cols,), torch.from_numpy(w).double(), torch.from_numpy(b).double(), 1e-5
    )
    out = be.layer_norm(x, w, b, 1e-5)
    assert np.isfinite(out).all() and rel(out, ref.numpy()) < NORM_TOL[kind(be)]


@pytest.mark.parametrize("cols", [5000, 5001])
def test_elementwise(be, rng, cols):
    a = rng.standard_normal((3, cols)).astype(np.float32) * 4
    b = rng.standard_normal((3, cols)).astype(np.float32)
    ta, tb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    tol = NORM_TOL[kind(be)]
    assert rel(be.elementwise("add", a, b), (ta + tb).numpy()) < 1e-7
    assert rel(be.elementwise("add_scaled", a, b, -0.37), (ta - 0.37 * tb).numpy()) < 1e-7
    assert rel(be.elementwise("silu_mul", a, b), (F.silu(ta) * tb).numpy()) < tol
    assert rel(be.elementwise("gelu", a), F.gelu(ta).numpy()) < tol


@pytest.mark.parametrize(
    "n_head,hd,pos",
    [
        (3, 16, [0, 1, 7, 100, 3000]),
        (8, 128, [0, 1, 7, 100, 3000, 131000]),
    ],
)
def test_rope_interleaved(be, rng, n_head, hd, pos):
    pos = np.array(pos, np.int32)
    x = rng.standard_normal((pos.size, n_head, hd)).astype(np.float32)
    inv = (500000.0 ** (-np.arange(0, hd, 2) / hd)).astype(np.float32)
    assert rel(be.rope(x, pos, inv), rope_ref(x, pos, inv)) < 1e-6


# ---- attention ------------------------------------------------------------------------------


def attn_tol(be, nq, hd):
    """The CUDA tensor-core kernel (nq >= 64, hd 64/80/128) rounds q, k, v, p to f16."""
    if kind(be) == "cpu":
        return 1e-5
    return 5e-3 if nq >= 64 and hd in (64, 80, 128) else 1e-4


def random_attention(rng, nq, nk, n_head, n_kv, hd, causal, mask_kind, kv16):
    """q [nq, n_head, hd], k/v [nk, n_kv, hd] (F16 or F32), scale, an additive mask [nq, nk] or
    None, and q_offset (causal masking after a cached prefix of nk - nq keys).
    mask_kind: None; "min" / "inf": 30 % random finfo.min / -inf; "inf+pad": 30 % random -inf
    and the last nk/8 columns finfo.min (padding columns, as the vision tower's mask)."""
    q = rng.standard_normal((nq, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((nk, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((nk, n_kv, hd)).astype(np.float32)
    if kv16:
        k, v = k.astype(np.float16), v.astype(np.float16)
    mask = None
    if mask_kind is not None:
        fill = np.finfo(np.float32).min if mask_kind == "min" else -np.inf
        mask = np.where(rng.random((nq, nk)) < 0.3, fill, 0).astype(np.float32)
        mask[:, 0] = 0
        if mask_kind == "inf+pad":
            mask[:, -nk // 8 :] = np.finfo(np.float32).min
    return q, k, v, hd**-0.5, mask, (nk - nq if causal else 0)


@pytest.mark.parametrize(
    "nq,nk,n_head,n_kv,hd,causal,mask_kind,kv16",
    [
        (1, 37, 8, 2, 64, False, None, False),
        (5, 5, 4, 4, 32, True, None, False),
        (6, 40, 8, 2, 128, True, None, True),  # prefill after a cached prefix (q_offset)
        (33, 70, 4, 1, 80, False, "min", False),
        (33, 70, 4, 1, 80, False, "inf+pad", False),
        (700, 700, 2, 2, 16, False, "min", True),  # more queries than one block
        (700, 700, 2, 2, 16, False, "inf+pad", True),
        (1, 4096, 32, 8, 128, True, None, True),  # 11B decode over a full f16 cache (CUDA split-K path)
        (1, 6404, 32, 8, 128, False, None, True),  # cross-attention decode over 4 image tiles
        (3, 1000, 32, 8, 128, True, None, True),  # few queries, long cache (CUDA split-K path)
        (512, 512, 32, 8, 128, True, None, True),  # prefill
        (804, 804, 16, 16, 80, False, "inf+pad", False),  # vision-tower-like: hd 80, padding mask, f32 K/V
        (9, 50, 6, 3, 20, False, None, False),  # hd not a multiple of 8 (scalar K loads)
        (300, 300, 4, 2, 96, True, None, True),  # many queries on CUDA's SIMT kernel (hd 96)
        (64, 1000, 8, 8, 64, False, "inf+pad", True),  # CUDA tensor-core kernel, one query tile, long keys
        (130, 130, 4, 1, 128, True, None, False),  # CUDA tensor-core kernel, partial tiles, f32 K/V
    ],
)
def test_attention(be, rng, nq, nk, n_head, n_kv, hd, causal, mask_kind, kv16):
    q, k, v, scale, mask, q_offset = random_attention(rng, nq, nk, n_head, n_kv, hd, causal, mask_kind, kv16)
    out = be.attention(q, k, v, scale, mask, causal, q_offset)
    assert np.isfinite(out).all()
    assert rel(out, attention_ref(q, k, v, scale, mask, causal, q_offset)) < attn_tol(be, nq, hd)
    assert np.array_equal(be.attention(q, k, v, scale, mask, causal, q_offset), out)


@pytest.mark.parametrize(
    "nq,nk,n_head,n_kv,hd,kv16",
    [
        (2, 3, 2, 2, 8, False),
        (2, 3, 4, 2, 64, True),  # CUDA: direct SIMT path
        (2, 3000, 4, 2, 64, True),  # CUDA: split-K SIMT path
        (64, 200, 4, 2, 64, True),  # CUDA: tensor-core path
    ],
)
def test_attention_fully_masked_row_is_zero(be, rng, nq, nk, n_head, n_kv, hd, kv16):
    q = rng.standard_normal((nq, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((nk, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((nk, n_kv, hd)).astype(np.float32)
    if kv16:
        k, v = k.astype(np.float16), v.astype(np.float16)
    scale = hd**-0.5
    mask = np.zeros((nq, nk), np.float32)
    mask[1, :] = -np.inf
    out = be.attention(q, k, v, scale, mask)
    assert np.all(out[1] == 0) and np.isfinite(out).all()
    assert np.abs(out[0]).sum() > 0
    keep = np.arange(nq) != 1
    assert rel(out[keep], attention_ref(q[keep], k, v, scale, None, False, 0)) < attn_tol(be, nq, hd)


def test_attention_matches_cpu_backend(be, cpu, rng):
    if kind(be) == "cpu":
        pytest.skip("the CPU backend is the comparison itself")
    nq, nk, n_head, n_kv, hd = 4, 300, 8, 2, 64
    q = rng.standard_normal((nq, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((nk, n_kv, hd)).astype(np.float16)
    v = rng.standard_normal((nk, n_kv, hd)).astype(np.float16)
    a = be.attention(q, k, v, 0.125, None, True, nk - nq)
    b = cpu.attention(q, k, v, 0.125, None, True, nk - nq)
    assert rel(a, b) < 1e-4


# ---- CPU kernel paths of the attention ------------------------------------------------------
# direct (flash-decoding) attention: nq * n_head / n_kv <= 16 rows per KV group reads K/V in
# place in chunks of 256 keys (csrc/cpu/attention.cpp), with a scalar kernel and an AVX2 one
# (used by the avx2 and avx512 paths). Flash attention: more than 16 query rows per KV group
# go through the fused kernel (csrc/cpu/attention_flash*.cpp: query rows as vector lanes; tasks
# of 16 / 48 / 64 rows and key blocks of 16 / 128 / 128 keys on the scalar / avx2 / avx512
# paths; score tiles of 4 / 8 keys, P.V tiles of 4 / 8 head dims with smaller tiles for the
# remainders; online softmax). The amx path, on a CPU with AMX-BF16, runs head sizes that are
# multiples of 16 on AMX tiles instead (csrc/cpu/attention_flash_amx.cpp: tasks of 512 rows in
# sub-blocks of 32, keys in chunks of 256, bf16 pieces of the float32 operands).
@pytest.fixture(params=list(_core.cpu_paths()))
def cpu_path(request):
    before = _core.cpu_path()  # restored after: a suite forced to one path stays on it
    _core.set_cpu_path(request.param)
    yield request.param
    _core.set_cpu_path(before)


# nq * n_head / n_kv <= 16 query rows per KV group: the direct path
DIRECT_CASES = [
    (1, 1, 8, 2, 64, False, None, True),  # one key
    (1, 600, 32, 8, 128, False, None, True),  # 11B decode shape, 3 chunks, last one partial
    (1, 6404, 32, 8, 128, False, "min", True),  # cross-attention over one image's keys
    (3, 300, 8, 2, 80, True, "inf", False),  # causal after a cached prefix, -inf mask, 12 rows
    (2, 513, 16, 2, 128, True, None, True),  # 16 rows (the limit), causal
    (1, 259, 4, 4, 64, False, "min", False),
    (2, 45, 6, 3, 36, True, "min", True),  # hd not a multiple of 8 (scalar kernel on every path)
]
# more rows: the flash kernel
FLASH_CASES = [
    (70, 70, 2, 2, 80, False, None, False),  # vision shape (hd 80), partial key block and row task
    (33, 130, 4, 1, 80, True, "inf", True),  # GQA 4, causal after a cached prefix, -inf mask
    (40, 200, 8, 2, 128, False, "min", True),  # hd 128, finfo.min mask
    (17, 65, 3, 3, 7, True, "min", False),  # odd small hd, 65 keys (one past a block)
    (9, 300, 4, 2, 80, True, "inf", False),  # 18 rows: a task with rows of different queries
    (96, 64, 1, 1, 80, True, None, True),  # causal, exactly one 64-key block
    (150, 300, 2, 2, 80, False, None, False),  # several row tasks, the last partial; 3 key blocks (128, 128, 44)
    (100, 257, 4, 1, 36, True, "min", True),  # GQA 4: 400 rows; hd 36 (P.V tile remainders); causal + finfo.min
    (61, 130, 3, 3, 13, True, "inf", False),  # hd 13 (tiles 8 + 4 + 1 / 4 x 3 + 1), 2-key score remainder
]


PATH_IDS = [f"direct{i}" for i in range(len(DIRECT_CASES))] + [f"flash{i}" for i in range(len(FLASH_CASES))]


@pytest.mark.parametrize("nq,nk,n_head,n_kv,hd,causal,mask_kind,kv16", DIRECT_CASES + FLASH_CASES, ids=PATH_IDS)
def test_attention_cpu_paths(cpu, cpu_path, rng, nq, nk, n_head, n_kv, hd, causal, mask_kind, kv16):
    q, k, v, scale, mask, q_offset = random_attention(rng, nq, nk, n_head, n_kv, hd, causal, mask_kind, kv16)
    out = cpu.attention(q, k, v, scale, mask, causal, q_offset)
    assert rel(out, attention_ref(q, k, v, scale, mask, causal, q_offset)) < 1e-5


MIN = np.finfo(np.float32).min


@pytest.mark.parametrize(
    "nq,nk,n_head,n_kv,hd,kv_dtype,rows",
    [
        # direct path (3 queries), keys in 3 chunks of 256: query 2 sees only keys in the last
        # chunk (whole chunks masked out)
        (3, 700, 8, 2, 128, np.float16, {2: (slice(0, 600), -np.inf)}),
        # flash path (40 queries): query 2 sees only keys >= 250 (whole key blocks masked out before
        # the first visible one), query 3 sees keys < 10 (finfo.min after: blocks of only finfo.min
        # after real scores)
        (40, 300, 4, 2, 80, np.float32, {2: (slice(0, 250), -np.inf), 3: (slice(10, None), MIN)}),
    ],
    ids=["direct", "flash"],
)
def test_attention_masked_rows(cpu, cpu_path, rng, nq, nk, n_head, n_kv, hd, kv_dtype, rows):
    """Causal after a cached prefix; query 0 fully -inf (zeros), query 1 fully finfo.min (the
    uniform average of V over its visible keys, as HF's softmax gives), plus `rows`."""
    q = rng.standard_normal((nq, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((nk, n_kv, hd)).astype(kv_dtype)
    v = rng.standard_normal((nk, n_kv, hd)).astype(kv_dtype)
    mask = np.zeros((nq, nk), np.float32)
    mask[0, :] = -np.inf
    mask[1, :] = MIN
    for r, (cols, fill) in rows.items():
        mask[r, cols] = fill
    q_offset = nk - nq
    out = cpu.attention(q, k, v, 0.125, mask, True, q_offset)
    assert np.all(out[0] == 0)
    mean = v.astype(np.float64)[: 1 + q_offset + 1].mean(axis=0)  # query 1 sees keys 0 .. 1 + q_offset
    assert rel(out[1], np.repeat(mean, n_head // n_kv, axis=0)) < 1e-5
    assert rel(out, attention_ref(q, k, v, 0.125, mask, True, q_offset)) < 1e-5


def test_amx_attention_detection():
    """_core.amx_attention(hd): the amx path's flash attention on AMX-BF16 tiles
    (csrc/cpu/attention_flash_amx.cpp) runs where the amx path does, the CPU has AMX-BF16 and
    AVX512-BF16 (checked against the flags Linux lists) and hd is a multiple of 16 up to 256."""
    f = _core.cpu_features()
    with open("/proc/cpuinfo") as fh:
        flags = set(next((ln for ln in fh if ln.startswith("flags")), "").split())
    have = "amx" in _core.cpu_paths() and {"amx_bf16", "avx512_bf16"} <= flags
    assert f["amx_bf16"] == ("amx_bf16" in flags and f["amx"])
    # (A compiler without -mamx-bf16, GCC < 11, builds without the kernel: this then fails, on purpose.)
    assert _core.amx_attention(80) == have and _core.amx_attention(128) == have and _core.amx_attention(256) == have
    assert not any(_core.amx_attention(hd) for hd in (0, 8, 36, 72, 272))


@pytest.mark.skipif(not _core.amx_attention(80), reason="no AMX-BF16 attention on this CPU / build")
@pytest.mark.parametrize(
    "nq,nk,n_head,n_kv,hd,causal,mask_kind,kv16",
    [
        (300, 1000, 2, 1, 80, False, "inf+pad", False),  # 600 rows per group: 2 tasks, the last partial;
        # 4 key chunks, the last with 24 padding keys; the vision tower's padding mask
        (257, 700, 4, 2, 128, True, "min", True),  # causal after a cached prefix, GQA 2, f16 K/V
        (130, 20, 1, 1, 256, False, "inf", False),  # hd 256 (the largest), fewer keys than one step of 32
        (70, 600, 4, 2, 16, True, None, False),  # hd 16 (one dim tile: the odd P·V tail), 140 rows
    ],
)
def test_amx_attention_close_to_the_float32_kernel(cpu, rng, nq, nk, n_head, n_kv, hd, causal, mask_kind, kv16):
    """The amx kernel splits every float32 operand into bf16 pieces (Q, K: three, 6 products;
    P, V: two, 3 products), so its error stays near float32's: within the F32 bound and within
    10x the AVX-512 float32 kernel's error on the same data (measured 2-6x: the two-piece P and V;
    one bf16 rounding of Q and K would be ~1000x, and three-product scores exceed the bound at
    these scores of std 2.25, bench/attn_precision.py's numpy model)."""
    q, k, v, scale, mask, q_offset = random_attention(rng, nq, nk, n_head, n_kv, hd, causal, mask_kind, kv16)
    q, k = q * 1.5, k * (1.5 if k.dtype == np.float32 else np.float16(1.5))  # scores of std 2.25
    ref = attention_ref(q, k, v, scale, mask, causal, q_offset)
    before = _core.cpu_path()
    try:
        _core.set_cpu_path("avx512")
        e512 = rel(cpu.attention(q, k, v, scale, mask, causal, q_offset), ref)
        _core.set_cpu_path("amx")
        out = cpu.attention(q, k, v, scale, mask, causal, q_offset)
    finally:
        _core.set_cpu_path(before)
    assert np.isfinite(out).all()
    e = rel(out, ref)
    assert e < 1e-5 and e < 10 * e512, (e, e512)


def test_profiler_records_ops_only_when_on(cpu, rng):
    # The opt-in per-op profiler (csrc/common/profile.h): off -> nothing recorded;
    # on -> one entry per (region, op, detail) with the call count, the FLOP of a
    # matmul (2 M N K) and the attention's phase shares inside its time.
    from mllama_q import quants

    x = rng.standard_normal((9, 1280)).astype(np.float32)
    w = rng.standard_normal(1280).astype(np.float32)
    _core.profile_enable(False)
    _core.profile_reset()
    cpu.layer_norm(x, w, w, 1e-5)
    assert _core.profile_report() == []
    _core.profile_enable(True)
    try:
        cpu.layer_norm(x, w, w, 1e-5)
        cpu.layer_norm(x, w, w, 1e-5)
        wq = quants.quantize(rng.standard_normal((48, 256)).astype(np.float32), "q8_0")
        cpu.matmul(rng.standard_normal((5, 256)).astype(np.float32), wq, "q8_0", 48, 256)
        q = rng.standard_normal((70, 2, 80)).astype(np.float32)
        cpu.attention(q, q, q, 0.1)
    finally:
        _core.profile_enable(False)
    rep = {(e["op"], e["detail"]): e for e in _core.profile_report()}
    ln = rep[("layer_norm", "cols=1280")]
    assert ln["calls"] == 2 and ln["seconds"] > 0 and ln["bytes"] == 2 * 8 * 9 * 1280
    mm = rep[("matmul", "q8_0 48x256")]
    assert mm["calls"] == 1 and mm["flop"] == 2 * 5 * 48 * 256
    att = rep[("attention", "heads=2/2 hd=80")]
    assert att["calls"] == 1 and att["flop"] == 4 * 70 * 70 * 80 * 2
    phases = [e for (op, _), e in rep.items() if op.startswith("attention:")]
    assert {e["op"] for e in phases} == {"attention:pack K/V", "attention:score", "attention:softmax", "attention:P.V"}
    assert 0 < sum(e["seconds"] for e in phases) <= att["seconds"]
    _core.profile_reset()
    assert _core.profile_report() == []
    # the thread-CPU-time clock records the same ops; a bad clock name is an error
    _core.profile_enable(True, "thread_cpu")
    try:
        cpu.layer_norm(x, w, w, 1e-5)
    finally:
        _core.profile_enable(False)
    (e,) = [e for e in _core.profile_report() if e["op"] == "layer_norm"]
    assert e["calls"] == 1 and 0 < e["seconds"] < 1
    with pytest.raises(ValueError, match="clock"):
        _core.profile_enable(True, "cycles")
    assert not _core.profile_enabled()
    _core.profile_reset()


# ---- row kernels on every CPU path (csrc/cpu/rowops*.cpp: the scalar
# reference with std::erf / std::exp / double sums, AVX2 and AVX-512 versions
# with polynomial erf / exp), against float64 references, on lengths that are
# not multiples of the vector widths.
def test_gelu_every_path(cpu, cpu_path, rng):
    import math

    x = np.concatenate(
        [
            np.linspace(-14, 14, 20011),
            rng.standard_normal(4099) * 3,
            [0.0, -0.0, 0.353, -0.354, 0.7071, -0.7072, 1e-30, -1e-30],
        ]
    ).astype(np.float32)
    ref = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    out = cpu.elementwise("gelu", x.reshape(1, -1))[0].astype(np.float64)
    # relative accuracy everywhere, up to the float32 rounding of x^2 / 2 in
    # e^{-x^2/2} (~x^2 6e-8 relative) in the negative tail; x < -13 (|gelu| <
    # 1e-37, where e^{-x^2/2} underflows) only absolutely
    err = np.abs(out - ref) / np.maximum(np.abs(ref), 1e-36)
    live = x > -13
    tol = 1e-6 + 1e-7 * x.astype(np.float64) ** 2
    assert (err[live] < tol[live]).all(), (x[live][(err / tol)[live].argmax()], (err / tol)[live].max())
    assert np.abs(out - ref)[~live].max() < 1e-36
    assert np.all(out[x == 0] == 0)


def test_silu_mul_every_path(cpu, cpu_path, rng):
    g = np.concatenate([np.linspace(-95, 95, 10007), rng.standard_normal(1001) * 4]).astype(np.float32)
    u = rng.standard_normal(g.size).astype(np.float32)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    ref = g64 / (1 + np.exp(-g64)) * u64
    out = cpu.elementwise("silu_mul", g.reshape(1, -1), u.reshape(1, -1))[0].astype(np.float64)
    err = np.abs(out - ref) / np.maximum(np.abs(ref), 1e-30)
    live = g > -80
    assert err[live].max() < 2e-6 and np.abs(out - ref)[~live].max() < 1e-30


@pytest.mark.parametrize("rows,cols", [(5, 1283), (3, 37), (2, 7), (4, 1280)])
def test_norms_every_path(cpu, cpu_path, rng, rows, cols):
    x = (rng.standard_normal((rows, cols)) * 2 + 3).astype(np.float32)
    w = rng.standard_normal(cols).astype(np.float32)
    b = rng.standard_normal(cols).astype(np.float32)
    x64 = x.astype(np.float64)
    mean = x64.mean(1, keepdims=True)
    ln = (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(1, keepdims=True) + 1e-5) * w + b
    rms = x64 / np.sqrt((x64**2).mean(1, keepdims=True) + 1e-6) * w
    assert rel(cpu.layer_norm(x, w, b, 1e-5), ln) < 1e-6
    assert rel(cpu.rms_norm(x, w, 1e-6), rms) < 1e-6


# ---- the batched step's ops: attention over segments, sampling ---------------------------------
def test_attention_segments_match_the_reference(be, cpu, rng):
    """One causal segment per sequence (its own KV cache) and non-causal image runs in one call;
    the CUDA backend also against the CPU one."""
    n_head, n_kv, hd = 8, 2, 64
    segs, q_rows = [], 0
    for n_q, n_k, causal in ((1, 300, True), (5, 40, True), (3, 6404, False), (70, 70, True)):
        k = rng.standard_normal((n_k, n_kv, hd)).astype(np.float16)
        v = rng.standard_normal((n_k, n_kv, hd)).astype(np.float16)
        segs.append((q_rows, n_q, k, v, n_k - n_q if causal else 0, causal))
        q_rows += n_q
    q = rng.standard_normal((q_rows, n_head, hd)).astype(np.float32)
    out = be.attention_segments(q, segs, 0.125)
    assert np.isfinite(out).all()
    for q_row, n_q, k, v, off, causal in segs:
        ref = attention_ref(q[q_row : q_row + n_q], k, v, 0.125, None, causal, off)
        assert rel(out[q_row : q_row + n_q], ref) < attn_tol(be, n_q, hd)
    if kind(be) == "cuda":
        assert rel(out, cpu.attention_segments(q, segs, 0.125)) < 5e-3


def test_attention_segments_bad_arguments(be):
    q = np.zeros((2, 4, 16), np.float32)
    k = np.zeros((3, 2, 16), np.float32)
    with pytest.raises(ValueError, match="rows out of range"):
        be.attention_segments(q, [(1, 2, k, k, 0, False)], 0.25)
    with pytest.raises(ValueError, match="k/v"):
        be.attention_segments(q, [(0, 2, k, k.astype(np.float16), 0, False)], 0.25)
    with pytest.raises(ValueError):
        be.attention_segments(q, [(0, 2, np.zeros((3, 2, 8), np.float32), k, 0, False)], 0.25)


def test_sample_matches_the_cpu_sampler(be, rng):
    """Backend.sample: greedy (with the repetition penalty) is the CPU sampler's argmax; top-k /
    top-p / min-p draws over many u follow the CPU sampler's distribution (csrc/cpu/sampling.h,
    compared with transformers' processors in test_generate.py). On the CPU the draws are that
    sampler itself: the frequencies check the harness."""
    from mllama_q.sampling import SamplingParams, core_params

    V = 128256
    logits = (rng.standard_normal((4, V)) * 3).astype(np.float32)
    hist = [rng.integers(0, V, 50).astype(np.int32) for _ in range(4)]
    greedy = [(0.0, 0, 1.0, 0.0, 1.3, 0.0)] * 4
    want = [int(np.argmax(_core.sample_probs(logits[r], hist[r], greedy[r]))) for r in range(4)]
    assert be.sample(logits, hist, greedy).tolist() == want
    p = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.2)
    probs = _core.sample_probs(logits[0], hist[0], core_params(p, 0.0))
    n = 3000
    us = rng.random(n)
    ids = np.concatenate(
        [
            be.sample(np.repeat(logits[:1], 100, 0), [hist[0]] * 100, [core_params(p, u) for u in us[i : i + 100]])
            for i in range(0, n, 100)
        ]
    )
    freq = np.bincount(ids, minlength=V) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))
    assert np.abs(freq - probs).max() < 0.04


# ---- batch invariance of the CPU attention the text decoder uses (csrc/cpu/attention.h) --------
# What exact prefix reuse and batching rest on: a query row gets the same bits alone (a
# decode step), in any chunk of a prefill, next to other sequences' segments, and with keys
# after its last visible one in the call.
@pytest.mark.parametrize("kv16", [False, True])
def test_attention_segments_batch_invariant(cpu, cpu_path, rng, kv16):
    n_head, n_kv, hd, nk, nq = 8, 2, 64, 700, 40  # 700 keys: three 256-key chunks, the last partial
    dt = np.float16 if kv16 else np.float32
    k = rng.standard_normal((nk, n_kv, hd)).astype(dt)
    v = rng.standard_normal((nk, n_kv, hd)).astype(dt)
    q = rng.standard_normal((nq, n_head, hd)).astype(np.float32)
    scale = hd**-0.5
    p0 = nk - nq  # position of query 0 (a cached prefix of p0 keys)
    full = cpu.attention_segments(q, [(0, nq, k, v, p0, True)], scale)
    assert rel(full, attention_ref(q, k, v, scale, None, True, p0)) < 1e-5
    for i in (0, 1, 17, nq - 1):  # alone, with exactly its visible keys
        n_vis = p0 + i + 1
        kv = (np.ascontiguousarray(k[:n_vis]), np.ascontiguousarray(v[:n_vis]))
        one = cpu.attention_segments(q[i : i + 1], [(0, 1, *kv, n_vis - 1, True)], scale)
        assert np.array_equal(one[0], full[i]), i
    # the prefill in chunks of 3, 16 and 21 queries (keys up to each chunk's last row)
    start = 0
    for n in (3, 16, 21):
        n_k = p0 + start + n
        part = cpu.attention_segments(
            np.ascontiguousarray(q[start : start + n]),
            [(0, n, np.ascontiguousarray(k[:n_k]), np.ascontiguousarray(v[:n_k]), p0 + start, True)],
            scale,
        )
        assert np.array_equal(part, full[start : start + n])
        start += n
    # next to another sequence (its own keys, non-causal: a cross-attention run), in one call
    k2 = rng.standard_normal((300, n_kv, hd)).astype(dt)
    v2 = rng.standard_normal((300, n_kv, hd)).astype(dt)
    q2 = rng.standard_normal((5, n_head, hd)).astype(np.float32)
    both = cpu.attention_segments(np.concatenate([q2, q]), [(0, 5, k2, v2, 0, False), (5, nq, k, v, p0, True)], scale)
    assert np.array_equal(both[5:], full)
    assert rel(both[:5], attention_ref(q2, k2, v2, scale, None, False, 0)) < 1e-5
