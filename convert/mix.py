"""Which GGML type each tensor gets (the quantization "mix"), like llama.cpp's llama_tensor_get_type.

Tensor kinds (decided by convert/plan.py):
  "f32"    norms, biases, gates, rope_freqs, class / position / tile embeddings: always F32.
  "conv"   v.patch_embd.weight (a conv kernel, rows of C*p*p = 588): the run's float type
           (F32 for --type f32, BF16 for bf16, F16 otherwise); never block-quantized.
  "text"   text weight matrices incl. token_embd, output and the cross-attention projections
           (the image-side K/V projections too): the --type rule below.
  "vision" vision-tower and projector weight matrices: --vision-type
           (default: q8_0 for the quantized --types, otherwise the --type itself).

--type -> text base type: f32 F32, f16 F16, bf16 BF16, q8_0 Q8_0, q6_k Q6_K, q4_k_m/q4_k_s Q4_K.
q4_k_m raises to Q6_K, as llama.cpp (src/llama-quant.cpp, llama_tensor_get_type) does for
LLAMA_FTYPE_MOSTLY_Q4_K_M:
  * output.weight;
  * blk.N.attn_v.weight when use_more_bits(i, n), where llama.cpp counts tensors whose name
    contains "attn_v.weight": i = ordinal of this layer among the SELF-attention layers and
    n = the number of self-attention layers (32 of 40 in 11B). Cross-attention layers have no
    attn_v; their cross_attn_v_proj does not match llama.cpp's name test and stays at the base
    type (it runs once per image, and the per-token decode never reads it);
  * blk.N.ffn_down.weight when use_more_bits(N, n_layer): every layer (self or cross) has an
    MLP, so i = block index and n = block_count, as llama.cpp's n_ffn_down = n_layer.
  use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2  (integer division).
q4_k_s is plain Q4_K everywhere (llama.cpp's Q4_K_S would add Q5_K/Q6_K tensors, which this
project does not implement). q6_k is Q6_K everywhere.
Fallback (all kinds): a block type whose block does not divide the row length (the last
numpy axis, ggml's ne[0]) becomes Q8_0 if the row is a multiple of 32, otherwise F16.
"""
from __future__ import annotations

from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES, LlamaFileType

FTYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q4_k_m", "q4_k_s")
VISION_TYPES = ("f16", "q8_0", "q4_k")

BASE_TYPE = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q6_k": T.Q6_K,
             "q4_k_m": T.Q4_K, "q4_k_s": T.Q4_K}
FLOAT_TYPE = {"f32": T.F32, "bf16": T.BF16}  # anything else: F16
FILE_TYPE = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
             "q8_0": LlamaFileType.MOSTLY_Q8_0, "q6_k": LlamaFileType.MOSTLY_Q6_K,
             "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M, "q4_k_s": LlamaFileType.MOSTLY_Q4_K_S}
VISION_TYPE = {"f16": T.F16, "q8_0": T.Q8_0, "q4_k": T.Q4_K}

# Name understood by mllama_q.quants.quantize for each block type.
QUANT_NAME = {T.Q8_0: "q8_0", T.Q4_K: "q4_k", T.Q6_K: "q6_k"}


def default_vision_type(ftype: str) -> str | None:
    """None means: vision matrices use the --type's own base type (f32 / f16 / bf16)."""
    return None if ftype in ("f32", "f16", "bf16") else "q8_0"


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(t: T, row: int) -> T:
    """Replace a block type that cannot tile a row of `row` values (see module doc)."""
    block = GGML_QUANT_SIZES[t][0]
    if row % block == 0:
        return t
    if t in (T.Q4_K, T.Q6_K) and row % GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return T.Q8_0
    return T.F16


def tensor_type(kind: str, role: str, row: int, ftype: str, vision_type: str | None, *,
                layer: int = -1, n_layer: int = 0, v_index: int = -1, n_v: int = 0) -> T:
    """GGML type of one output tensor.

    kind: "f32" | "conv" | "text" | "vision" (see module doc); role: "output", "attn_v",
    "ffn_down" or "" (anything else); row: elements per row (last numpy axis);
    layer/n_layer: block index and block count (ffn_down); v_index/n_v: ordinal among
    self-attention layers and their count (attn_v).
    """
    if kind == "f32":
        return T.F32
    if kind == "conv":
        return FLOAT_TYPE.get(ftype, T.F16)
    if kind == "vision":
        t = VISION_TYPE[vision_type] if vision_type else BASE_TYPE[ftype]
        return fallback(t, row)
    if kind != "text":
        raise ValueError(f"unknown tensor kind {kind!r}")
    t = BASE_TYPE[ftype]
    if ftype == "q4_k_m":
        if role == "output":
            t = T.Q6_K
        elif role == "attn_v" and use_more_bits(v_index, n_v):
            t = T.Q6_K
        elif role == "ffn_down" and use_more_bits(layer, n_layer):
            t = T.Q6_K
    return fallback(t, row)


def nbytes(t: T, shape) -> int:
    """Bytes of a tensor of numpy `shape` stored as type t."""
    block, size = GGML_QUANT_SIZES[t]
    n = 1
    for s in shape:
        n *= int(s)
    row = int(shape[-1]) if len(shape) else 1
    if row % block:
        raise ValueError(f"row of {row} values is not a multiple of the {t.name} block size {block}")
    return n // block * size
