"""Synthetic `mllama` GGUF files: real shapes, random weights, written directly (no HF checkpoint).

Why: anyone can measure the runtime's speed on the 11B/90B shapes without downloading
20-200 GB of checkpoint, and the demo / tests get a few-MB model that runs the whole
pipeline in well under a second.

The file is a COMPLETE model in the layout of `mllama_q.gguf_keys` (same metadata keys,
tensor names, shapes and type mix as `mllama-q convert` writes: the mix rule is
`gguf_keys.tensor_type`). Quantized tensors are not produced by quantizing
floats: each block is built directly from random bits with a chosen fp16 scale, so that
the dequantized weights look like N(0, 0.02)-ish values (llama-style init) and the
activations of a forward pass stay finite. Block layouts (ggml-common.h):

    Q8_0 [34 B / 32 values]   d:f16, qs:i8[32]                 y = d * q
    Q4_K [144 B / 256 values] d:f16, dmin:f16, scales:u8[12], qs:u8[128]
                              y = d * sc_j * q - dmin * m_j  (q in 0..15, 8 sub-blocks j of 32,
                              6-bit sc_j / m_j packed as in ggml's get_scale_min_k4)
    Q6_K [210 B / 256 values] ql:u8[128], qh:u8[64], scales:i8[16], d:f16
                              y = d * sc_j * (q - 32)  (q in 0..63, 16 sub-blocks of 16)

Memory: tensors are streamed to disk in chunks cut from a small pool of random blocks per
type (a few MB), so writing the 11B file (~6.6 GB for q4_k_m) needs little RAM and runs
at disk speed. Weights therefore repeat with the pool's period inside big tensors; that
does not matter for speed measurements (every byte is still read from its own address).

Public API: write_synthetic_gguf(path, size, qtype, seed, progress), CONFIGS, synthetic_config.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from mllama_q import gguf_keys as K
from mllama_q.chat import default_template

SIZES = ("tiny", "11b", "90b")
# Target standard deviation of dequantized weight matrices (llama-style init).
WEIGHT_STD = 0.02
POOL_BYTES = 8 << 20  # random blocks kept per type; tensors are cut from this pool


@dataclass
class SynthConfig:
    """The hyper-parameters of a synthetic model (HF config names in comments)."""

    name: str
    # text_config
    vocab_size: int  # rows of output.weight; token_embd has vocab_size + 8 rows
    hidden: int  # hidden_size
    intermediate: int  # intermediate_size
    n_layer: int  # num_hidden_layers (self + cross)
    cross_layers: list  # cross_attention_layers
    n_head: int  # num_attention_heads
    n_head_kv: int  # num_key_value_heads
    context_length: int = 131072  # max_position_embeddings
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5
    # vision_config
    v_hidden: int = 1280
    v_intermediate: int = 5120
    v_layers: int = 32
    v_global_layers: int = 8
    v_heads: int = 16
    v_intermediate_indices: list = field(default_factory=lambda: [3, 7, 15, 23, 30])
    image_size: int = 560  # tile side
    patch_size: int = 14
    max_tiles: int = 4
    aspect_ratios: list = field(
        default_factory=lambda: [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
    )
    v_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_head

    @property
    def n_patches(self) -> int:  # per tile, incl. the class token
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def v_output_dim(self) -> int:
        return self.v_hidden * (1 + len(self.v_intermediate_indices))


# 11B: ../shared/reference/llama-3.2-11b-vision-instruct/config.json.
# 90B: the published Llama-3.2-90B-Vision config (100 layers, cross-attention every 5th from 3).
# tiny: small enough for the demo and tests, with text rows that are multiples of 256 so the
#       K-quant types (Q4_K/Q6_K) are really exercised, and 56-pixel tiles of 4x4 patches; the
#       same dimensions as the parity tests' tiny checkpoint (tests/tiny_models.py defaults).
CONFIGS = {
    "11b": SynthConfig(
        "synthetic-11b",
        vocab_size=128256,
        hidden=4096,
        intermediate=14336,
        n_layer=40,
        cross_layers=[3, 8, 13, 18, 23, 28, 33, 38],
        n_head=32,
        n_head_kv=8,
    ),
    "90b": SynthConfig(
        "synthetic-90b",
        vocab_size=128256,
        hidden=8192,
        intermediate=28672,
        n_layer=100,
        cross_layers=list(range(3, 100, 5)),
        n_head=64,
        n_head_kv=8,
    ),
    "tiny": SynthConfig(
        "synthetic-tiny",
        vocab_size=1024,
        hidden=256,
        intermediate=512,
        n_layer=5,
        cross_layers=[1, 3],
        n_head=4,
        n_head_kv=2,
        v_hidden=64,
        v_intermediate=128,
        v_layers=4,
        v_global_layers=2,
        v_heads=4,
        v_intermediate_indices=[1, 3],
        image_size=56,
        patch_size=14,
    ),
}

# Llama 3 special tokens (ids 128000.. in the real vocabulary; Hugging Face's names) and the
# extra <|image|> token that follows them. The tiny vocabulary places them at its end.
_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}


def synthetic_config(size) -> SynthConfig:
    """CONFIGS[size]; a SynthConfig passes through (custom shapes, e.g. in tests)."""
    if isinstance(size, SynthConfig):
        return size
    if size not in CONFIGS:
        raise ValueError(f"unknown synthetic size {size!r}; choose one of {', '.join(SIZES)}")
    return CONFIGS[size]


# ---------------------------------------------------------------------------
# Tokenizer: a byte-level (GPT-2 style) BPE vocabulary with the real special-token ids
# ---------------------------------------------------------------------------
def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py bytes_to_unicode)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


def _filler_pieces(n: int) -> tuple[list[str], list[str]]:
    """n pseudo-word tokens and the merges that build them ("Ġ" = a leading space).

    Level by level (every merge's parts already exist): "Ġa"; "ab", "Ġab", "Ab", "ĠAb";
    "abc", "Ġabc", "Abc", "ĠAbc"; "abcd", "Ġabcd" ... until n tokens. Decoded, random
    ids then read as pseudo-words rather than control characters.
    """
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens: list[str] = []
    merges: list[str] = []

    def add(left: str, right: str) -> bool:
        if len(tokens) >= n:
            return False
        tokens.append(left + right)
        merges.append(f"{left} {right}")
        return True

    for c in letters + letters.upper():
        if not add("Ġ", c):
            return tokens, merges
    prev = [""]
    for length in range(2, 6):
        cur = []
        for stem in prev if length > 2 else list(letters):
            for c in letters:
                for prefix, cap in (("", False), ("Ġ", False), ("", True), ("Ġ", True)):
                    base = stem.capitalize() if cap else stem
                    if not add(prefix + base, c):
                        return tokens, merges
                cur.append(stem + c)
        prev = cur
    return tokens, merges


def _vocab(cfg: SynthConfig):
    """tokens, token types, merges, special ids for cfg.vocab_size + 1 tokens (<|image|> last)."""
    n_special = 256 if cfg.vocab_size >= 128256 else 16  # small vocabularies: the first 16 Llama 3 specials
    n_base = cfg.vocab_size - n_special
    byte_tokens = _bytes_to_unicode()
    fillers, merges = _filler_pieces(n_base - 256)
    if 256 + len(fillers) != n_base:
        raise ValueError(f"vocabulary of {cfg.vocab_size} too small for {n_special} special tokens")
    specials, r = [], 0
    for i in range(n_special):
        if i in _NAMED_SPECIALS:
            specials.append(_NAMED_SPECIALS[i])
        else:
            specials.append(f"<|reserved_special_token_{r}|>")
            r += 1
    tokens = byte_tokens + fillers + specials + ["<|image|>"]
    types = [int(gguf.TokenType.NORMAL)] * n_base + [int(gguf.TokenType.CONTROL)] * (n_special + 1)
    ids = {name: n_base + i for i, name in _NAMED_SPECIALS.items()}
    ids["<|image|>"] = cfg.vocab_size
    return tokens, types, merges, ids


# ---------------------------------------------------------------------------
# Tensor plan: (name, numpy shape, kind, role, layer info) in converter order
# ---------------------------------------------------------------------------
@dataclass
class TensorSpec:
    name: str
    shape: tuple  # numpy order [rows, cols]
    kind: str  # gguf_keys mix kinds: "f32" | "conv" | "text" | "vision"
    role: str = ""  # "output" | "attn_v" | "ffn_down" | ""
    layer: int = -1
    v_index: int = -1
    init: str = "weight"  # how to fill: weight | ones | zeros | gate | pos_gate | tile_gate | normal | rope
    ggml_type: T = T.F32


def tensor_plan(cfg: SynthConfig, qtype: str, vision_type: str | None = None) -> list[TensorSpec]:
    """Every tensor `mllama-q convert --type qtype` writes for an HF checkpoint of this config."""
    if qtype not in K.FTYPES:
        raise ValueError(f"unknown --type {qtype!r}; choose one of {', '.join(K.FTYPES)}")
    if vision_type is None:
        vision_type = K.default_vision_type(qtype)
    D, F, V = cfg.hidden, cfg.intermediate, cfg.vocab_size
    hd, H, Hkv = cfg.head_dim, cfg.n_head, cfg.n_head_kv
    Dv, Fv, P, T_, A = cfg.v_hidden, cfg.v_intermediate, cfg.n_patches, cfg.max_tiles, len(cfg.aspect_ratios)
    C, p = 3, cfg.patch_size
    specs: list[TensorSpec] = []

    def add(name, shape, kind, init="weight", **kw):
        specs.append(TensorSpec(name, tuple(int(s) for s in shape), kind, init=init, **kw))

    add(K.TOKEN_EMBD, (V + 8, D), "text")
    add(K.OUTPUT_NORM, (D,), "f32", "ones")
    add(K.OUTPUT, (V, D), "text", role="output")
    add(K.ROPE_FREQS, (hd // 2,), "f32", "rope")
    self_layers = [i for i in range(cfg.n_layer) if i not in cfg.cross_layers]
    for i in range(cfg.n_layer):
        add(K.blk(K.ATTN_NORM, i), (D,), "f32", "ones")
        if i in cfg.cross_layers:
            add(K.blk(K.XATTN_Q, i), (H * hd, D), "text")
            add(K.blk(K.XATTN_K, i), (Hkv * hd, D), "text")
            add(K.blk(K.XATTN_V, i), (Hkv * hd, D), "text")
            add(K.blk(K.XATTN_O, i), (D, H * hd), "text")
            add(K.blk(K.XATTN_Q_NORM, i), (hd,), "f32", "ones")
            add(K.blk(K.XATTN_K_NORM, i), (hd,), "f32", "ones")
            add(K.blk(K.XATTN_ATTN_GATE, i), (1,), "f32", "gate")
            add(K.blk(K.XATTN_MLP_GATE, i), (1,), "f32", "gate")
        else:
            vi = self_layers.index(i)
            add(K.blk(K.ATTN_Q, i), (H * hd, D), "text")
            add(K.blk(K.ATTN_K, i), (Hkv * hd, D), "text")
            add(K.blk(K.ATTN_V, i), (Hkv * hd, D), "text", role="attn_v", v_index=vi)
            add(K.blk(K.ATTN_OUTPUT, i), (D, H * hd), "text")
        add(K.blk(K.FFN_NORM, i), (D,), "f32", "ones")
        add(K.blk(K.FFN_GATE, i), (F, D), "text")
        add(K.blk(K.FFN_UP, i), (F, D), "text")
        add(K.blk(K.FFN_DOWN, i), (D, F), "text", role="ffn_down", layer=i)

    add(K.V_PATCH_EMBD, (Dv, C, p, p), "conv")
    add(K.V_CLASS_EMBD, (Dv,), "f32", "normal")
    add(K.V_POS_EMBD, (P, Dv), "f32", "normal")
    add(K.V_POS_EMBD_GATE, (1,), "f32", "pos_gate")
    add(K.V_TILE_POS_EMBD, (A + 1, T_ * P * Dv), "f32", "normal")
    add(K.V_TILE_POS_EMBD_GATE, (1,), "f32", "tile_gate")
    add(K.V_PRE_TILE_EMBD, (A + 1, T_ * Dv), "f32", "normal")
    add(K.V_PRE_TILE_EMBD_GATE, (1,), "f32", "tile_gate")
    add(K.V_POST_TILE_EMBD, (A + 1, T_ * Dv), "f32", "normal")
    add(K.V_POST_TILE_EMBD_GATE, (1,), "f32", "tile_gate")
    add(K.V_PRE_LN_W, (Dv,), "f32", "ones")
    add(K.V_PRE_LN_B, (Dv,), "f32", "zeros")
    add(K.V_POST_LN_W, (Dv,), "f32", "ones")
    add(K.V_POST_LN_B, (Dv,), "f32", "zeros")
    for is_global, count in ((False, cfg.v_layers), (True, cfg.v_global_layers)):
        for i in range(count):

            def vn(n):
                return K.vblk(n, i, is_global)

            add(vn(K.V_ATTN_NORM_W), (Dv,), "f32", "ones")
            add(vn(K.V_ATTN_NORM_B), (Dv,), "f32", "zeros")
            for n in (K.V_ATTN_Q, K.V_ATTN_K, K.V_ATTN_V, K.V_ATTN_OUTPUT):
                add(vn(n), (Dv, Dv), "vision")
            add(vn(K.V_FFN_NORM_W), (Dv,), "f32", "ones")
            add(vn(K.V_FFN_NORM_B), (Dv,), "f32", "zeros")
            add(vn(K.V_FFN_UP_W), (Fv, Dv), "vision")
            add(vn(K.V_FFN_UP_B), (Fv,), "f32", "zeros")
            add(vn(K.V_FFN_DOWN_W), (Dv, Fv), "vision")
            add(vn(K.V_FFN_DOWN_B), (Dv,), "f32", "zeros")
            if is_global:
                add(vn(K.V_ATTN_GATE), (1,), "f32", "tile_gate")
                add(vn(K.V_FFN_GATE), (1,), "f32", "tile_gate")
    add(K.MM_PROJ_W, (D, cfg.v_output_dim), "vision")
    add(K.MM_PROJ_B, (D,), "f32", "zeros")

    for s in specs:
        s.ggml_type = K.tensor_type(
            s.kind,
            s.role,
            s.shape[-1],
            qtype,
            vision_type,
            layer=s.layer,
            n_layer=cfg.n_layer,
            v_index=s.v_index,
            n_v=len(self_layers),
        )
    return specs


# ---------------------------------------------------------------------------
# Random valid blocks
# ---------------------------------------------------------------------------
def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def random_blocks(t: T, n_blocks: int, rng: np.random.Generator, std: float = WEIGHT_STD) -> np.ndarray:
    """uint8 [n_blocks, block_bytes]: valid blocks of type t whose values have std ~= `std`.

    Per-block scales vary by +-25 % around the value giving that std, so blocks differ.
    """
    block, size = GGML_QUANT_SIZES[t]
    out = np.empty((n_blocks, size), dtype=np.uint8)
    jitter = rng.uniform(0.75, 1.25, size=n_blocks).astype(np.float32)
    if t == T.Q8_0:
        # q uniform in -128..127: std ~= 73.9
        out[:, 0:2] = _f16(jitter * (std / 73.9))
        out[:, 2:] = rng.integers(0, 256, size=(n_blocks, 32), dtype=np.uint8)
    elif t == T.Q4_K:
        # 6-bit scales sc_j in 16..47 (mean ~31.5); q uniform 0..15 has mean 7.5 and std 4.61.
        # Zero-mean values: dmin * m_j = d * sc_j * 7.5 with dmin = d * 7.5 and m_j = sc_j.
        sc = rng.integers(16, 48, size=(n_blocks, 8), dtype=np.uint8)
        m = sc
        d = jitter * (std / (31.5 * 4.61))
        out[:, 0:2] = _f16(d)
        out[:, 2:4] = _f16(d * 7.5)
        # Packing of ggml's get_scale_min_k4 (ggml-quants.c): bytes 0-3 low 6 bits = sc[0..3],
        # bytes 4-7 low 6 bits = m[0..3]; the top 2 bits of bytes 0-3 / 4-7 = high bits of
        # sc[4..7] / m[4..7]; bytes 8-11 = low nibbles of sc[4..7] | low nibbles of m[4..7] << 4.
        out[:, 4:8] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
        out[:, 8:12] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
        out[:, 12:16] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
        out[:, 16:] = rng.integers(0, 256, size=(n_blocks, 128), dtype=np.uint8)
    elif t == T.Q6_K:
        # q uniform 0..63 minus 32: std ~= 18.5; int8 scales in 8..23 (mean 15.5).
        out[:, 0:192] = rng.integers(0, 256, size=(n_blocks, 192), dtype=np.uint8)
        out[:, 192:208] = rng.integers(8, 24, size=(n_blocks, 16), dtype=np.int8).view(np.uint8)
        out[:, 208:210] = _f16(jitter * (std / (15.5 * 18.5)))
    elif t in (T.F32, T.F16, T.BF16):
        x = rng.standard_normal(n_blocks, dtype=np.float32) * std
        if t == T.F32:
            out[:] = x.view(np.uint8).reshape(n_blocks, 4)
        elif t == T.F16:
            out[:] = _f16(x)
        else:  # bf16: the top 16 bits of the f32 pattern
            out[:] = (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
    else:
        raise ValueError(f"no random block generator for {t.name}")
    return out


def _small_values(spec: TensorSpec, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray | None:
    """float32 values of the non-random-weight F32 tensors (norms, biases, gates, rope)."""
    n = int(np.prod(spec.shape))
    if spec.init == "ones":  # norm weights near 1
        return (1.0 + 0.02 * rng.standard_normal(n)).astype(np.float32)
    if spec.init == "zeros":  # biases near 0
        return (0.02 * rng.standard_normal(n)).astype(np.float32)
    if spec.init == "gate":  # raw text cross-attention gate g (runtime applies tanh)
        return np.array([rng.uniform(0.3, 0.8)], dtype=np.float32)
    if spec.init == "tile_gate":  # vision gates stored as tanh(g)
        return np.array([np.tanh(rng.uniform(0.3, 0.8))], dtype=np.float32)
    if spec.init == "pos_gate":  # 1 - tanh(g), see gguf_keys.V_POS_EMBD_GATE
        return np.array([1.0 - np.tanh(0.5)], dtype=np.float32)
    if spec.init == "rope":
        return K.rope_freqs_llama3(cfg.head_dim, cfg.rope_theta, 8.0, 1.0, 4.0, 8192)
    return None


def _nbytes(t: T, shape) -> int:
    return K.nbytes(t, shape)


# ---------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------
def _add_metadata(w: gguf.GGUFWriter, cfg: SynthConfig, qtype: str) -> None:
    w.add_name(cfg.name)
    w.add_file_type(int(K.FILE_TYPE[qtype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_float32(K.GENERAL_SAMPLING_TEMP, 0.6)
    w.add_float32(K.GENERAL_SAMPLING_TOP_P, 0.9)
    w.add_uint32(K.VOCAB_SIZE, cfg.vocab_size)
    w.add_uint32(K.BLOCK_COUNT, cfg.n_layer)
    w.add_uint32(K.CONTEXT_LENGTH, cfg.context_length)
    w.add_uint32(K.EMBEDDING_LENGTH, cfg.hidden)
    w.add_uint32(K.FEED_FORWARD_LENGTH, cfg.intermediate)
    w.add_uint32(K.HEAD_COUNT, cfg.n_head)
    w.add_uint32(K.HEAD_COUNT_KV, cfg.n_head_kv)
    w.add_uint32(K.ROPE_DIMENSION_COUNT, cfg.head_dim)
    w.add_float32(K.ROPE_FREQ_BASE, cfg.rope_theta)
    w.add_float32(K.RMS_EPS, cfg.rms_eps)
    w.add_array(K.CROSS_ATTENTION_LAYERS, [int(i) for i in cfg.cross_layers])
    w.add_uint32(K.V_BLOCK_COUNT, cfg.v_layers)
    w.add_uint32(K.V_GLOBAL_BLOCK_COUNT, cfg.v_global_layers)
    w.add_array(K.V_INTERMEDIATE_LAYERS, [int(i) for i in cfg.v_intermediate_indices])
    w.add_uint32(K.V_EMBEDDING_LENGTH, cfg.v_hidden)
    w.add_uint32(K.V_FEED_FORWARD_LENGTH, cfg.v_intermediate)
    w.add_uint32(K.V_HEAD_COUNT, cfg.v_heads)
    w.add_float32(K.V_LN_EPS, cfg.v_eps)
    w.add_uint32(K.V_IMAGE_SIZE, cfg.image_size)
    w.add_uint32(K.V_PATCH_SIZE, cfg.patch_size)
    w.add_uint32(K.V_MAX_NUM_TILES, cfg.max_tiles)
    w.add_uint32(K.V_NUM_CHANNELS, 3)

    d = K.DEFAULTS_11B
    w.add_uint32(K.Q_FORMAT_VERSION, K.FORMAT_VERSION)
    w.add_uint32(K.Q_IMAGE_TOKEN_ID, cfg.vocab_size)
    w.add_string(K.Q_ROPE_SCALING_TYPE, "llama3")
    w.add_float32(K.Q_ROPE_SCALING_FACTOR, d[K.Q_ROPE_SCALING_FACTOR])
    w.add_float32(K.Q_ROPE_SCALING_LOW_FREQ_FACTOR, d[K.Q_ROPE_SCALING_LOW_FREQ_FACTOR])
    w.add_float32(K.Q_ROPE_SCALING_HIGH_FREQ_FACTOR, d[K.Q_ROPE_SCALING_HIGH_FREQ_FACTOR])
    w.add_uint32(K.Q_ROPE_SCALING_ORIG_CTX, d[K.Q_ROPE_SCALING_ORIG_CTX])
    w.add_array(K.Q_V_ASPECT_RATIOS, [int(v) for pair in cfg.aspect_ratios for v in pair])
    w.add_uint32(K.Q_V_OUTPUT_DIM, cfg.v_output_dim)
    w.add_uint32(K.Q_V_PROJECTION_DIM, cfg.hidden)
    w.add_uint32(K.Q_IMG_TILE_SIZE, cfg.image_size)
    w.add_uint32(K.Q_IMG_MAX_TILES, cfg.max_tiles)
    w.add_array(K.Q_IMG_MEAN, [float(v) for v in d[K.Q_IMG_MEAN]])
    w.add_array(K.Q_IMG_STD, [float(v) for v in d[K.Q_IMG_STD]])
    w.add_float32(K.Q_IMG_RESCALE_FACTOR, d[K.Q_IMG_RESCALE_FACTOR])
    w.add_uint32(K.Q_IMG_RESAMPLE, d[K.Q_IMG_RESAMPLE])
    for key in (K.Q_IMG_DO_CONVERT_RGB, K.Q_IMG_DO_RESIZE, K.Q_IMG_DO_RESCALE, K.Q_IMG_DO_NORMALIZE, K.Q_IMG_DO_PAD):
        w.add_bool(key, True)

    tokens, types, merges, ids = _vocab(cfg)
    stop = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    w.add_array(K.Q_STOP_TOKEN_IDS, stop)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["<|begin_of_text|>"])
    w.add_eos_token_id(ids["<|eot_id|>"])
    w.add_pad_token_id(ids["<|finetune_right_pad_id|>"])
    w.add_eot_token_id(ids["<|eot_id|>"])
    w.add_eom_token_id(ids["<|eom_id|>"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(default_template())  # the bundled real template (mllama_q/assets)


class _Pool:
    """Random blocks per type, cut into tensors cyclically from a random start."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.pools: dict = {}

    def get(self, t: T, std: float) -> np.ndarray:
        key = (t, std)
        if key not in self.pools:
            size = GGML_QUANT_SIZES[t][1]
            self.pools[key] = random_blocks(t, max(1, POOL_BYTES // size), self.rng, std).reshape(-1)
        return self.pools[key]

    def write(self, f, t: T, std: float, nbytes: int) -> None:
        pool = self.get(t, std)
        size = GGML_QUANT_SIZES[t][1]
        n_pool_blocks = pool.size // size
        pos = int(self.rng.integers(0, n_pool_blocks)) * size  # block-aligned start
        left = nbytes
        while left:
            n = min(left, pool.size - pos)
            f.write(memoryview(pool[pos : pos + n]))
            left -= n
            pos = 0


def write_synthetic_gguf(
    path, size: str = "11b", qtype: str = "q4_k_m", seed: int = 0, progress: bool = True, vision_type: str | None = None
) -> Path:
    """Write a complete synthetic `mllama` GGUF to `path` and return the path.

    size: "tiny" | "11b" | "90b" (or a SynthConfig); qtype: a `mllama-q convert --type` (q4_k_m, q4_k_s, q6_k, q8_0,
    f16, bf16, f32). Written to `path`.tmp and renamed on success, so an interrupted run never
    leaves a half-written file under the final name.
    """
    cfg = synthetic_config(size)
    specs = tensor_plan(cfg, qtype, vision_type)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()

    w = gguf.GGUFWriter(str(tmp), K.ARCH)
    _add_metadata(w, cfg, qtype)
    for s in specs:
        nb = _nbytes(s.ggml_type, s.shape)
        # gguf-py takes numpy shapes for raw (byte) tensors via quant_shape_from_byte_shape;
        # give it the element shape directly (dtype float32 -> no conversion) and the raw type.
        w.add_tensor_info(s.name, s.shape, np.dtype(np.float32), nb, raw_dtype=s.ggml_type)
    total = sum(_nbytes(s.ggml_type, s.shape) for s in specs)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        pool = _Pool(rng)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"synthetic {cfg.name} {qtype}",
                file=sys.stderr,
                leave=False,
            )
        for s in specs:
            nb = _nbytes(s.ggml_type, s.shape)
            w.write_padding(f, f.tell())  # tensor data starts aligned (general.alignment = 32)
            vals = _small_values(s, cfg, rng)
            if vals is not None:
                f.write(vals.astype(np.float32).tobytes())
            else:
                # position / tile / class embeddings ~ N(0, 0.02) too; matrices as documented above
                pool.write(f, s.ggml_type, WEIGHT_STD, nb)
            w.write_padding(f, nb)
            if bar is not None:
                bar.update(nb)
        if bar is not None:
            bar.close()
        w.tensors[0].clear()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    if progress:
        print(
            f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(specs)} tensors) "
            f"in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
    return path


def default_cache_dir() -> Path:
    env = os.environ.get("MLLAMA_Q_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mllama-q"


def cached_synthetic(size: str, qtype: str = "q4_k_m", cache_dir=None, seed: int = 0, progress: bool = True) -> Path:
    """Path of a cached synthetic model, generated on first use (cache: $MLLAMA_Q_CACHE or
    ~/.cache/mllama-q). The file name carries the format version, so a layout change regenerates."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"synthetic-{size}-{qtype}-s{seed}-v{K.FORMAT_VERSION}.gguf"
    if not path.is_file():
        write_synthetic_gguf(path, size, qtype, seed=seed, progress=progress)
    return path
