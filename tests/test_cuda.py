"""CUDA backend ops (csrc/cuda/) against float64 references and the CPU backend.

Skipped without a usable CUDA device (mllama_q.backends()["cuda"]["usable"]).
Every CUDA allocation is filled with NaN bytes (MLLAMA_Q_CUDA_POISON=1) so an
output element a kernel forgot to write fails the finite checks; inputs are
fresh random data for every case, and repeated runs must give identical bits.

Weights are random *valid* GGUF blocks (random scales and quants, any bytes
are a valid block apart from the fp16 scales), dequantized for the reference
by gguf-py's gguf.quants.dequantize (the formats reference; where gguf is not
installed, by mllama_q.quants.dequantize, which test_quants.py ties to it).

Tolerances (relative Frobenius error vs float64):
  * M = 1 on Q4_K / Q6_K / Q8_0: x is quantized to 8 bits per 32-value block
    (d = max|x| / 127), an error of ~0.5 % of |x| -> 2e-2;
  * M > 1 (tensor cores): x and W rounded to f16 (11-bit mantissa) -> 3e-3;
  * float weights at M = 1: f32 arithmetic -> 1e-5;
  * attention, norms, elementwise: f32 with the fast exp -> 1e-4 .. 1e-5;
    the tensor-core attention (nq >= 64, hd 64/80/128): f16 q, k, v, p -> 5e-3.
"""
import os

import numpy as np
import pytest

os.environ.setdefault("MLLAMA_Q_CUDA_POISON", "1")   # read when the CUDA backend is created

import mllama_q  # noqa: E402
from mllama_q import _core  # noqa: E402

CUDA = mllama_q.backends()["cuda"]
# MLLAMA_Q_TEST_CUDA_AS=cpu runs this file on the CPU backend instead: a dry run
# that checks the test harness itself (random blocks, references) without a GPU.
AS = os.environ.get("MLLAMA_Q_TEST_CUDA_AS", "cuda")
pytestmark = pytest.mark.skipif(AS == "cuda" and not CUDA["usable"],
                                reason="no usable CUDA device (built=%s)" % CUDA["built"])

torch = pytest.importorskip("torch")
from op_refs import attention_ref, rel, rope_ref  # noqa: E402
F = torch.nn.functional
try:
    import gguf
except ImportError:   # the GPU machine's image may lack gguf (or its pyyaml dependency)
    gguf = None

rng = np.random.default_rng(20261122)

WTYPES = ["f32", "f16", "bf16", "q8_0", "q4_k", "q6_k"]
QUANTIZED = {"q8_0", "q4_k", "q6_k"}


@pytest.fixture(scope="module")
def cu():
    return _core.Backend(AS)


@pytest.fixture(scope="module")
def cpu():
    return _core.Backend("cpu")


def scales_f16(shape, lo=0.5, hi=1.5, exp=-7):
    return (rng.uniform(lo, hi, shape) * 2.0**exp).astype(np.float16).view(np.uint8).reshape(*shape, 2)


def random_weight(wtype, n, k):
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
        blk[..., 0:2] = scales_f16((n, nb), exp=-6)
        blk[..., 2:] = rng.integers(-128, 128, (n, nb, 32)).astype(np.int8).view(np.uint8)
        return blk.reshape(n, nb * 34)
    if wtype == "q4_k":
        nb = k // 256
        blk = rng.integers(0, 256, (n, nb, 144), dtype=np.uint8)
        blk[..., 0:2] = scales_f16((n, nb), exp=-8)     # d
        blk[..., 2:4] = scales_f16((n, nb), exp=-9)     # dmin
        return blk.reshape(n, nb * 144)
    if wtype == "q6_k":
        nb = k // 256
        blk = rng.integers(0, 256, (n, nb, 210), dtype=np.uint8)
        blk[..., 208:210] = scales_f16((n, nb), exp=-9)  # d (scales are random int8)
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


# ---- matmul -----------------------------------------------------------------------

SHAPES = [(256, 64), (1024, 200), (2304, 384), (4096, 129)]   # (K, N): K multiples of 256, odd N for tails


@pytest.mark.parametrize("wtype", WTYPES)
@pytest.mark.parametrize("M", [1, 2, 7, 64, 300, 512])
@pytest.mark.parametrize("K,N", SHAPES)
def test_matmul_vs_reference_and_cpu(cu, cpu, wtype, M, K, N):
    if M >= 300 and K >= 2304 and wtype not in ("q4_k", "f16"):
        pytest.skip("large M x K covered by q4_k and f16 (keeps the CPU reference fast)")
    w = random_weight(wtype, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32) if N % 2 else None
    y = cu.matmul(x, w, wtype, N, K, bias)
    assert y.shape == (M, N) and np.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    ref = x.astype(np.float64) @ dequant(w, wtype, N, K).T
    if bias is not None:
        ref += bias
    if M == 1 or (AS == "cpu" and wtype in QUANTIZED):   # the CPU backend quantizes x at every M
        tol = 2e-2 if wtype in QUANTIZED else 1e-5
    else:
        tol = 3e-3
    assert rel(y, ref) < tol
    y_cpu = cpu.matmul(x, w, wtype, N, K, bias)
    assert rel(y, y_cpu) < tol + rel(y_cpu, ref)
    # deterministic: the same inputs give the same bits
    assert np.array_equal(cu.matmul(x, w, wtype, N, K, bias), y)


@pytest.mark.parametrize("wtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("M", [1, 5])
def test_matmul_float_odd_k(cu, wtype, M):
    """Float weights with K not a multiple of 8 take the scalar loaders."""
    K, N = 100, 33
    w = random_weight(wtype, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y = cu.matmul(x, w, wtype, N, K, None)
    assert np.isfinite(y).all()
    assert rel(y, x.astype(np.float64) @ dequant(w, wtype, N, K).T) < (1e-5 if M == 1 else 3e-3)


def test_matmul_q8_0_k_not_multiple_of_256(cu):
    K, N = 32 * 13, 70
    w = random_weight("q8_0", N, K)
    for M in (1, 3):
        x = rng.standard_normal((M, K)).astype(np.float32)
        y = cu.matmul(x, w, "q8_0", N, K, None)
        assert rel(y, x.astype(np.float64) @ dequant(w, "q8_0", N, K).T) < (2e-2 if M == 1 or AS == "cpu" else 3e-3)


def test_matmul_real_decode_shapes(cu):
    """11B decode shapes (M = 1): q/o (4096x4096), k/v (1024x4096), down (4096x14336)."""
    for wtype, (N, K) in [("q4_k", (4096, 4096)), ("q4_k", (1024, 4096)), ("q6_k", (4096, 14336)),
                          ("q8_0", (1024, 4096))]:
        w = random_weight(wtype, N, K)
        x = rng.standard_normal((1, K)).astype(np.float32)
        y = cu.matmul(x, w, wtype, N, K, None)
        assert rel(y, x.astype(np.float64) @ dequant(w, wtype, N, K).T) < 2e-2


@pytest.mark.skipif(AS != "cuda", reason="CUDA backend only")
def test_matmul_rejects_activation_type(cu):
    w = np.zeros((4, 292), np.uint8)
    with pytest.raises(ValueError):
        cu.matmul(np.ones((1, 256), np.float32), w, "q8_k", 4, 256)


# ---- get_rows / store_rows ------------------------------------------------------------

@pytest.mark.parametrize("wtype", WTYPES)
def test_get_rows(cu, wtype):
    rows, cols = 37, 512
    t = random_weight(wtype, rows, cols)
    ids = rng.integers(0, rows, 23).astype(np.int32)
    ids[0] = rows - 1
    out = cu.get_rows(t, wtype, rows, cols, ids)
    ref = dequant(t, wtype, rows, cols)[ids]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_get_rows_odd_width_and_errors(cu):
    t = rng.standard_normal((5, 13)).astype(np.float32)
    ids = np.array([4, 0, 2], np.int32)
    assert np.array_equal(cu.get_rows(t, "f32", 5, 13, ids), t[ids])
    with pytest.raises(ValueError, match="out of range"):
        cu.get_rows(t, "f32", 5, 13, np.array([5], np.int32))
    with pytest.raises(ValueError, match="out of range"):
        cu.get_rows(t, "f32", 5, 13, np.array([-1], np.int32))


def test_get_rows_many_ids(cu):
    """70000 ids: more than one launch (65535 rows each)."""
    t = rng.standard_normal((300, 16)).astype(np.float32)
    ids = rng.integers(0, 300, 70000).astype(np.int32)
    assert np.array_equal(cu.get_rows(t, "f32", 300, 16, ids), t[ids])


def test_store_rows_f16(cu):
    src = (rng.standard_normal((9, 1000)) * 100).astype(np.float32)
    assert np.array_equal(cu.store_rows_f16(src), src.astype(np.float16).view(np.uint16))


# ---- norms and elementwise ----------------------------------------------------------------

@pytest.mark.parametrize("rows,cols", [(1, 4096), (7, 4096), (300, 1280), (3, 100)])
def test_rms_norm(cu, rows, cols):
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 3
    w = rng.standard_normal(cols).astype(np.float32)
    xt = torch.from_numpy(x).double()
    ref = xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.from_numpy(w).double()
    out = cu.rms_norm(x, w, 1e-5)
    assert np.isfinite(out).all() and rel(out, ref.numpy()) < 1e-5


@pytest.mark.parametrize("rows,cols", [(9, 1280), (1, 7680), (2, 33)])
def test_layer_norm(cu, rows, cols):
    x = (rng.standard_normal((rows, cols)) * 2 + 0.5).astype(np.float32)
    w = rng.standard_normal(cols).astype(np.float32)
    b = rng.standard_normal(cols).astype(np.float32)
    ref = F.layer_norm(torch.from_numpy(x).double(), (cols,), torch.from_numpy(w).double(),
                       torch.from_numpy(b).double(), 1e-5)
    out = cu.layer_norm(x, w, b, 1e-5)
    assert np.isfinite(out).all() and rel(out, ref.numpy()) < 1e-5


def test_elementwise(cu):
    a = rng.standard_normal((3, 5001)).astype(np.float32) * 4
    b = rng.standard_normal((3, 5001)).astype(np.float32)
    ta, tb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    assert rel(cu.elementwise("add", a, b), (ta + tb).numpy()) < 1e-7
    assert rel(cu.elementwise("add_scaled", a, b, -0.37), (ta - 0.37 * tb).numpy()) < 1e-7
    assert rel(cu.elementwise("silu_mul", a, b), (F.silu(ta) * tb).numpy()) < 1e-5
    assert rel(cu.elementwise("gelu", a), F.gelu(ta).numpy()) < 1e-5


def test_rope_interleaved(cu):
    n_tok, n_head, hd = 6, 8, 128
    x = rng.standard_normal((n_tok, n_head, hd)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 3000, 131000], np.int32)
    inv = (500000.0 ** (-np.arange(0, hd, 2) / hd)).astype(np.float32)
    assert rel(cu.rope(x, pos, inv), rope_ref(x, pos, inv)) < 1e-6


# ---- attention ------------------------------------------------------------------------------

def attn_tol(nq, hd):
    """The tensor-core kernel (nq >= 64, hd 64/80/128) rounds q, k, v, p to f16."""
    return 5e-3 if AS == "cuda" and nq >= 64 and hd in (64, 80, 128) else 1e-4


@pytest.mark.parametrize("nq,nk,n_head,n_kv,hd,causal,use_mask,kv16", [
    (1, 37, 8, 2, 64, False, False, False),
    (5, 5, 4, 4, 32, True, False, False),
    (6, 40, 8, 2, 128, True, False, True),        # prefill after a cached prefix (q_offset)
    (33, 70, 4, 1, 80, False, True, False),
    (700, 700, 2, 2, 16, False, True, True),
    (1, 4096, 32, 8, 128, True, False, True),     # 11B decode over a full f16 cache (split-K path)
    (1, 6404, 32, 8, 128, False, False, True),    # cross-attention decode over 4 image tiles
    (3, 1000, 32, 8, 128, True, False, True),     # few queries, long cache (split-K path)
    (512, 512, 32, 8, 128, True, False, True),    # prefill
    (804, 804, 16, 16, 80, False, True, False),   # vision-tower-like: hd 80, padding mask, f32 K/V
    (9, 50, 6, 3, 20, False, False, False),       # hd not a multiple of 8 (scalar K loads)
    (300, 300, 4, 2, 96, True, False, True),      # many queries on the SIMT kernel (hd 96)
    (64, 1000, 8, 8, 64, False, True, True),      # tensor-core kernel, one query tile, long keys
    (130, 130, 4, 1, 128, True, False, False),    # tensor-core kernel, partial tiles, f32 K/V
])
def test_attention(cu, nq, nk, n_head, n_kv, hd, causal, use_mask, kv16):
    q = rng.standard_normal((nq, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((nk, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((nk, n_kv, hd)).astype(np.float32)
    if kv16:
        k, v = k.astype(np.float16), v.astype(np.float16)
    scale = hd ** -0.5
    q_offset = nk - nq if causal else 0
    mask = None
    if use_mask:
        mask = np.where(rng.random((nq, nk)) < 0.3, np.float32(-np.inf), 0).astype(np.float32)
        mask[:, 0] = 0
        mask[:, -nk // 8:] = np.finfo(np.float32).min   # padding columns, as the vision tower's mask
    out = cu.attention(q, k, v, scale, mask, causal, q_offset)
    assert np.isfinite(out).all()
    assert rel(out, attention_ref(q, k, v, scale, mask, causal, q_offset)) < attn_tol(nq, hd)
    assert np.array_equal(cu.attention(q, k, v, scale, mask, causal, q_offset), out)


def test_attention_fully_masked_rows_are_zero(cu):
    # direct SIMT path, split-K SIMT path, tensor-core path
    for nq, nk in ((2, 3), (2, 3000), (64, 200)):
        q = rng.standard_normal((nq, 4, 64)).astype(np.float32)
        k = rng.standard_normal((nk, 2, 64)).astype(np.float16)
        v = rng.standard_normal((nk, 2, 64)).astype(np.float16)
        mask = np.zeros((nq, nk), np.float32)
        mask[1, :] = -np.inf
        out = cu.attention(q, k, v, 0.125, mask)
        assert np.all(out[1] == 0) and np.isfinite(out).all()
        keep = np.arange(nq) != 1
        ref = attention_ref(q[keep], k, v, 0.125, None, False, 0)
        assert rel(out[keep], ref) < attn_tol(nq, 64)


def test_attention_matches_cpu_backend(cu, cpu):
    nq, nk, n_head, n_kv, hd = 4, 300, 8, 2, 64
    q = rng.standard_normal((nq, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((nk, n_kv, hd)).astype(np.float16)
    v = rng.standard_normal((nk, n_kv, hd)).astype(np.float16)
    a = cu.attention(q, k, v, 0.125, None, True, nk - nq)
    b = cpu.attention(q, k, v, 0.125, None, True, nk - nq)
    assert rel(a, b) < 1e-4


def test_attention_segments_match_cpu_backend(cu, cpu):
    """The batched step's attention (one causal segment per sequence, non-causal image runs)."""
    n_head, n_kv, hd = 8, 2, 64
    segs, q_rows = [], 0
    for n_q, n_k, causal in ((1, 300, True), (5, 40, True), (3, 6404, False), (70, 70, True)):
        k = rng.standard_normal((n_k, n_kv, hd)).astype(np.float16)
        v = rng.standard_normal((n_k, n_kv, hd)).astype(np.float16)
        segs.append((q_rows, n_q, k, v, n_k - n_q if causal else 0, causal))
        q_rows += n_q
    q = rng.standard_normal((q_rows, n_head, hd)).astype(np.float32)
    a = cu.attention_segments(q, segs, 0.125)
    b = cpu.attention_segments(q, segs, 0.125)
    assert np.isfinite(a).all() and rel(a, b) < 5e-3


def test_sample_matches_cpu_backend(cu, cpu):
    """Greedy (with the repetition penalty) picks the CPU's token; top-k / top-p / min-p draws
    over many u follow the CPU sampler's distribution (csrc/cpu/sampling.h, transformers' rules)."""
    from mllama_q.sampling import SamplingParams, core_params

    V = 128256
    logits = (rng.standard_normal((4, V)) * 3).astype(np.float32)
    hist = [rng.integers(0, V, 50).astype(np.int32) for _ in range(4)]
    greedy = [(0.0, 0, 1.0, 0.0, 1.3, 0.0)] * 4
    assert np.array_equal(cu.sample(logits, hist, greedy), cpu.sample(logits, hist, greedy))
    p = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.2)
    probs = _core.sample_probs(logits[0], hist[0], core_params(p, 0.0))
    n = 3000
    us = np.random.default_rng(1).random(n)
    ids = np.concatenate([cu.sample(np.repeat(logits[:1], 100, 0), [hist[0]] * 100,
                                    [core_params(p, u) for u in us[i:i + 100]]) for i in range(0, n, 100)])
    freq = np.bincount(ids, minlength=V) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))
    assert np.abs(freq - probs).max() < 0.04


@pytest.mark.skipif(AS != "cuda", reason="CUDA backend only")
def test_backend_name(cu):
    assert cu.name.startswith("cuda:0")
