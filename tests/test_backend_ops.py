"""CPU backend ops (csrc/backend/cpu_backend.cpp) against torch / float64 references."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mllama_q import _core
from op_refs import attention_ref as _attention_ref
from op_refs import rel, rope_ref

rng = np.random.default_rng(1234)


@pytest.fixture(scope="module")
def be():
    return _core.Backend("cpu")


def test_rms_norm(be):
    x = rng.standard_normal((7, 4096)).astype(np.float32) * 3
    w = rng.standard_normal(4096).astype(np.float32)
    xt = torch.from_numpy(x)
    ref = (xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-5)) * torch.from_numpy(w)
    assert rel(be.rms_norm(x, w, 1e-5), ref.numpy()) < 1e-6


def test_layer_norm(be):
    x = (rng.standard_normal((9, 1280)) * 2 + 0.5).astype(np.float32)
    w = rng.standard_normal(1280).astype(np.float32)
    b = rng.standard_normal(1280).astype(np.float32)
    ref = F.layer_norm(torch.from_numpy(x), (1280,), torch.from_numpy(w), torch.from_numpy(b), 1e-5)
    assert rel(be.layer_norm(x, w, b, 1e-5), ref.numpy()) < 1e-6


def test_elementwise(be):
    a = rng.standard_normal((3, 5000)).astype(np.float32) * 4
    b = rng.standard_normal((3, 5000)).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert rel(be.elementwise("add", a, b), (ta + tb).numpy()) < 1e-7
    assert rel(be.elementwise("add_scaled", a, b, -0.37), (ta - 0.37 * tb).numpy()) < 1e-7
    assert rel(be.elementwise("silu_mul", a, b), (F.silu(ta) * tb).numpy()) < 1e-6
    assert rel(be.elementwise("gelu", a), F.gelu(ta).numpy()) < 1e-6


def test_rope_interleaved(be):
    n_tok, n_head, hd = 5, 3, 16
    x = rng.standard_normal((n_tok, n_head, hd)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 3000], np.int32)
    inv = (500000.0 ** (-np.arange(0, hd, 2) / hd)).astype(np.float32)
    assert rel(be.rope(x, pos, inv), rope_ref(x, pos, inv)) < 1e-6


@pytest.mark.parametrize("nq,nk,n_head,n_kv,hd,causal,use_mask,kv16", [
    (1, 37, 8, 2, 64, False, False, False),
    (5, 5, 4, 4, 32, True, False, False),
    (6, 40, 8, 2, 128, True, False, True),   # prefill after a cached prefix (q_offset)
    (33, 70, 4, 1, 80, False, True, False),
    (700, 700, 2, 2, 16, False, True, True),  # more queries than one block
])
def test_attention(be, nq, nk, n_head, n_kv, hd, causal, use_mask, kv16):
    _check_random_attention(be, nq, nk, n_head, n_kv, hd, causal, "min" if use_mask else None, kv16)


def test_attention_fully_masked_row_is_zero(be):
    q = rng.standard_normal((2, 2, 8)).astype(np.float32)
    k = rng.standard_normal((3, 2, 8)).astype(np.float32)
    v = rng.standard_normal((3, 2, 8)).astype(np.float32)
    mask = np.zeros((2, 3), np.float32)
    mask[1, :] = -np.inf
    out = be.attention(q, k, v, 0.5, mask)
    assert np.all(out[1] == 0) and np.all(np.isfinite(out))
    assert np.abs(out[0]).sum() > 0


def test_get_rows_and_store_rows(be):
    from mllama_q import quants
    import gguf
    table = rng.standard_normal((10, 64)).astype(np.float32)
    q = quants.quantize(table, "q8_0")
    ids = np.array([3, 0, 9, 3], np.int32)
    ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)[ids]
    assert np.array_equal(be.get_rows(q, "q8_0", 10, 64, ids), ref)
    with pytest.raises(ValueError, match="out of range"):
        be.get_rows(q, "q8_0", 10, 64, np.array([10], np.int32))
    src = rng.standard_normal((4, 24)).astype(np.float32)
    assert np.array_equal(be.store_rows_f16(src), src.astype(np.float16).view(np.uint16))


def test_get_rows_long_rows(be):
    # rows longer than one task (64K values): split at block boundaries
    from mllama_q import quants
    import gguf
    cols = 3 * 65536 + 96
    table = rng.standard_normal((3, cols)).astype(np.float32)
    ids = np.array([2, 0], np.int32)
    q = quants.quantize(table, "q8_0")
    ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)[ids]
    assert np.array_equal(be.get_rows(q, "q8_0", 3, cols, ids), ref)
    h = table.astype(np.float16)
    assert np.array_equal(be.get_rows(h.view(np.uint8), "f16", 3, cols, ids), h[ids].astype(np.float32))


def test_bad_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        _core.Backend("tpu")


# ---- direct (flash-decoding) attention: nq * n_head / n_kv <= 16 rows per KV
# group reads K/V in place in chunks of 256 keys (csrc/cpu/attention.cpp), with
# a scalar kernel and an AVX2 one (used by the avx2 and avx512 paths).
@pytest.fixture(params=list(_core.cpu_paths()))
def cpu_path(request):
    _core.set_cpu_path(request.param)
    yield request.param
    _core.set_cpu_path("auto")


def _check_random_attention(be, nq, nk, n_head, n_kv, hd, causal, mask_kind, kv16):
    """Random q/k/v (F16 or F32 K/V), an optional random -inf / finfo.min mask and
    causal masking after a cached prefix, against torch in float64."""
    q = rng.standard_normal((nq, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((nk, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((nk, n_kv, hd)).astype(np.float32)
    if kv16:
        k, v = k.astype(np.float16), v.astype(np.float16)
    scale = hd ** -0.5
    q_offset = nk - nq if causal else 0
    mask = None
    if mask_kind is not None:
        fill = -np.inf if mask_kind == "inf" else np.finfo(np.float32).min
        mask = np.where(rng.random((nq, nk)) < 0.3, fill, 0).astype(np.float32)
        mask[:, 0] = 0
    out = be.attention(q, k, v, scale, mask, causal, q_offset)
    assert rel(out, _attention_ref(q, k, v, scale, mask, causal, q_offset)) < 1e-5


@pytest.mark.parametrize("nq,nk,n_head,n_kv,hd,causal,mask_kind,kv16", [
    (1, 1, 8, 2, 64, False, None, True),            # one key
    (1, 600, 32, 8, 128, False, None, True),        # 11B decode shape, 3 chunks, last one partial
    (1, 6404, 32, 8, 128, False, "min", True),      # cross-attention over one image's keys
    (3, 300, 8, 2, 80, True, "inf", False),         # causal after a cached prefix, -inf mask, 12 rows
    (2, 513, 16, 2, 128, True, None, True),         # 16 rows (the limit), causal
    (1, 259, 4, 4, 64, False, "min", False),
    (2, 45, 6, 3, 36, True, "min", True),           # hd not a multiple of 8 (scalar kernel on every path)
])
def test_attention_direct(be, cpu_path, nq, nk, n_head, n_kv, hd, causal, mask_kind, kv16):
    _check_random_attention(be, nq, nk, n_head, n_kv, hd, causal, mask_kind, kv16)


def test_attention_direct_masked_rows(be, cpu_path):
    # Over 3 chunks: query 0 fully -inf (zeros), query 1 fully finfo.min (the
    # uniform average of V over the visible keys, as HF's softmax gives), query
    # 2 sees only keys in the last chunk (whole chunks masked out).
    nq, nk, n_head, n_kv, hd = 3, 700, 8, 2, 128
    q = rng.standard_normal((nq, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((nk, n_kv, hd)).astype(np.float16)
    v = rng.standard_normal((nk, n_kv, hd)).astype(np.float16)
    mask = np.zeros((nq, nk), np.float32)
    mask[0, :] = -np.inf
    mask[1, :] = np.finfo(np.float32).min
    mask[2, :600] = -np.inf
    out = be.attention(q, k, v, 0.125, mask, True, nk - nq)
    assert np.all(out[0] == 0)
    mean = v.astype(np.float64)[: nk - 1].mean(axis=0)          # query 1 sees keys 0 .. nk-2
    assert rel(out[1], np.repeat(mean, n_head // n_kv, axis=0)) < 1e-5
    assert rel(out, _attention_ref(q, k, v, 0.125, mask, True, nk - nq)) < 1e-5


# ---- flash attention: more than 16 query rows per KV group goes through the
# fused kernel (csrc/cpu/attention_flash*.cpp: query rows as vector lanes;
# tasks of 16 / 48 / 64 rows and key blocks of 16 / 128 / 128 keys on the
# scalar / avx2 / avx512 paths; score tiles of 4 / 8 keys, P.V tiles of 4 / 8
# head dims with smaller tiles for the remainders; online softmax).
@pytest.mark.parametrize("nq,nk,n_head,n_kv,hd,causal,mask_kind,kv16", [
    (70, 70, 2, 2, 80, False, None, False),          # vision shape (hd 80), partial key block and row task
    (33, 130, 4, 1, 80, True, "inf", True),          # GQA 4, causal after a cached prefix, -inf mask
    (40, 200, 8, 2, 128, False, "min", True),        # hd 128, finfo.min mask
    (17, 65, 3, 3, 7, True, "min", False),           # odd small hd, 65 keys (one past a block)
    (9, 300, 4, 2, 80, True, "inf", False),          # 18 rows: a task with rows of different queries
    (96, 64, 1, 1, 80, True, None, True),            # causal, exactly one 64-key block
    (150, 300, 2, 2, 80, False, None, False),        # several row tasks, the last partial; 3 key blocks (128, 128, 44)
    (100, 257, 4, 1, 36, True, "min", True),         # GQA 4: 400 rows; hd 36 (P.V tile remainders); causal + finfo.min
    (61, 130, 3, 3, 13, True, "inf", False),         # hd 13 (tiles 8 + 4 + 1 / 4 x 3 + 1), 2-key score remainder
])
def test_attention_flash(be, cpu_path, nq, nk, n_head, n_kv, hd, causal, mask_kind, kv16):
    _check_random_attention(be, nq, nk, n_head, n_kv, hd, causal, mask_kind, kv16)


def test_attention_flash_masked_rows(be, cpu_path):
    # 40 queries (beyond the direct path) over 300 keys: query 0 fully -inf
    # (zeros), query 1 fully finfo.min (the uniform average of V over its
    # visible keys, as HF's softmax gives), query 2 sees only keys >= 250 (whole
    # key blocks masked out before the first visible one), query 3 sees keys
    # < 10 (finfo.min after: blocks of only finfo.min after real scores).
    nq, nk, n_head, n_kv, hd = 40, 300, 4, 2, 80
    q = rng.standard_normal((nq, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((nk, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((nk, n_kv, hd)).astype(np.float32)
    mask = np.zeros((nq, nk), np.float32)
    mask[0, :] = -np.inf
    mask[1, :] = np.finfo(np.float32).min
    mask[2, :250] = -np.inf
    mask[3, 10:] = np.finfo(np.float32).min
    q_offset = nk - nq
    out = be.attention(q, k, v, 0.125, mask, True, q_offset)
    assert np.all(out[0] == 0)
    mean = v.astype(np.float64)[: 1 + q_offset + 1].mean(axis=0)   # query 1 sees keys 0 .. 1 + q_offset
    assert rel(out[1], np.repeat(mean, n_head // n_kv, axis=0)) < 1e-5
    assert rel(out, _attention_ref(q, k, v, 0.125, mask, True, q_offset)) < 1e-5


def test_profiler_records_ops_only_when_on(be):
    # The opt-in per-op profiler (csrc/common/profile.h): off -> nothing recorded;
    # on -> one entry per (region, op, detail) with the call count, the FLOP of a
    # matmul (2 M N K) and the attention's phase shares inside its time.
    from mllama_q import quants
    x = rng.standard_normal((9, 1280)).astype(np.float32)
    w = rng.standard_normal(1280).astype(np.float32)
    _core.profile_enable(False)
    _core.profile_reset()
    be.layer_norm(x, w, w, 1e-5)
    assert _core.profile_report() == []
    _core.profile_enable(True)
    try:
        be.layer_norm(x, w, w, 1e-5)
        be.layer_norm(x, w, w, 1e-5)
        wq = quants.quantize(rng.standard_normal((48, 256)).astype(np.float32), "q8_0")
        be.matmul(rng.standard_normal((5, 256)).astype(np.float32), wq, "q8_0", 48, 256)
        q = rng.standard_normal((70, 2, 80)).astype(np.float32)
        be.attention(q, q, q, 0.1)
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


# ---- row kernels on every CPU path (csrc/cpu/rowops*.cpp: the scalar
# reference with std::erf / std::exp / double sums, AVX2 and AVX-512 versions
# with polynomial erf / exp), against float64 references, on lengths that are
# not multiples of the vector widths.
def test_gelu_every_path(be, cpu_path):
    import math
    x = np.concatenate([np.linspace(-14, 14, 20011), rng.standard_normal(4099) * 3,
                        [0.0, -0.0, 0.353, -0.354, 0.7071, -0.7072, 1e-30, -1e-30]]).astype(np.float32)
    ref = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    out = be.elementwise("gelu", x.reshape(1, -1))[0].astype(np.float64)
    # relative accuracy everywhere, up to the float32 rounding of x^2 / 2 in
    # e^{-x^2/2} (~x^2 6e-8 relative) in the negative tail; x < -13 (|gelu| <
    # 1e-37, where e^{-x^2/2} underflows) only absolutely
    err = np.abs(out - ref) / np.maximum(np.abs(ref), 1e-36)
    live = x > -13
    tol = 1e-6 + 1e-7 * x.astype(np.float64) ** 2
    assert (err[live] < tol[live]).all(), (x[live][(err / tol)[live].argmax()], (err / tol)[live].max())
    assert np.abs(out - ref)[~live].max() < 1e-36
    assert np.all(out[x == 0] == 0)


def test_silu_mul_every_path(be, cpu_path):
    g = np.concatenate([np.linspace(-95, 95, 10007), rng.standard_normal(1001) * 4]).astype(np.float32)
    u = rng.standard_normal(g.size).astype(np.float32)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    ref = g64 / (1 + np.exp(-g64)) * u64
    out = be.elementwise("silu_mul", g.reshape(1, -1), u.reshape(1, -1))[0].astype(np.float64)
    err = np.abs(out - ref) / np.maximum(np.abs(ref), 1e-30)
    live = g > -80
    assert err[live].max() < 2e-6 and np.abs(out - ref)[~live].max() < 1e-30


@pytest.mark.parametrize("rows,cols", [(5, 1283), (3, 37), (2, 7), (4, 1280)])
def test_norms_every_path(be, cpu_path, rows, cols):
    x = (rng.standard_normal((rows, cols)) * 2 + 3).astype(np.float32)
    w = rng.standard_normal(cols).astype(np.float32)
    b = rng.standard_normal(cols).astype(np.float32)
    x64 = x.astype(np.float64)
    mean = x64.mean(1, keepdims=True)
    ln = (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(1, keepdims=True) + 1e-5) * w + b
    rms = x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-6) * w
    assert rel(be.layer_norm(x, w, b, 1e-5), ln) < 1e-6
    assert rel(be.rms_norm(x, w, 1e-6), rms) < 1e-6
