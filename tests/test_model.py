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

from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

import mllama_q  # noqa: E402
from mllama_q import gguf_keys as K  # noqa: E402

MAX_TILES = 4
TILE = 56  # tiny_models' image_size


# ---------------------------------------------------------------------------
# Tiny checkpoint (converter's builder) and its GGUFs (our converter)
# ---------------------------------------------------------------------------
# --type of the converter -> the text weight type it writes (gguf_keys.tensor_type).
FILE_TYPES = {"f32": "f32", "f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "q4_k": "q4_k_s"}


def _np(t) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def gguf_values(path) -> dict[str, np.ndarray]:
    """{name: float32 values} of every tensor in a GGUF, dequantized by gguf-py (the format reference)."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
        out[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    return out


def hf_with_file_weights(ref, path):
    """`ref` (a private HF model) with the text weights replaced by the values the GGUF holds
    (Q/K rows un-permuted with gguf_keys.unpermute_qk): the same weights the runtime reads."""
    vals = gguf_values(path)
    tc = ref.config.text_config
    H, Hkv = tc.num_attention_heads, tc.num_key_value_heads
    lm = ref.model.language_model
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        lm.embed_tokens.weight.copy_(t(vals[K.TOKEN_EMBD]))
        ref.lm_head.weight.copy_(t(vals[K.OUTPUT]))
        for i, layer in enumerate(lm.layers):
            layer.mlp.gate_proj.weight.copy_(t(vals[K.blk(K.FFN_GATE, i)]))
            layer.mlp.up_proj.weight.copy_(t(vals[K.blk(K.FFN_UP, i)]))
            layer.mlp.down_proj.weight.copy_(t(vals[K.blk(K.FFN_DOWN, i)]))
            if i in tc.cross_attention_layers:
                a, names = layer.cross_attn, (K.XATTN_Q, K.XATTN_K, K.XATTN_V, K.XATTN_O)
            else:
                a, names = layer.self_attn, (K.ATTN_Q, K.ATTN_K, K.ATTN_V, K.ATTN_OUTPUT)
            a.q_proj.weight.copy_(t(K.unpermute_qk(vals[K.blk(names[0], i)], H)))
            a.k_proj.weight.copy_(t(K.unpermute_qk(vals[K.blk(names[1], i)], Hkv)))
            a.v_proj.weight.copy_(t(vals[K.blk(names[2], i)]))
            a.o_proj.weight.copy_(t(vals[K.blk(names[3], i)]))
        # Vision matrices may be quantized too (the converter's default q8_0 for quantized
        # --types): load them the same way.
        vm = ref.model.vision_model
        vh = ref.config.vision_config.attention_heads
        for is_global, layers in ((False, vm.transformer.layers), (True, vm.global_transformer.layers)):
            for i, layer in enumerate(layers):
                n = lambda key: K.vblk(key, i, is_global)  # noqa: E731
                sa = layer.self_attn
                sa.q_proj.weight.copy_(t(K.unpermute_qk(vals[n(K.V_ATTN_Q)], vh)))
                sa.k_proj.weight.copy_(t(K.unpermute_qk(vals[n(K.V_ATTN_K)], vh)))
                sa.v_proj.weight.copy_(t(vals[n(K.V_ATTN_V)]))
                sa.o_proj.weight.copy_(t(vals[n(K.V_ATTN_OUTPUT)]))
                layer.mlp.fc1.weight.copy_(t(vals[n(K.V_FFN_UP_W)]))
                layer.mlp.fc2.weight.copy_(t(vals[n(K.V_FFN_DOWN_W)]))
        ref.model.multi_modal_projector.weight.copy_(t(vals[K.MM_PROJ_W]))
        vm.patch_embedding.weight.copy_(t(vals[K.V_PATCH_EMBD]))  # F16 in quantized files
    return ref.eval()


def quantized_matrix_names(path) -> list[str]:
    """Tensors stored with less precision than F32 (F16, BF16, Q8_0, Q4_K, Q6_K)."""
    r = gguf.GGUFReader(str(path))
    return [t.name for t in r.tensors if int(t.tensor_type) in (1, 8, 12, 14, 30)]


# ---------------------------------------------------------------------------
# Prompts (0, 1, 2 images; 1-4 tiles; text before and after each image)
# ---------------------------------------------------------------------------
RATIOS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]  # tiny_models' list; id = index + 1
CASE_NAMES = ["text_only", "one_image_1_tile", "one_image_3_tiles", "two_images_4_and_2_tiles", "two_images_adjacent"]


def make_case(rng, tokens: list[int], grids: list[tuple[int, int]], img: int) -> dict:
    """Inputs as MllamaProcessor returns them (batch 1) for `tokens` and one tile grid per image."""
    n_img = len(grids)
    case = {"input_ids": np.asarray([tokens], dtype=np.int64)}
    if n_img == 0:
        return case
    px = np.zeros((1, n_img, MAX_TILES, 3, TILE, TILE), dtype=np.float32)
    ids = np.zeros((1, n_img), dtype=np.int64)
    msk = np.zeros((1, n_img, MAX_TILES), dtype=np.int64)
    for i, grid in enumerate(grids):
        nt = grid[0] * grid[1]
        px[0, i, :nt] = rng.standard_normal((nt, 3, TILE, TILE)).astype(np.float32)
        ids[0, i] = RATIOS.index(grid) + 1
        msk[0, i, :nt] = 1
    # transformers' own processor functions build the mask (the reference).
    spans = get_cross_attention_token_mask(tokens, img)
    xmask = convert_sparse_cross_attention_mask_to_dense(
        [spans], [[g[0] * g[1] for g in grids]], MAX_TILES, len(tokens)
    )
    case.update(pixel_values=px, aspect_ratio_ids=ids, aspect_ratio_mask=msk, cross_attention_mask=xmask)
    return case


def make_cases(img: int) -> dict[str, dict]:
    rng = np.random.default_rng(7)
    I = img  # noqa: E741
    return {
        "text_only": make_case(rng, [0, 17, 250, 33, 9, 120, 61, 200, 5, 77, 300, 42], [], I),
        "one_image_1_tile": make_case(rng, [0, 20, 21, I, 30, 31, 32, 33, 34], [(1, 1)], I),
        "one_image_3_tiles": make_case(rng, [0, I, 40, 41, 42, 43, 44, 45, 46, 47], [(3, 1)], I),
        "two_images_4_and_2_tiles": make_case(rng, [0, 50, 51, I, 52, 53, 54, I, 55, 56, 57, 58], [(2, 2), (1, 2)], I),
        "two_images_adjacent": make_case(rng, [0, 60, I, I, 61, 62, 63], [(1, 4), (2, 1)], I),
    }


def hf_logits(model, case: dict) -> np.ndarray:
    kw = {k: torch.from_numpy(v) for k, v in case.items()}
    with torch.no_grad():
        return _np(model(**kw).logits[0])


def our_logits(m: mllama_q.Model, case: dict) -> np.ndarray:
    if "pixel_values" not in case:
        return m.forward(case["input_ids"])
    return m.forward(
        case["input_ids"],
        case["pixel_values"],
        case["aspect_ratio_ids"],
        case["aspect_ratio_mask"],
        case["cross_attention_mask"],
    )


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref| over all positions and vocab entries."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tiny_gguf, hf_model):
    ckpt = tiny_checkpoint(seed=0, dtype="float32")
    hf = hf_model(ckpt)
    files = {name: tiny_gguf(ckpt, ftype) for name, ftype in FILE_TYPES.items()}
    img = int(hf.config.image_token_index)
    cases = make_cases(img)
    refs = {name: hf_logits(hf, c) for name, c in cases.items()}
    return {
        "ckpt": ckpt,
        "hf": hf,
        "files": files,
        "img": img,
        "vocab": int(hf.config.text_config.vocab_size),
        "cases": cases,
        "refs": refs,
        "hf_fresh": lambda: hf_model(ckpt, fresh=True),
    }


def load(tiny, wtype, **kw):
    return mllama_q.Model(tiny["files"][wtype], kv_type=kw.pop("kv_type", "f32"), **kw)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
def test_gates_are_nonzero(tiny):
    # Guards the parity tests below against the zero-gate trap.
    n = 0
    for name, p in tiny["hf"].named_parameters():
        if name.endswith(("gate", "gate_attn", "gate_ffn", "attn_gate", "mlp_gate")) and p.numel() == 1:
            assert abs(p.item()) >= 0.3, name
            n += 1
    assert n >= 2 * 2 + 2 * 2 + 3  # text cross layers, vision global layers, positional gates


def test_image_changes_logits(tiny):
    # The image path matters in the reference: otherwise parity with images would prove nothing.
    c = tiny["cases"]["one_image_1_tile"]
    c2 = dict(c, pixel_values=c["pixel_values"] * -1.0)
    assert rel_err(hf_logits(tiny["hf"], c2), tiny["refs"]["one_image_1_tile"]) > 1e-2


@pytest.mark.parametrize("name", CASE_NAMES)
def test_f32_logits_match_transformers(tiny, name):
    m = load(tiny, "f32")
    ours = our_logits(m, tiny["cases"][name])
    ref = tiny["refs"][name]
    assert ours.shape == ref.shape
    err = rel_err(ours, ref)
    assert err < 1e-4, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", CASE_NAMES)
def test_f16_logits_match_transformers(tiny, name):
    m = load(tiny, "f16", kv_type="f16")
    err = rel_err(our_logits(m, tiny["cases"][name]), tiny["refs"][name])
    assert err < 5e-3, f"{name}: relative error {err:.2e}"


def weight_rel_rms_error(tiny, wtype) -> float:
    """RMS relative error of the file's block-quantized matrices (gguf-py dequantizer vs the F32 file)."""
    q = gguf_values(tiny["files"][wtype])
    f = gguf_values(tiny["files"]["f32"])
    names = quantized_matrix_names(tiny["files"][wtype])
    assert names
    num = sum(float(np.sum((q[n] - f[n]) ** 2)) for n in names)
    den = sum(float(np.sum(f[n] ** 2)) for n in names)
    return float(np.sqrt(num / den))


@pytest.mark.parametrize("wtype", ["q8_0", "q4_k"])
def test_quantized_logits(tiny, wtype):
    """Quantized files, with bounds derived from the quantization error.

    1. Against HF running the SAME (gguf-py dequantized) weights the runtime
       reads, only the runtime's arithmetic differs: the matmul kernels quantize
       activations to 8 bits per block like ggml (Q8_0 / Q8_K), a rounding error
       of at most 1/254 of the block maximum, about 1/(127*sqrt(12)) = 0.23 % RMS
       relative per product. Independent errors add in quadrature along the
       ~30 products a logit depends on (5 layers x 6 in series, plus the head and
       the vision tower): sqrt(40) * 0.23 % = 1.5 %; bound 3e-2 of max |logit|.
    2. Against the original F32 model, the weight error e_w (RMS relative,
       measured with gguf-py) adds about e_w per product, in quadrature over the
       same ~40 products: sqrt(40) e_w = 6.3 e_w. Bound: 8 e_w plus bound 1.
    """
    m = load(tiny, wtype)
    e_w = weight_rel_rms_error(tiny, wtype)
    ref_q = hf_with_file_weights(tiny["hf_fresh"](), tiny["files"][wtype])
    errs = []
    for name, case in tiny["cases"].items():
        ours = our_logits(m, case)
        err_same = rel_err(ours, hf_logits(ref_q, case))
        err_orig = rel_err(ours, tiny["refs"][name])
        errs.append((name, err_same, err_orig))
        assert err_same < 3e-2, f"{wtype} {name}: vs dequantized-weight reference {err_same:.2e}"
        assert err_orig < 8 * e_w + 3e-2, f"{wtype} {name}: vs F32 reference {err_orig:.2e} (e_w {e_w:.2e})"
    print(f"{wtype}: e_w={e_w:.3e}", errs)


def test_bf16_logits(tiny):
    """BF16 weights widen to F32 exactly, so against HF running the same (bf16-rounded) weights
    the runtime must agree to F32 accuracy (1e-4); against the original F32 model the weight
    rounding (RMS e_w, measured) bounds the error as in test_quantized_logits: 8 e_w."""
    m = load(tiny, "bf16")
    e_w = weight_rel_rms_error(tiny, "bf16")
    ref_b = hf_with_file_weights(tiny["hf_fresh"](), tiny["files"]["bf16"])
    for name, case in tiny["cases"].items():
        ours = our_logits(m, case)
        assert rel_err(ours, hf_logits(ref_b, case)) < 1e-4, name
        assert rel_err(ours, tiny["refs"][name]) < 8 * e_w + 1e-4, name


def test_eval_incremental_equals_forward(tiny):
    """Prefill in pieces + decoding one token at a time gives the same logits as one forward."""
    m = load(tiny, "f32")
    case = tiny["cases"]["two_images_4_and_2_tiles"]
    full = our_logits(m, case)
    ids = case["input_ids"][0]
    xm = case["cross_attention_mask"][0]
    m.reset()
    m.encode_images(case["pixel_values"], case["aspect_ratio_ids"], case["aspect_ratio_mask"])
    got = [m.eval(ids[:5], xm[:5])]
    for i in range(5, len(ids)):
        got.append(m.eval(ids[i : i + 1], xm[i : i + 1]))
    assert m.n_past == len(ids)
    tol = 1e-5 * np.abs(full).max()
    np.testing.assert_allclose(got[0], full[4], rtol=0, atol=tol)
    np.testing.assert_allclose(np.stack(got[1:]), full[5:], rtol=0, atol=tol)


def hf_greedy(model, case, n_new):
    kw = {k: torch.from_numpy(v) for k, v in case.items()}
    kw["attention_mask"] = torch.ones_like(kw["input_ids"])  # explicit: no padding inferred from pad ids
    with torch.no_grad():
        out = model.generate(
            **kw,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=model.config.text_config.pad_token_id,
        )
    return out[0, case["input_ids"].shape[1] :].tolist()


def our_greedy(m, case, n_new):
    ids = case["input_ids"][0]
    m.reset()
    if "pixel_values" in case:
        m.encode_images(case["pixel_values"], case["aspect_ratio_ids"], case["aspect_ratio_mask"])
        logits = m.eval(ids, case["cross_attention_mask"][0])
    else:
        logits = m.eval(ids)
    out = []
    for _ in range(n_new):
        t = int(np.argmax(logits))
        out.append(t)
        logits = m.eval([t])  # no mask: the last mask row is repeated, as HF generate does
    return out


@pytest.mark.parametrize("name", ["text_only", "two_images_4_and_2_tiles"])
def test_greedy_matches_transformers(tiny, name):
    case = tiny["cases"][name]
    m = load(tiny, "f32", n_ctx=64)
    ours = our_greedy(m, case, 32)
    assert ours == hf_greedy(tiny["hf"], case, 32)
    assert our_greedy(m, case, 32) == ours  # repeated runs are identical


def test_repeated_forward_identical(tiny):
    m = load(tiny, "q4_k")
    case = tiny["cases"]["two_images_4_and_2_tiles"]
    a = our_logits(m, case)
    b = our_logits(m, case)
    assert np.array_equal(a, b)


def test_prompt_longer_than_n_ctx(tiny):
    m = mllama_q.Model(tiny["files"]["f32"], vision=False, n_ctx=8)
    with pytest.raises(ValueError, match="n_ctx"):
        m.forward(np.arange(1, 10))
    m.reset()
    m.eval(np.arange(1, 6))
    with pytest.raises(ValueError, match="n_ctx"):
        m.eval(np.arange(1, 5))


def test_text_only_model_never_uses_vision(tiny):
    """vision=False: no vision tensor is handed to the core; text logits equal transformers'."""
    m = mllama_q.Model(tiny["files"]["f32"], vision=False, kv_type="f32")
    assert not m.has_vision
    assert not any(n.startswith(("v.", "mm.")) for n in m._tensors)
    # vision=True and a text-only prompt: the vision weights are not uploaded either.
    mv = load(tiny, "f32")
    mv.forward(tiny["cases"]["text_only"]["input_ids"])
    assert mv.has_vision and not mv._core.vision_loaded
    assert rel_err(m.forward(tiny["cases"]["text_only"]["input_ids"]), tiny["refs"]["text_only"]) < 1e-4
    c = tiny["cases"]["one_image_1_tile"]
    with pytest.raises(ValueError, match="vision"):
        m.encode_images(c["pixel_values"], c["aspect_ratio_ids"], c["aspect_ratio_mask"])


def test_frontend_attributes(tiny):
    m = load(tiny, "f32")
    assert m.tokenizer is not None and m.processor is not None
    hf_stop = tiny["hf"].config.text_config.eos_token_id
    assert set(hf_stop) <= set(m.stop_ids)
    assert m.n_ctx == 4096 and m.n_past == 0


def test_bad_tokens_and_masks(tiny):
    m = load(tiny, "f32")
    with pytest.raises(ValueError, match="out of range"):
        m.forward([1, 2, tiny["vocab"] + 8])
    with pytest.raises(ValueError):
        m.forward([])
    with pytest.raises(ValueError):
        m.forward([[1, 2], [3, 4]])
    c = tiny["cases"]["one_image_1_tile"]
    with pytest.raises(ValueError, match="cross_attention_mask"):
        m.forward(
            c["input_ids"],
            c["pixel_values"],
            c["aspect_ratio_ids"],
            c["aspect_ratio_mask"],
            c["cross_attention_mask"][:, :3],
        )
    with pytest.raises(ValueError, match="pixel_values"):
        m.forward(c["input_ids"], c["pixel_values"][..., :28], c["aspect_ratio_ids"], c["aspect_ratio_mask"])


def test_generate_end_to_end_matches_transformers(tiny):
    """Model.generate (frontend processor + generate loop over eval) with an image: its greedy
    tokens equal transformers' generate on the same processed inputs."""
    from PIL import Image

    m = load(tiny, "f32", n_ctx=128)
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8))
    text = "<|image|>Describe the picture"
    res = m.generate(prompt=text, images=[img], max_new_tokens=12, temperature=0)
    enc = m.processor(text=text, images=[img])
    case = {
        k: np.asarray(enc[k])
        for k in ("input_ids", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
    }
    assert case["pixel_values"].shape[1:3] == (1, MAX_TILES)
    ref = hf_greedy(tiny["hf"], case, 12)
    n = len(res.tokens)
    assert res.tokens == ref[:n]
    if res.stop_reason == "stop_token":
        assert ref[n] in m.stop_ids
    else:
        assert n == 12
    assert res.prompt_tokens == case["input_ids"].shape[1]


def test_ollama_layout_file(tiny, tmp_path):
    """A file in Ollama's layout (no mllama_q.* keys; cross-attention q/k norm vectors left in HF
    order) gives the same logits: the runtime permutes those vectors itself (gguf_keys)."""
    src = gguf.GGUFReader(str(tiny["files"]["f32"]))
    dst = tmp_path / "ollama.gguf"
    w = gguf.GGUFWriter(str(dst), K.ARCH)
    for key, f in src.fields.items():
        if key.startswith(("GGUF.", "mllama_q.")) or key == K.GENERAL_ARCHITECTURE:
            continue
        vt = f.types[0]
        w.add_key_value(key, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for t in src.tensors:
        a = np.array(t.data)
        if t.name.endswith(("cross_attn_q_norm.weight", "cross_attn_k_norm.weight")):
            a = K.unpermute_head_vector(a)  # what Ollama's converter stored
        w.add_tensor(t.name, a, raw_dtype=None if a.dtype in (np.float32, np.float16) else t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = mllama_q.Model(dst, kv_type="f32")
    for name in ("two_images_4_and_2_tiles", "text_only"):
        assert rel_err(our_logits(m, tiny["cases"][name]), tiny["refs"][name]) < 1e-4, name


def test_other_shapes_hd128_gqa4_two_tiles(tiny_checkpoint, tiny_gguf, hf_model):
    """head_dim 128 and 4:1 GQA as in the 11B, a different cross-attention layer set and a
    2-tile vision config with its own aspect-ratio list (read from the file's mllama_q keys)."""
    ckpt = tiny_checkpoint(
        seed=5,
        dtype="float32",
        text_config={
            "hidden_size": 512,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "cross_attention_layers": [0, 2],
        },
        vision_config={"max_num_tiles": 2, "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]},
    )
    hf = hf_model(ckpt)
    path = tiny_gguf(ckpt, "f32")
    m = mllama_q.Model(path, kv_type="f32")
    assert m.vision_hparams["max_num_tiles"] == 2 and m.vision_hparams["max_aspect_ratio_id"] == 3
    img = int(hf.config.image_token_index)
    rng = np.random.default_rng(3)
    tokens = [0, 11, img, 12, 13, img, 14, 15, 16]
    px = np.zeros((1, 2, 2, 3, TILE, TILE), np.float32)
    px[0, 0, :2] = rng.standard_normal((2, 3, TILE, TILE))
    px[0, 1, :1] = rng.standard_normal((1, 3, TILE, TILE))
    case = {
        "input_ids": np.asarray([tokens]),
        "pixel_values": px,
        "aspect_ratio_ids": np.asarray([[3, 1]]),
        "aspect_ratio_mask": np.asarray([[[1, 1], [1, 0]]]),
        "cross_attention_mask": convert_sparse_cross_attention_mask_to_dense(
            [get_cross_attention_token_mask(tokens, img)], [[2, 1]], 2, len(tokens)
        ),
    }
    err = rel_err(our_logits(m, case), hf_logits(hf, case))
    assert err < 1e-4, err
    text = {"input_ids": np.asarray([[0, 5, 6, 7, 8]])}
    assert rel_err(our_logits(m, text), hf_logits(hf, text)) < 1e-4
