"""float64 references for the backend ops (tests/test_backend_ops.py, on every backend).
Test-only: imports torch."""

import numpy as np
import torch
import torch.nn.functional as F


def rel(a, b):
    """Relative error ||a - b|| / ||b|| in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def rope_ref(x, pos, inv_freq):
    """Interleaved-pair RoPE: rotate each (x[2i], x[2i+1]) of x [n_tok, n_head, hd] by
    pos * inv_freq[i]. The angle is a float32 product as in HF's
    MllamaRotaryEmbedding.forward (inv_freq.float() @ position_ids.float()); the
    rotation itself in float64."""
    ang = (pos[:, None].astype(np.float32) * inv_freq[None, :]).astype(np.float64)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
    ref = np.empty_like(x, dtype=np.float64)
    ref[..., 0::2] = a * c - b * s
    ref[..., 1::2] = a * s + b * c
    return ref


def attention_ref(q, k, v, scale, mask, causal, q_offset):
    """float64 softmax(scale q·k + mask) v with GQA (torch SDPA); q [nq, n_head, hd],
    k/v [nk, n_kv, hd] (float16 or float32), mask [nq, nk] additive or None, causal:
    key j visible iff j <= i + q_offset. Rows with nothing visible -> 0 (softmax of
    all -inf is NaN; the backends return zeros, as backend.h specifies)."""
    nq, n_head, _ = q.shape
    nk, n_kv, _ = k.shape
    tq = torch.from_numpy(q).double().permute(1, 0, 2)
    tk = torch.from_numpy(k.astype(np.float32)).double().permute(1, 0, 2).repeat_interleave(n_head // n_kv, 0)
    tv = torch.from_numpy(v.astype(np.float32)).double().permute(1, 0, 2).repeat_interleave(n_head // n_kv, 0)
    bias = torch.zeros(nq, nk, dtype=torch.float64)
    if mask is not None:
        bias = bias + torch.from_numpy(mask).double()
    if causal:
        i = torch.arange(nq)[:, None] + q_offset
        j = torch.arange(nk)[None, :]
        bias = bias.masked_fill(j > i, float("-inf"))
    ref = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=bias, scale=scale).permute(1, 0, 2).numpy()
    ref[torch.isinf(bias).all(dim=1).numpy()] = 0.0
    return ref
