"""The mllama GGUF layout: every metadata key, tensor name and weight transform.

This module is the ONE declaration of the file format shared by the converter
(`convert/`, writer) and the runtime (reader). Nothing else spells a key or a
tensor name. It imports only numpy and the standard library.

Layout = the single-file `mllama` layout Ollama's converter wrote for
`llama3.2-vision` (same `mllama.*` keys, tensor names, Q/K permutation, gate
conventions), with two differences, both flagged below:

1. `blk.N.cross_attn_q_norm.weight` / `cross_attn_k_norm.weight` are permuted
   exactly like the rows of the cross-attention Q/K projections (Ollama left
   them in HF order, which changes the maths). With this file the cross
   attention equals HF's.
2. Extra keys under `mllama_q.` carry what the runtime needs and Ollama left
   implicit (aspect ratios, image normalisation, rope scaling, stop ids, ...).
   A reader should fall back to the 11B values (`DEFAULTS_11B`) when a
   `mllama_q.` key is absent (i.e. for files written by Ollama).

Shapes below are numpy (row-major) shapes, `[rows, cols]`, i.e. HF's
`nn.Linear.weight` shape `[out_features, in_features]`. GGUF lists dimensions
in the reverse order (`ne[0]` = cols = the contiguous axis, which is also the
axis quantization blocks run along); `gguf.GGUFReader` reports `tensor.shape`
in that reversed (ne) order and `tensor.data` in numpy order; mllama_q.gguf_file's
`TensorInfo.shape` is the numpy order.
"""

from __future__ import annotations

import enum

import numpy as np

ARCH = "mllama"

# Bumped whenever a key, tensor name or transform below changes meaning.
# Version 1: the layout described in this file.
FORMAT_VERSION = 1

# gguf `general.*` keys we write (names as in gguf-py's constants.Keys.General).
GENERAL_ARCHITECTURE = "general.architecture"  # str: "mllama"
GENERAL_NAME = "general.name"  # str: checkpoint directory name
GENERAL_FILE_TYPE = "general.file_type"  # u32: llama.cpp LlamaFileType of the --type mix
GENERAL_QUANTIZATION_VERSION = "general.quantization_version"  # u32: 2 (ggml's QK layout version)
GENERAL_ALIGNMENT = "general.alignment"  # u32, absent = 32 (tensor data alignment in bytes)
GENERAL_SAMPLING_TEMP = "general.sampling.temp"  # f32, from generation_config.json (if present)
GENERAL_SAMPLING_TOP_P = "general.sampling.top_p"  # f32, from generation_config.json (if present)
GENERAL_SAMPLING_TOP_K = "general.sampling.top_k"  # i32, from generation_config.json (if present)

# ---------------------------------------------------------------------------
# Text decoder hyper-parameters (llama.cpp's llama key names, `mllama.` prefix)
# ---------------------------------------------------------------------------
VOCAB_SIZE = "mllama.vocab_size"  # u32: text_config.vocab_size (128256); rows of output.weight
BLOCK_COUNT = "mllama.block_count"  # u32: all decoder layers, self- and cross-attention (40)
CONTEXT_LENGTH = "mllama.context_length"  # u32: max_position_embeddings (131072)
EMBEDDING_LENGTH = "mllama.embedding_length"  # u32: hidden_size (4096)
FEED_FORWARD_LENGTH = "mllama.feed_forward_length"  # u32: intermediate_size (14336)
HEAD_COUNT = "mllama.attention.head_count"  # u32: num_attention_heads (32)
HEAD_COUNT_KV = "mllama.attention.head_count_kv"  # u32: num_key_value_heads (8)
ROPE_DIMENSION_COUNT = "mllama.rope.dimension_count"  # u32: head_dim = hidden/heads (128)
ROPE_FREQ_BASE = "mllama.rope.freq_base"  # f32: rope_theta (500000)
RMS_EPS = "mllama.attention.layer_norm_rms_epsilon"  # f32: rms_norm_eps (1e-5)
CROSS_ATTENTION_LAYERS = "mllama.attention.cross_attention_layers"  # i32[]: [3, 8, ..., 38]

# ---------------------------------------------------------------------------
# Vision tower hyper-parameters (Ollama's names)
# ---------------------------------------------------------------------------
V_BLOCK_COUNT = "mllama.vision.block_count"  # u32: local layers (32)
V_GLOBAL_BLOCK_COUNT = "mllama.vision.global.block_count"  # u32: gated global layers (8)
V_INTERMEDIATE_LAYERS = "mllama.vision.intermediate_layers_indices"  # i32[]: [3, 7, 15, 23, 30]
V_EMBEDDING_LENGTH = "mllama.vision.embedding_length"  # u32: vision hidden_size (1280)
V_FEED_FORWARD_LENGTH = "mllama.vision.feed_forward_length"  # u32: vision intermediate_size (5120)
V_HEAD_COUNT = "mllama.vision.attention.head_count"  # u32: attention_heads (16)
V_LN_EPS = "mllama.vision.attention.layer_norm_epsilon"  # f32: norm_eps (1e-5) of the encoder layers
# (HF builds v.pre_ln / v.post_ln with nn.LayerNorm's default eps = 1e-5, whatever norm_eps says.)
V_IMAGE_SIZE = "mllama.vision.image_size"  # u32: tile side in pixels (560)
V_PATCH_SIZE = "mllama.vision.patch_size"  # u32: 14
V_MAX_NUM_TILES = "mllama.vision.max_num_tiles"  # u32: 4
V_NUM_CHANNELS = "mllama.vision.num_channels"  # u32: 3

# ---------------------------------------------------------------------------
# Extra keys (mllama_q.), absent from Ollama's files
# ---------------------------------------------------------------------------
# u32: FORMAT_VERSION. Absent (kv() gives 0) = a file written by Ollama: its
# cross_attn_q_norm / cross_attn_k_norm are in HF order, so a reader must apply
# permute_head_vector to them at load to get the maths of this layout (= HF's).
Q_FORMAT_VERSION = "mllama_q.format_version"
Q_IMAGE_TOKEN_ID = "mllama_q.image_token_id"  # u32: config.image_token_index (128256)
Q_STOP_TOKEN_IDS = "mllama_q.stop_token_ids"  # i32[]: generation_config eos_token_id ([128001, 128008, 128009])
# Rope scaling. type "llama3": HF `_compute_llama3_parameters`; "none": plain RoPE.
# The same information is baked into the `rope_freqs.weight` tensor (see rope_freqs_llama3).
Q_ROPE_SCALING_TYPE = "mllama_q.rope.scaling.type"  # str: "llama3" | "none"
Q_ROPE_SCALING_FACTOR = "mllama_q.rope.scaling.factor"  # f32: 8.0
Q_ROPE_SCALING_LOW_FREQ_FACTOR = "mllama_q.rope.scaling.low_freq_factor"  # f32: 1.0
Q_ROPE_SCALING_HIGH_FREQ_FACTOR = "mllama_q.rope.scaling.high_freq_factor"  # f32: 4.0
Q_ROPE_SCALING_ORIG_CTX = "mllama_q.rope.scaling.original_context_length"  # u32: 8192
# Vision tower / projector.
# Flattened (num_tiles_rows, num_tiles_cols) pairs in config order; aspect_ratio_id = 1 + pair index
# (0 = padding image). Pair order as in HF convert_aspect_ratios_to_ids: (height tiles, width tiles).
Q_V_ASPECT_RATIOS = "mllama_q.vision.supported_aspect_ratios"  # i32[2*n]: [1,1, 1,2, 1,3, 1,4, 2,1, 2,2, 3,1, 4,1]
Q_V_OUTPUT_DIM = "mllama_q.vision.output_dim"  # u32: vision_output_dim = projector input (7680)
Q_V_PROJECTION_DIM = "mllama_q.vision.projection_dim"  # u32: projector output = text hidden_size (4096)
# Image preprocessing (preprocessor_config.json, MllamaImageProcessor).
Q_IMG_TILE_SIZE = "mllama_q.image.tile_size"  # u32: size.height == size.width (560)
Q_IMG_MAX_TILES = "mllama_q.image.max_image_tiles"  # u32: 4
Q_IMG_MEAN = "mllama_q.image.mean"  # f32[3]: CLIP mean
Q_IMG_STD = "mllama_q.image.std"  # f32[3]: CLIP std
Q_IMG_RESCALE_FACTOR = "mllama_q.image.rescale_factor"  # f32: 1/255
Q_IMG_RESAMPLE = "mllama_q.image.resample"  # u32: PIL resample code (2 = bilinear)
Q_IMG_DO_CONVERT_RGB = "mllama_q.image.do_convert_rgb"  # bool
Q_IMG_DO_RESIZE = "mllama_q.image.do_resize"  # bool
Q_IMG_DO_RESCALE = "mllama_q.image.do_rescale"  # bool
Q_IMG_DO_NORMALIZE = "mllama_q.image.do_normalize"  # bool
Q_IMG_DO_PAD = "mllama_q.image.do_pad"  # bool

# Tokenizer keys (llama.cpp's; written by convert/tokenizer.py).
TOKENIZER_PREFIX = "tokenizer.ggml."  # a file with any such key must carry a complete tokenizer
TOKENIZER_MODEL = "tokenizer.ggml.model"  # "gpt2"
TOKENIZER_PRE = "tokenizer.ggml.pre"  # "llama-bpe"
TOKENIZER_TOKENS = "tokenizer.ggml.tokens"  # str[] (128257: <|image|> = 128256)
TOKENIZER_TOKEN_TYPE = "tokenizer.ggml.token_type"  # i32[] (1 normal, 3 control, 4 user-defined)
TOKENIZER_MERGES = "tokenizer.ggml.merges"  # str[] "a b"
TOKENIZER_BOS_ID = "tokenizer.ggml.bos_token_id"  # u32
TOKENIZER_EOS_ID = "tokenizer.ggml.eos_token_id"  # u32
TOKENIZER_PAD_ID = "tokenizer.ggml.padding_token_id"  # u32
TOKENIZER_EOT_ID = "tokenizer.ggml.eot_token_id"  # u32
TOKENIZER_EOM_ID = "tokenizer.ggml.eom_token_id"  # u32
TOKENIZER_ADD_BOS = "tokenizer.ggml.add_bos_token"  # bool
TOKENIZER_ADD_EOS = "tokenizer.ggml.add_eos_token"  # bool
TOKENIZER_CHAT_TEMPLATE = "tokenizer.chat_template"  # str (jinja)

# Values for a file without the mllama_q. keys (Ollama's): the published 11B/90B ones.
DEFAULTS_11B = {
    Q_FORMAT_VERSION: 0,
    Q_IMAGE_TOKEN_ID: 128256,
    Q_STOP_TOKEN_IDS: [128001, 128008, 128009],
    Q_ROPE_SCALING_TYPE: "llama3",
    Q_ROPE_SCALING_FACTOR: 8.0,
    Q_ROPE_SCALING_LOW_FREQ_FACTOR: 1.0,
    Q_ROPE_SCALING_HIGH_FREQ_FACTOR: 4.0,
    Q_ROPE_SCALING_ORIG_CTX: 8192,
    Q_V_ASPECT_RATIOS: [1, 1, 1, 2, 1, 3, 1, 4, 2, 1, 2, 2, 3, 1, 4, 1],
    Q_V_OUTPUT_DIM: 7680,
    Q_V_PROJECTION_DIM: 4096,
    Q_IMG_TILE_SIZE: 560,
    Q_IMG_MAX_TILES: 4,
    Q_IMG_MEAN: [0.48145466, 0.4578275, 0.40821073],
    Q_IMG_STD: [0.26862954, 0.26130258, 0.27577711],
    Q_IMG_RESCALE_FACTOR: 1.0 / 255.0,
    Q_IMG_RESAMPLE: 2,
    Q_IMG_DO_CONVERT_RGB: True,
    Q_IMG_DO_RESIZE: True,
    Q_IMG_DO_RESCALE: True,
    Q_IMG_DO_NORMALIZE: True,
    Q_IMG_DO_PAD: True,
}

# ---------------------------------------------------------------------------
# Tensor names.  {bid} = block index.  Shapes: numpy order, 11B sizes in ().
# D = hidden (4096), F = intermediate (14336), H/Hkv = heads (32/8), hd = head_dim (128),
# V = vocab_size (128256), Dv = vision hidden (1280), Fv = vision intermediate (5120),
# P = patches per tile incl. class token ((560/14)^2 + 1 = 1601), T = max_num_tiles (4),
# A = len(supported_aspect_ratios) (8), C = num_channels (3), p = patch_size (14).
# ---------------------------------------------------------------------------
# Text, global.
TOKEN_EMBD = "token_embd.weight"  # [V + 8, D]  (HF embed_tokens: 8 extra rows; <|image|> = row V)
OUTPUT_NORM = "output_norm.weight"  # [D]  F32
OUTPUT = "output.weight"  # [V, D]  (lm_head)
ROPE_FREQS = "rope_freqs.weight"  # [hd/2] F32, llama3 per-frequency divisors (rope_freqs_llama3)

# Text, every block.
ATTN_NORM = "blk.{bid}.attn_norm.weight"  # [D] F32 (input_layernorm)
FFN_NORM = "blk.{bid}.ffn_norm.weight"  # [D] F32 (post_attention_layernorm)
FFN_GATE = "blk.{bid}.ffn_gate.weight"  # [F, D] (mlp.gate_proj)
FFN_UP = "blk.{bid}.ffn_up.weight"  # [F, D] (mlp.up_proj)
FFN_DOWN = "blk.{bid}.ffn_down.weight"  # [D, F] (mlp.down_proj)

# Text, self-attention blocks (bid not in cross_attention_layers).
ATTN_Q = "blk.{bid}.attn_q.weight"  # [H*hd, D]   rows permuted: permute_qk(w, H)
ATTN_K = "blk.{bid}.attn_k.weight"  # [Hkv*hd, D] rows permuted: permute_qk(w, Hkv)
ATTN_V = "blk.{bid}.attn_v.weight"  # [Hkv*hd, D]
ATTN_OUTPUT = "blk.{bid}.attn_output.weight"  # [D, H*hd]

# Text, cross-attention blocks (bid in cross_attention_layers). K/V project the
# projected image states [tiles*P, D] (once per image).
XATTN_Q = "blk.{bid}.cross_attn_q_proj.weight"  # [H*hd, D]   rows permuted: permute_qk(w, H)
XATTN_K = "blk.{bid}.cross_attn_k_proj.weight"  # [Hkv*hd, D] rows permuted: permute_qk(w, Hkv)
XATTN_V = "blk.{bid}.cross_attn_v_proj.weight"  # [Hkv*hd, D]
XATTN_O = "blk.{bid}.cross_attn_o_proj.weight"  # [D, H*hd]
XATTN_Q_NORM = "blk.{bid}.cross_attn_q_norm.weight"  # [hd] F32, permuted: permute_head_vector (NOT in Ollama)
XATTN_K_NORM = "blk.{bid}.cross_attn_k_norm.weight"  # [hd] F32, permuted: permute_head_vector (NOT in Ollama)
XATTN_ATTN_GATE = "blk.{bid}.cross_attn_attn_gate"  # [1] F32, RAW g: runtime applies tanh(g)
XATTN_MLP_GATE = "blk.{bid}.cross_attn_mlp_gate"  # [1] F32, RAW g: runtime applies tanh(g)

# Vision tower (prefix v.) and projector (mm.0): run once per image.
VISION_PREFIXES = ("v.", "mm.")
V_PATCH_EMBD = "v.patch_embd.weight"  # [Dv, C, p, p] conv weight, no bias (F16/BF16/F32, never block-quantized)
V_CLASS_EMBD = "v.class_embd"  # [Dv] F32
V_POS_EMBD = "v.position_embd.weight"  # [P, Dv] F32 (gated_positional_embedding.embedding); F32 or F16 on read:
# Ollama's converter wrote it F16 until 96b202d34 (2026-04-02, convert/reader.go added it to the always-F32
# names), F32 after (a v0.4 projector blob may hold either): the runtime reads both.
V_POS_EMBD_GATE = "v.position_embd.gate"  # [1] F32 = 1 - tanh(g)   (g = gated_positional_embedding.gate)
V_TILE_POS_EMBD = "v.tile_position_embd.weight"  # [A+1, T*P*Dv] F32 (gated_positional_embedding.tile_embedding)
V_TILE_POS_EMBD_GATE = "v.tile_position_embd.gate"  # [1] F32 = tanh(g)  (same g as above)
V_PRE_TILE_EMBD = "v.pre_tile_position_embd.weight"  # [A+1, T*Dv] F32
V_PRE_TILE_EMBD_GATE = "v.pre_tile_position_embd.gate"  # [1] F32 = tanh(g)
V_POST_TILE_EMBD = "v.post_tile_position_embd.weight"  # [A+1, T*Dv] F32
V_POST_TILE_EMBD_GATE = "v.post_tile_position_embd.gate"  # [1] F32 = tanh(g)
V_PRE_LN_W = "v.pre_ln.weight"  # [Dv] F32 (layernorm_pre)
V_PRE_LN_B = "v.pre_ln.bias"  # [Dv] F32
V_POST_LN_W = "v.post_ln.weight"  # [Dv] F32 (layernorm_post)
V_POST_LN_B = "v.post_ln.bias"  # [Dv] F32

# Vision encoder layers: local "v.blk.{bid}." (bid < V_BLOCK_COUNT) and global
# "v.global.blk.{bid}." (bid < V_GLOBAL_BLOCK_COUNT). {p} is one of the two prefixes.
V_LOCAL_PREFIX = "v.blk.{bid}."
V_GLOBAL_PREFIX = "v.global.blk.{bid}."
V_ATTN_NORM_W = "{p}attn_norm.weight"  # [Dv] F32 (input_layernorm)
V_ATTN_NORM_B = "{p}attn_norm.bias"  # [Dv] F32
V_ATTN_Q = "{p}attn_q.weight"  # [Dv, Dv] rows permuted: permute_qk(w, heads) (harmless, no RoPE)
V_ATTN_K = "{p}attn_k.weight"  # [Dv, Dv] rows permuted: permute_qk(w, heads)
V_ATTN_V = "{p}attn_v.weight"  # [Dv, Dv]
V_ATTN_OUTPUT = "{p}attn_output.weight"  # [Dv, Dv] (o_proj), no bias anywhere in attention
V_FFN_NORM_W = "{p}ffn_norm.weight"  # [Dv] F32 (post_attention_layernorm)
V_FFN_NORM_B = "{p}ffn_norm.bias"  # [Dv] F32
V_FFN_UP_W = "{p}ffn_up.weight"  # [Fv, Dv] (mlp.fc1)
V_FFN_UP_B = "{p}ffn_up.bias"  # [Fv] F32
V_FFN_DOWN_W = "{p}ffn_down.weight"  # [Dv, Fv] (mlp.fc2)
V_FFN_DOWN_B = "{p}ffn_down.bias"  # [Dv] F32
V_ATTN_GATE = "{p}attn_gate"  # [1] F32 global layers only, = tanh(gate_attn)
V_FFN_GATE = "{p}ffn_gate"  # [1] F32 global layers only, = tanh(gate_ffn)  (not the text ffn_gate!)

MM_PROJ_W = "mm.0.weight"  # [D, Dv*(1+len(intermediate_layers_indices))] (multi_modal_projector)
MM_PROJ_B = "mm.0.bias"  # [D] F32


# ---------------------------------------------------------------------------
# Names only files written by Ollama carry (read by mllama_q.ollama, never written here).
# Sources: ollama/ollama at 9db4bdbad^ (the last commit with mllama) unless noted.
# ---------------------------------------------------------------------------
# i32[]: generation_config.json's eos_token_id list, [128001, 128008, 128009] for the published
# checkpoints (convert/tokenizer.go parseTokenizer + convert/convert.go ModelParameters.KV, added
# in 333e36042, 2025-05-16). Ollama's runtime stops on eos_token_id + these (model/models/mllama/model.go).
OLLAMA_EOS_TOKEN_IDS = "tokenizer.ggml.eos_token_ids"
TOKENIZER_ADD_BOS = "tokenizer.ggml.add_bos_token"  # bool: Ollama copies tokenizer_config.json's, false if absent
# Linear rope scaling, written instead of rope_freqs.weight when config.json's rope_scaling.type is
# "linear" (convert/convert_llama.go KV; the runtime divides positions by the factor, model_text.go).
OLLAMA_ROPE_SCALING_TYPE = "mllama.rope.scaling.type"  # str: "linear"
OLLAMA_ROPE_SCALING_FACTOR = "mllama.rope.scaling.factor"  # f32
# Two-file layout (Ollama v0.4 - v0.6): the projector blob (media type
# application/vnd.ollama.image.projector), read by llama/mllama.cpp at 23125648b^ (mllama_model_load).
GENERAL_DESCRIPTION = "general.description"  # str, required by mllama.cpp
OLLAMA_V_PROJECTION_DIM = "mllama.vision.projection_dim"  # u32: mm.0 output = text hidden size
# Its per-layer names (prefix v.blk.N. / v.global.blk.N.) -> ours. Note the swap: mllama.cpp applies
# ffn_down first (ff_i, = HF mlp.fc1) and ffn_up second (ff_o, = fc2), the reverse of V_FFN_UP/DOWN.
OLLAMA_PROJECTOR_LAYER_NAMES = {
    "ln1": "attn_norm",
    "ln2": "ffn_norm",
    "attn_out": "attn_output",
    "ffn_down": "ffn_up",
    "ffn_up": "ffn_down",
}
# Optional attention biases mllama.cpp would add (Llama 3.2 Vision has none; mllama-q cannot use them).
OLLAMA_PROJECTOR_ATTN_BIASES = ("{p}attn_q.bias", "{p}attn_k.bias", "{p}attn_v.bias", "{p}attn_out.bias")


def blk(name: str, bid: int) -> str:
    """Text tensor name of block `bid`: blk(ATTN_Q, 3) -> 'blk.3.attn_q.weight'."""
    return name.format(bid=bid)


def vblk(name: str, bid: int, is_global: bool = False) -> str:
    """Vision layer tensor name: vblk(V_ATTN_Q, 2, True) -> 'v.global.blk.2.attn_q.weight'."""
    prefix = (V_GLOBAL_PREFIX if is_global else V_LOCAL_PREFIX).format(bid=bid)
    return name.format(p=prefix)


# ---------------------------------------------------------------------------
# Weight transforms (numpy; the converter applies them, a reader may invert them)
# ---------------------------------------------------------------------------
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved-pair row order.

    w: [n_head * hd, ...] (a Q or K projection, rows = output features).
    HF's RoPE (modeling_llama.rotate_half) pairs dimension i with i + hd/2 of a
    head; llama.cpp/ggml's "normal" RoPE pairs 2i with 2i+1. New row
    (h, 2i + j) = old row (h, j*hd/2 + i), j in {0, 1}, i < hd/2, so RoPE in
    interleaved mode on the permuted weights equals HF's rotate-half RoPE, and
    q.k dot products are unchanged (same permutation on Q and K).
    Same as llama.cpp convert_hf_to_gguf.py LlamaModel.permute.
    """
    rows = w.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"cannot permute {rows} rows into {n_head} heads of even size")
    hd = rows // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_qk (llama.cpp order -> HF order)."""
    rows = w.shape[0]
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_head_vector(v: np.ndarray) -> np.ndarray:
    """The per-head version of permute_qk for a [hd] vector (cross-attn q/k RMSNorm weights).

    Cross-attention RMSNorm normalises each head of q (and k) over hd and then
    scales element-wise by this vector (HF MllamaTextCrossAttention.q_norm). The
    RMS is order-independent, so permuting the scale like the Q/K rows keeps
    q_norm(Wq x) permuted consistently and the attention scores equal HF's.
    """
    return permute_qk(v, 1)


def unpermute_head_vector(v: np.ndarray) -> np.ndarray:
    """Inverse of permute_head_vector."""
    return unpermute_qk(v, 1)


def rope_freqs_llama3(
    head_dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_context_length: int,
) -> np.ndarray:
    """`rope_freqs.weight`: float32 [head_dim/2] divisors of the RoPE frequencies.

    The runtime uses inv_freq[i] = theta^(-2i/head_dim) / rope_freqs[i], which equals
    HF's llama3 scaling (transformers modeling_rope_utils._compute_llama3_parameters):
    wavelengths shorter than orig/high_freq_factor keep their frequency (divisor 1),
    longer than orig/low_freq_factor are divided by `factor`, and in between the
    frequency is interpolated with smooth = (orig/wavelen - low)/(high - low):
    inv_freq * ((1 - smooth)/factor + smooth). Same values as llama.cpp's
    convert_hf_to_gguf.py (LlamaModel rope_freqs) and Ollama's ropeFactors.
    """
    i = np.arange(0, head_dim, 2, dtype=np.float64)
    inv_freq = 1.0 / (float(theta) ** (i / head_dim))
    wavelen = 2.0 * np.pi / inv_freq
    low_wavelen = original_context_length / low_freq_factor
    high_wavelen = original_context_length / high_freq_factor
    smooth = (original_context_length / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1.0 - smooth) / factor + smooth)
    out = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, mid))
    return out.astype(np.float32)


def rope_inv_freq(head_dim: int, theta: float, divisors: np.ndarray) -> list[float]:
    """RoPE inverse frequencies [head_dim/2] the runtime uses: theta^(-2i/head_dim) / divisors[i],
    rounded to float32 (divisors: rope_freqs.weight, rope_freqs_llama3(...), all `factor` for
    linear scaling (HF _compute_linear_scaling_rope_parameters), or ones for plain RoPE)."""
    base = float(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return [float(x) for x in (base / np.asarray(divisors, dtype=np.float64)).astype(np.float32)]


# Gate conventions (what the runtime computes with each stored gate value s):
#   text cross-attention block:   h = h + tanh(s_attn) * xattn(...);  h = h + tanh(s_mlp) * mlp(...)
#   vision global layer:          h = h + s_attn * attn(...);          h = h + s_ffn * mlp(...)
#   vision position embedding:    x = x + s_pos * position_embd + s_tile * tile_position_embd[aspect_id]
#   vision pre/post tile embd:    x = x + s * pre_tile_position_embd[aspect_id]
# (text: raw parameters; vision: tanh already applied by the converter, as Ollama.)


# ---------------------------------------------------------------------------
# Quantization mix: which GGML type each written tensor gets (the converter and
# the synthetic-model generator both follow it; the runtime reads any mix).
# ---------------------------------------------------------------------------
# Which GGML type each tensor gets (the quantization "mix"), like llama.cpp's llama_tensor_get_type.
#
# Tensor kinds (decided by mllama_q/convert/plan.py):
#   "f32"    norms, biases, gates, rope_freqs, class / position / tile embeddings: always F32.
#   "conv"   v.patch_embd.weight (a conv kernel, rows of C*p*p = 588): the run's float type
#            (F32 for --type f32, BF16 for bf16, F16 otherwise); never block-quantized.
#   "text"   text weight matrices incl. token_embd, output and the cross-attention projections
#            (the image-side K/V projections too): the --type rule below.
#   "vision" vision-tower and projector weight matrices: --vision-type
#            (default: q8_0 for the quantized --types, otherwise the --type itself).
#
# --type -> text base type: f32 F32, f16 F16, bf16 BF16, q8_0 Q8_0, q6_k Q6_K, q4_k_m/q4_k_s Q4_K.
# q4_k_m raises to Q6_K, as llama.cpp (src/llama-quant.cpp, llama_tensor_get_type) does for
# LLAMA_FTYPE_MOSTLY_Q4_K_M:
#   * output.weight;
#   * blk.N.attn_v.weight when use_more_bits(i, n), where llama.cpp counts tensors whose name
#     contains "attn_v.weight": i = ordinal of this layer among the SELF-attention layers and
#     n = the number of self-attention layers (32 of 40 in 11B). Cross-attention layers have no
#     attn_v; their cross_attn_v_proj does not match llama.cpp's name test and stays at the base
#     type (it runs once per image, and the per-token decode never reads it);
#   * blk.N.ffn_down.weight when use_more_bits(N, n_layer): every layer (self or cross) has an
#     MLP, so i = block index and n = block_count, as llama.cpp's n_ffn_down = n_layer.
#   use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2  (integer division).
# q4_k_s is plain Q4_K everywhere (llama.cpp's Q4_K_S would add Q5_K/Q6_K tensors, which this
# project does not implement). q6_k is Q6_K everywhere.
# Fallback (all kinds): a block type whose block does not divide the row length (the last
# numpy axis, ggml's ne[0]) becomes Q8_0 if the row is a multiple of 32, otherwise F16.


class GGMLType(enum.IntEnum):
    """The ggml tensor types this layout writes; values are ggml's `enum ggml_type` ids
    (ggml/include/ggml.h), equal to gguf-py's GGMLQuantizationType (tests/test_convert.py
    checks both tables against gguf-py)."""

    F32 = 0
    F16 = 1
    Q8_0 = 8
    Q4_K = 12
    Q6_K = 14
    BF16 = 30


# (values per block, bytes per block) of each GGMLType: ggml's ggml_type_traits blck_size /
# type_size (= gguf-py GGML_QUANT_SIZES).
BLOCK_SIZES = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q6_K: (256, 210),
}

# general.file_type values are llama.cpp's `enum llama_ftype` (include/llama.h; gguf-py LlamaFileType).
FTYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q4_k_m", "q4_k_s")
VISION_TYPES = ("f16", "q8_0", "q4_k")

BASE_TYPE = {
    "f32": GGMLType.F32,
    "f16": GGMLType.F16,
    "bf16": GGMLType.BF16,
    "q8_0": GGMLType.Q8_0,
    "q6_k": GGMLType.Q6_K,
    "q4_k_m": GGMLType.Q4_K,
    "q4_k_s": GGMLType.Q4_K,
}
FLOAT_TYPE = {"f32": GGMLType.F32, "bf16": GGMLType.BF16}  # anything else: F16
FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q6_k": 18, "q4_k_m": 15, "q4_k_s": 14}
VISION_TYPE = {"f16": GGMLType.F16, "q8_0": GGMLType.Q8_0, "q4_k": GGMLType.Q4_K}

# Name understood by mllama_q.quants.quantize for each block type.
QUANT_NAME = {GGMLType.Q8_0: "q8_0", GGMLType.Q4_K: "q4_k", GGMLType.Q6_K: "q6_k"}


def default_vision_type(ftype: str) -> str | None:
    """None means: vision matrices use the --type's own base type (f32 / f16 / bf16)."""
    return None if ftype in ("f32", "f16", "bf16") else "q8_0"


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(t: GGMLType, row: int) -> GGMLType:
    """Replace a block type that cannot tile a row of `row` values (see module doc)."""
    block = BLOCK_SIZES[t][0]
    if row % block == 0:
        return t
    if t in (GGMLType.Q4_K, GGMLType.Q6_K) and row % BLOCK_SIZES[GGMLType.Q8_0][0] == 0:
        return GGMLType.Q8_0
    return GGMLType.F16


def fallback_reason(wanted: GGMLType, row: int) -> str:
    """Why `fallback(wanted, row)` is not `wanted`, in words for the converter's report."""
    got = fallback(wanted, row)
    return (
        f"{got.name} instead of {wanted.name}: rows of {row} values are not a multiple of "
        f"{wanted.name}'s {BLOCK_SIZES[wanted][0]}-value blocks"
    )


def requested_type(
    kind: str,
    role: str,
    ftype: str,
    vision_type: str | None,
    *,
    layer: int = -1,
    n_layer: int = 0,
    v_index: int = -1,
    n_v: int = 0,
) -> GGMLType:
    """GGML type the mix asks for, before `fallback` (arguments as tensor_type)."""
    if kind == "f32":
        return GGMLType.F32
    if kind == "conv":
        return FLOAT_TYPE.get(ftype, GGMLType.F16)
    if kind == "vision":
        return VISION_TYPE[vision_type] if vision_type else BASE_TYPE[ftype]
    if kind != "text":
        raise ValueError(f"unknown tensor kind {kind!r}")
    t = BASE_TYPE[ftype]
    if ftype == "q4_k_m":
        if role == "output":
            t = GGMLType.Q6_K
        elif role == "attn_v" and use_more_bits(v_index, n_v):
            t = GGMLType.Q6_K
        elif role == "ffn_down" and use_more_bits(layer, n_layer):
            t = GGMLType.Q6_K
    return t


def tensor_type(
    kind: str,
    role: str,
    row: int,
    ftype: str,
    vision_type: str | None,
    *,
    layer: int = -1,
    n_layer: int = 0,
    v_index: int = -1,
    n_v: int = 0,
) -> GGMLType:
    """GGML type of one output tensor.

    kind: "f32" | "conv" | "text" | "vision" (see module doc); role: "output", "attn_v",
    "ffn_down" or "" (anything else); row: elements per row (last numpy axis);
    layer/n_layer: block index and block count (ffn_down); v_index/n_v: ordinal among
    self-attention layers and their count (attn_v).
    """
    t = requested_type(kind, role, ftype, vision_type, layer=layer, n_layer=n_layer, v_index=v_index, n_v=n_v)
    return t if kind in ("f32", "conv") else fallback(t, row)


def nbytes(t: GGMLType, shape) -> int:
    """Bytes of a tensor of numpy `shape` stored as type t."""
    block, size = BLOCK_SIZES[t]
    n = 1
    for s in shape:
        n *= int(s)
    row = int(shape[-1]) if len(shape) else 1
    if row % block:
        raise ValueError(f"row of {row} values is not a multiple of the {t.name} block size {block}")
    return n // block * size
