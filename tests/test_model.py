"""Logits parity of the compiled mllama model against transformers.

A tiny random MllamaForConditionalGeneration (every tanh gate and every norm
weight randomised, so that neither the image path nor the Q/K-norm permutation
is vacuous) is written as an mllama GGUF in F32, F16, Q8_0 and Q4_K and run by
mllama_q.Model; its logits are compared with transformers' on prompts with 0, 1
and 2 images, 1 to 4 tiles, text before and after each image.

The reference for quantized files is computed two ways: against the original
F32 model (bounded by the weight quantization error measured with gguf-py's
dequantizer) and against the same HF model with gguf-py's dequantized weights
loaded (bounded by the runtime's own arithmetic).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from transformers import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402
from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

import mllama_q  # noqa: E402
from mllama_q import _core  # noqa: E402
from mllama_q import gguf_keys as K  # noqa: E402
from mllama_q.quants import quantize  # noqa: E402

VOCAB = 320
IMG = VOCAB  # <|image|> = vocab_size, as in the real checkpoint (128256)
MAX_TILES = 4
HAVE_VISION = bool(_core.have_vision)


# ---------------------------------------------------------------------------
# Tiny checkpoint and its GGUF
# ---------------------------------------------------------------------------
def tiny_config() -> MllamaConfig:
    # hidden 256 / intermediate 512: rows are whole Q4_K super-blocks (256).
    return MllamaConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=5,
                         cross_attention_layers=[1, 3], num_attention_heads=4, num_key_value_heads=2,
                         rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=4,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2,
                           attention_heads=2, image_size=28, patch_size=14, max_num_tiles=MAX_TILES,
                           intermediate_layers_indices=[1, 3], vision_output_dim=96),
        image_token_index=IMG)


def build_tiny(seed: int = 0) -> MllamaForConditionalGeneration:
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(tiny_config()).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn")) and p.numel() == 1:
                # transformers initialises tanh gates to 0: the image would have no effect.
                mag = torch.empty(1).uniform_(0.3, 1.2, generator=g)
                sign = 1.0 if torch.rand(1, generator=g).item() < 0.5 else -1.0
                p.copy_(sign * mag)
            elif "norm" in name and name.endswith("weight"):
                # RMSNorm weights start at 1: randomise so a wrong permutation of q_norm/k_norm shows.
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def _np(t) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def hf_to_gguf_tensors(model) -> dict[str, np.ndarray]:
    """HF state dict -> {gguf name: float32 array} in our layout (gguf_keys.py)."""
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}
    lm = "model.language_model."
    H, Hkv = tc.num_attention_heads, tc.num_key_value_heads
    out[K.TOKEN_EMBD] = sd[lm + "embed_tokens.weight"]
    out[K.OUTPUT_NORM] = sd[lm + "norm.weight"]
    out[K.OUTPUT] = sd["lm_head.weight"]
    hd = tc.hidden_size // H
    rp = tc.rope_parameters
    out[K.ROPE_FREQS] = K.rope_freqs_llama3(hd, rp["rope_theta"], rp["factor"], rp["low_freq_factor"],
                                            rp["high_freq_factor"], rp["original_max_position_embeddings"])
    for i in range(tc.num_hidden_layers):
        p = f"{lm}layers.{i}."
        out[K.blk(K.ATTN_NORM, i)] = sd[p + "input_layernorm.weight"]
        out[K.blk(K.FFN_NORM, i)] = sd[p + "post_attention_layernorm.weight"]
        out[K.blk(K.FFN_GATE, i)] = sd[p + "mlp.gate_proj.weight"]
        out[K.blk(K.FFN_UP, i)] = sd[p + "mlp.up_proj.weight"]
        out[K.blk(K.FFN_DOWN, i)] = sd[p + "mlp.down_proj.weight"]
        if i in tc.cross_attention_layers:
            c = p + "cross_attn."
            out[K.blk(K.XATTN_Q, i)] = K.permute_qk(sd[c + "q_proj.weight"], H)
            out[K.blk(K.XATTN_K, i)] = K.permute_qk(sd[c + "k_proj.weight"], Hkv)
            out[K.blk(K.XATTN_V, i)] = sd[c + "v_proj.weight"]
            out[K.blk(K.XATTN_O, i)] = sd[c + "o_proj.weight"]
            out[K.blk(K.XATTN_Q_NORM, i)] = K.permute_head_vector(sd[c + "q_norm.weight"])
            out[K.blk(K.XATTN_K_NORM, i)] = K.permute_head_vector(sd[c + "k_norm.weight"])
            out[K.blk(K.XATTN_ATTN_GATE, i)] = sd[p + "cross_attn_attn_gate"]
            out[K.blk(K.XATTN_MLP_GATE, i)] = sd[p + "cross_attn_mlp_gate"]
        else:
            s = p + "self_attn."
            out[K.blk(K.ATTN_Q, i)] = K.permute_qk(sd[s + "q_proj.weight"], H)
            out[K.blk(K.ATTN_K, i)] = K.permute_qk(sd[s + "k_proj.weight"], Hkv)
            out[K.blk(K.ATTN_V, i)] = sd[s + "v_proj.weight"]
            out[K.blk(K.ATTN_OUTPUT, i)] = sd[s + "o_proj.weight"]
    # Vision tower + projector (gates as gguf_keys documents: tanh applied, position gate split).
    v = "model.vision_model."
    vh = vc.attention_heads
    out[K.V_PATCH_EMBD] = sd[v + "patch_embedding.weight"]
    out[K.V_CLASS_EMBD] = sd[v + "class_embedding"]
    g = sd[v + "gated_positional_embedding.gate"]
    out[K.V_POS_EMBD] = sd[v + "gated_positional_embedding.embedding"]
    out[K.V_POS_EMBD_GATE] = (1.0 - np.tanh(g)).astype(np.float32)
    out[K.V_TILE_POS_EMBD] = sd[v + "gated_positional_embedding.tile_embedding.weight"]
    out[K.V_TILE_POS_EMBD_GATE] = np.tanh(g).astype(np.float32)
    for key, hf in ((K.V_PRE_TILE_EMBD, "pre_tile_positional_embedding"),
                    (K.V_POST_TILE_EMBD, "post_tile_positional_embedding")):
        out[key] = sd[v + hf + ".embedding.weight"]
        out[key.replace(".weight", ".gate")] = np.tanh(sd[v + hf + ".gate"]).astype(np.float32)
    out[K.V_PRE_LN_W], out[K.V_PRE_LN_B] = sd[v + "layernorm_pre.weight"], sd[v + "layernorm_pre.bias"]
    out[K.V_POST_LN_W], out[K.V_POST_LN_B] = sd[v + "layernorm_post.weight"], sd[v + "layernorm_post.bias"]
    for is_global, hfname, n in ((False, "transformer", vc.num_hidden_layers),
                                 (True, "global_transformer", vc.num_global_layers)):
        for i in range(n):
            p = f"{v}{hfname}.layers.{i}."
            name = lambda key: K.vblk(key, i, is_global)  # noqa: E731
            out[name(K.V_ATTN_Q)] = K.permute_qk(sd[p + "self_attn.q_proj.weight"], vh)
            out[name(K.V_ATTN_K)] = K.permute_qk(sd[p + "self_attn.k_proj.weight"], vh)
            out[name(K.V_ATTN_V)] = sd[p + "self_attn.v_proj.weight"]
            out[name(K.V_ATTN_OUTPUT)] = sd[p + "self_attn.o_proj.weight"]
            out[name(K.V_ATTN_NORM_W)] = sd[p + "input_layernorm.weight"]
            out[name(K.V_ATTN_NORM_B)] = sd[p + "input_layernorm.bias"]
            out[name(K.V_FFN_NORM_W)] = sd[p + "post_attention_layernorm.weight"]
            out[name(K.V_FFN_NORM_B)] = sd[p + "post_attention_layernorm.bias"]
            out[name(K.V_FFN_UP_W)] = sd[p + "mlp.fc1.weight"]
            out[name(K.V_FFN_UP_B)] = sd[p + "mlp.fc1.bias"]
            out[name(K.V_FFN_DOWN_W)] = sd[p + "mlp.fc2.weight"]
            out[name(K.V_FFN_DOWN_B)] = sd[p + "mlp.fc2.bias"]
            if is_global:
                out[name(K.V_ATTN_GATE)] = np.tanh(sd[p + "gate_attn"]).astype(np.float32)
                out[name(K.V_FFN_GATE)] = np.tanh(sd[p + "gate_ffn"]).astype(np.float32)
    out[K.MM_PROJ_W] = sd["model.multi_modal_projector.weight"]
    out[K.MM_PROJ_B] = sd["model.multi_modal_projector.bias"]
    return {k: np.ascontiguousarray(a, dtype=np.float32) for k, a in out.items()}


QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_k": gguf.GGMLQuantizationType.Q4_K}


def is_quantizable(name: str, a: np.ndarray) -> bool:
    """Text 2-D matrices get the file's type; norms, gates, rope factors and the vision tower stay float."""
    return a.ndim == 2 and not name.startswith(("v.", "mm.")) and name != K.ROPE_FREQS


def write_gguf(model, path, wtype: str = "f32") -> dict[str, np.ndarray]:
    """Writes `model` as an mllama GGUF; returns the float32 values each tensor holds in the file."""
    tensors = hf_to_gguf_tensors(model)
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    w = gguf.GGUFWriter(str(path), K.ARCH)
    w.add_uint32(K.VOCAB_SIZE, tc.vocab_size)
    w.add_uint32(K.BLOCK_COUNT, tc.num_hidden_layers)
    w.add_uint32(K.CONTEXT_LENGTH, tc.max_position_embeddings)
    w.add_uint32(K.EMBEDDING_LENGTH, tc.hidden_size)
    w.add_uint32(K.FEED_FORWARD_LENGTH, tc.intermediate_size)
    w.add_uint32(K.HEAD_COUNT, tc.num_attention_heads)
    w.add_uint32(K.HEAD_COUNT_KV, tc.num_key_value_heads)
    w.add_uint32(K.ROPE_DIMENSION_COUNT, tc.hidden_size // tc.num_attention_heads)
    w.add_float32(K.ROPE_FREQ_BASE, tc.rope_parameters["rope_theta"])
    w.add_float32(K.RMS_EPS, tc.rms_norm_eps)
    w.add_array(K.CROSS_ATTENTION_LAYERS, list(tc.cross_attention_layers))
    w.add_uint32(K.V_BLOCK_COUNT, vc.num_hidden_layers)
    w.add_uint32(K.V_GLOBAL_BLOCK_COUNT, vc.num_global_layers)
    w.add_array(K.V_INTERMEDIATE_LAYERS, list(vc.intermediate_layers_indices))
    w.add_uint32(K.V_EMBEDDING_LENGTH, vc.hidden_size)
    w.add_uint32(K.V_FEED_FORWARD_LENGTH, vc.intermediate_size)
    w.add_uint32(K.V_HEAD_COUNT, vc.attention_heads)
    w.add_float32(K.V_LN_EPS, vc.norm_eps)
    w.add_uint32(K.V_IMAGE_SIZE, vc.image_size)
    w.add_uint32(K.V_PATCH_SIZE, vc.patch_size)
    w.add_uint32(K.V_MAX_NUM_TILES, vc.max_num_tiles)
    w.add_uint32(K.V_NUM_CHANNELS, vc.num_channels)
    w.add_uint32(K.Q_IMAGE_TOKEN_ID, cfg.image_token_index)
    w.add_array(K.Q_STOP_TOKEN_IDS, [2, 3])
    w.add_array(K.Q_V_ASPECT_RATIOS, [int(x) for r in vc.supported_aspect_ratios for x in r])
    w.add_uint32(K.Q_V_OUTPUT_DIM, vc.vision_output_dim)
    w.add_uint32(K.Q_V_PROJECTION_DIM, tc.hidden_size)
    stored: dict[str, np.ndarray] = {}
    for name, a in tensors.items():
        if wtype in QTYPES and is_quantizable(name, a):
            q = quantize(a, wtype)
            w.add_tensor(name, q, raw_dtype=QTYPES[wtype])
            stored[name] = gguf.quants.dequantize(q, QTYPES[wtype]).reshape(a.shape)  # gguf-py's reference
        elif wtype == "f16" and a.ndim >= 2:
            w.add_tensor(name, a.astype(np.float16))
            stored[name] = a.astype(np.float16).astype(np.float32)
        else:
            w.add_tensor(name, a)
            stored[name] = a
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def load_stored_into_hf(model, stored: dict[str, np.ndarray]):
    """A copy of `model` whose text weights are the values the GGUF holds (undoing our permutations)."""
    ref = build_tiny()
    ref.load_state_dict(model.state_dict())
    tc = ref.config.text_config
    H, Hkv = tc.num_attention_heads, tc.num_key_value_heads
    lm = ref.model.language_model
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        lm.embed_tokens.weight.copy_(t(stored[K.TOKEN_EMBD]))
        ref.lm_head.weight.copy_(t(stored[K.OUTPUT]))
        for i, layer in enumerate(lm.layers):
            layer.mlp.gate_proj.weight.copy_(t(stored[K.blk(K.FFN_GATE, i)]))
            layer.mlp.up_proj.weight.copy_(t(stored[K.blk(K.FFN_UP, i)]))
            layer.mlp.down_proj.weight.copy_(t(stored[K.blk(K.FFN_DOWN, i)]))
            if i in tc.cross_attention_layers:
                a, names = layer.cross_attn, (K.XATTN_Q, K.XATTN_K, K.XATTN_V, K.XATTN_O)
            else:
                a, names = layer.self_attn, (K.ATTN_Q, K.ATTN_K, K.ATTN_V, K.ATTN_OUTPUT)
            a.q_proj.weight.copy_(t(K.unpermute_qk(stored[K.blk(names[0], i)], H)))
            a.k_proj.weight.copy_(t(K.unpermute_qk(stored[K.blk(names[1], i)], Hkv)))
            a.v_proj.weight.copy_(t(stored[K.blk(names[2], i)]))
            a.o_proj.weight.copy_(t(stored[K.blk(names[3], i)]))
    return ref.eval()


# ---------------------------------------------------------------------------
# Prompts (0, 1, 2 images; 1-4 tiles; text before and after each image)
# ---------------------------------------------------------------------------
RATIOS = [tuple(r) for r in tiny_config().vision_config.supported_aspect_ratios]  # id = index + 1


def make_case(rng, tokens: list[int], grids: list[tuple[int, int]]) -> dict:
    """Inputs as MllamaProcessor returns them (batch 1) for `tokens` and one tile grid per image."""
    n_img = len(grids)
    case = {"input_ids": np.asarray([tokens], dtype=np.int64)}
    if n_img == 0:
        return case
    px = np.zeros((1, n_img, MAX_TILES, 3, 28, 28), dtype=np.float32)
    ids = np.zeros((1, n_img), dtype=np.int64)
    msk = np.zeros((1, n_img, MAX_TILES), dtype=np.int64)
    for i, grid in enumerate(grids):
        nt = grid[0] * grid[1]
        px[0, i, :nt] = rng.standard_normal((nt, 3, 28, 28)).astype(np.float32)
        ids[0, i] = RATIOS.index(grid) + 1
        msk[0, i, :nt] = 1
    spans = get_cross_attention_token_mask(tokens, IMG)
    xmask = convert_sparse_cross_attention_mask_to_dense([spans], [[g[0] * g[1] for g in grids]], MAX_TILES,
                                                         len(tokens))
    case.update(pixel_values=px, aspect_ratio_ids=ids, aspect_ratio_mask=msk, cross_attention_mask=xmask)
    return case


def cases() -> dict[str, dict]:
    rng = np.random.default_rng(7)
    return {
        "text_only": make_case(rng, [1, 17, 250, 33, 9, 120, 61, 200, 5, 77, 300, 42], []),
        "one_image_1_tile": make_case(rng, [1, 20, 21, IMG, 30, 31, 32, 33, 34], [(1, 1)]),
        "one_image_3_tiles": make_case(rng, [1, IMG, 40, 41, 42, 43, 44, 45, 46, 47], [(3, 1)]),
        "two_images_4_and_2_tiles": make_case(rng, [1, 50, 51, IMG, 52, 53, 54, IMG, 55, 56, 57, 58],
                                              [(2, 2), (1, 2)]),
        "two_images_adjacent": make_case(rng, [1, 60, IMG, IMG, 61, 62, 63], [(1, 4), (2, 1)]),
    }


def hf_logits(model, case: dict) -> np.ndarray:
    kw = {k: torch.from_numpy(v) for k, v in case.items()}
    with torch.no_grad():
        return _np(model(**kw).logits[0])


def hf_cross_states(model, case: dict) -> np.ndarray:
    """HF cross_attention_states (vision tower + projector): [n_img, tiles, P, D]."""
    with torch.no_grad():
        vo = model.model.vision_model(pixel_values=torch.from_numpy(case["pixel_values"]),
                                      aspect_ratio_ids=torch.from_numpy(case["aspect_ratio_ids"]),
                                      aspect_ratio_mask=torch.from_numpy(case["aspect_ratio_mask"]))
        s = model.model.multi_modal_projector(vo.last_hidden_state)
    return _np(s)[0]


def our_logits(m: mllama_q.Model, hf_model, case: dict) -> np.ndarray:
    if "pixel_values" not in case:
        return m.forward(case["input_ids"])
    if HAVE_VISION:
        return m.forward(case["input_ids"], case["pixel_values"], case["aspect_ratio_ids"],
                         case["aspect_ratio_mask"], case["cross_attention_mask"])
    # No vision tower compiled in: feed HF's vision states (tests the decoder alone).
    m.reset()
    m._core.set_cross_attention_states(hf_cross_states(hf_model, case))
    return m._core.eval(case["input_ids"][0].astype(np.int32), case["cross_attention_mask"][0].astype(np.int32), True)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref| over all positions and vocab entries."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model():
    return build_tiny()


@pytest.fixture(scope="module")
def files(hf_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_mllama")
    out = {}
    for wtype in ("f32", "f16", "q8_0", "q4_k"):
        path = d / f"tiny-{wtype}.gguf"
        out[wtype] = (path, write_gguf(hf_model, path, wtype))
    return out


@pytest.fixture(scope="module")
def refs(hf_model):
    return {name: hf_logits(hf_model, c) for name, c in cases().items()}


def load(files, wtype, **kw):
    return mllama_q.Model(files[wtype][0], vision=HAVE_VISION, kv_type="f32", **kw)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
def test_gates_are_nonzero(hf_model):
    # Guards the parity tests below against the zero-gate trap.
    for name, p in hf_model.named_parameters():
        if name.endswith(("gate", "gate_attn", "gate_ffn")) and p.numel() == 1:
            assert abs(p.item()) >= 0.3, name


def test_image_changes_logits(hf_model, refs):
    # The image path matters in the reference: otherwise parity with images would prove nothing.
    c = cases()["one_image_1_tile"]
    c2 = dict(c, pixel_values=c["pixel_values"] * -1.0)
    assert rel_err(hf_logits(hf_model, c2), refs["one_image_1_tile"]) > 1e-2


@pytest.mark.parametrize("name", list(cases()))
def test_f32_logits_match_transformers(files, hf_model, refs, name):
    m = load(files, "f32")
    ours = our_logits(m, hf_model, cases()[name])
    assert ours.shape == refs[name].shape
    err = rel_err(ours, refs[name])
    assert err < 1e-4, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(cases()))
def test_f16_logits_match_transformers(files, hf_model, refs, name):
    m = load(files, "f16")
    err = rel_err(our_logits(m, hf_model, cases()[name]), refs[name])
    assert err < 5e-3, f"{name}: relative error {err:.2e}"


def weight_rel_rms_error(files, hf_model, wtype) -> float:
    """RMS relative error of the quantized text weights, from gguf-py's dequantizer."""
    orig = hf_to_gguf_tensors(hf_model)
    stored = files[wtype][1]
    num = den = 0.0
    for name, a in orig.items():
        if is_quantizable(name, a):
            num += float(np.sum((stored[name] - a) ** 2))
            den += float(np.sum(a ** 2))
    return float(np.sqrt(num / den))


@pytest.mark.parametrize("wtype", ["q8_0", "q4_k"])
def test_quantized_logits(files, hf_model, refs, wtype):
    """Quantized files, with bounds derived from the quantization error.

    1. Against HF running the SAME (dequantized) weights the runtime reads, the
       only differences are the runtime's arithmetic: the matmul kernels may
       quantize activations to 8 bits per 32/256 block like ggml (Q8_0 / Q8_K),
       a relative rounding error of at most 1/254 of the block maximum, i.e.
       about 1/(127*sqrt(12)) ≈ 0.23 % RMS per product. Through 5 layers (each
       with up to 7 products in series) and the output head, random errors add
       in quadrature: sqrt(40) * 0.23 % ≈ 1.5 %; bound 3e-2 of max |logit|.
    2. Against the original F32 model, the weight error e_w (RMS relative,
       measured with gguf-py) dominates; logits change by about e_w per product
       on the path, adding in quadrature over ~40 products: sqrt(40) e_w ≈ 6.3 e_w.
       Bound: 8 e_w + the arithmetic bound above.
    """
    m = load(files, wtype)
    e_w = weight_rel_rms_error(files, hf_model, wtype)
    ref_q = load_stored_into_hf(hf_model, files[wtype][1])
    for name, case in cases().items():
        ours = our_logits(m, hf_model, case)
        err_same = rel_err(ours, hf_logits(ref_q, case))
        assert err_same < 3e-2, f"{wtype} {name}: vs dequantized-weight reference {err_same:.2e}"
        err_orig = rel_err(ours, refs[name])
        assert err_orig < 8 * e_w + 3e-2, f"{wtype} {name}: vs F32 reference {err_orig:.2e} (e_w {e_w:.2e})"


def test_eval_incremental_equals_forward(files, hf_model):
    """Prefill in pieces + decoding one token at a time gives the same logits as one forward."""
    m = load(files, "f32")
    case = cases()["two_images_4_and_2_tiles"]
    full = our_logits(m, hf_model, case)
    ids = case["input_ids"][0]
    xm = case["cross_attention_mask"][0]
    m.reset()
    if HAVE_VISION:
        m.encode_images(case["pixel_values"], case["aspect_ratio_ids"], case["aspect_ratio_mask"])
    else:
        m._core.set_cross_attention_states(hf_cross_states(hf_model, case))
    got = [m.eval(ids[:5], xm[:5])]
    for i in range(5, len(ids)):
        got.append(m.eval(ids[i:i + 1], xm[i:i + 1]))
    assert m.n_past == len(ids)
    np.testing.assert_allclose(got[0], full[4], rtol=0, atol=1e-5 * np.abs(full).max())
    np.testing.assert_allclose(np.stack(got[1:]), full[5:], rtol=0, atol=1e-5 * np.abs(full).max())


def hf_greedy(model, case, n_new):
    kw = {k: torch.from_numpy(v) for k, v in case.items()}
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new,
                             eos_token_id=None, pad_token_id=4)
    return out[0, case["input_ids"].shape[1]:].tolist()


def our_greedy(m, hf_model, case, n_new):
    ids = case["input_ids"][0]
    m.reset()
    if "pixel_values" in case:
        if HAVE_VISION:
            m.encode_images(case["pixel_values"], case["aspect_ratio_ids"], case["aspect_ratio_mask"])
        else:
            m._core.set_cross_attention_states(hf_cross_states(hf_model, case))
        logits = m.eval(ids, case["cross_attention_mask"][0])
    else:
        logits = m.eval(ids)
    out = []
    for _ in range(n_new):
        t = int(np.argmax(logits))
        out.append(t)
        logits = m.eval([t])  # None: the last mask row is repeated, as HF generate does
    return out


@pytest.mark.parametrize("name", ["text_only", "two_images_4_and_2_tiles"])
def test_greedy_matches_transformers(files, hf_model, name):
    case = cases()[name]
    m = load(files, "f32", n_ctx=64)
    ours = our_greedy(m, hf_model, case, 32)
    assert ours == hf_greedy(hf_model, case, 32)
    # Repeated runs are identical.
    assert our_greedy(m, hf_model, case, 32) == ours


def test_repeated_forward_identical(files, hf_model):
    m = load(files, "q4_k")
    case = cases()["two_images_4_and_2_tiles"]
    a = our_logits(m, hf_model, case)
    b = our_logits(m, hf_model, case)
    assert np.array_equal(a, b)


def test_prompt_longer_than_n_ctx(files):
    m = mllama_q.Model(files["f32"][0], vision=False, n_ctx=8)
    with pytest.raises(ValueError, match="n_ctx"):
        m.forward(np.arange(1, 10))
    m.reset()
    m.eval(np.arange(1, 6))
    with pytest.raises(ValueError, match="n_ctx"):
        m.eval(np.arange(1, 5))


def test_text_only_model_ignores_vision(files, refs):
    """vision=False: the text path equals transformers' text-only logits and images are refused."""
    m = mllama_q.Model(files["f32"][0], vision=False, kv_type="f32")
    assert not m.has_vision
    assert rel_err(m.forward(cases()["text_only"]["input_ids"]), refs["text_only"]) < 1e-4
    c = cases()["one_image_1_tile"]
    with pytest.raises(ValueError, match="vision"):
        m.encode_images(c["pixel_values"], c["aspect_ratio_ids"], c["aspect_ratio_mask"])


def test_bad_tokens_and_masks(files):
    m = mllama_q.Model(files["f32"][0], vision=False)
    with pytest.raises(ValueError, match="out of range"):
        m.forward([1, 2, VOCAB + 8])
    with pytest.raises(ValueError):
        m.forward([])
    with pytest.raises(ValueError):
        m.forward([[1, 2], [3, 4]])
