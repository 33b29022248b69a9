"""Vision tower + projector (csrc/model/vision.cpp) against transformers.

Reference: MllamaModel's `cross_attention_states` =
multi_modal_projector(vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)),
computed by transformers in float64 on a tiny random checkpoint whose gates and
zero-/one-initialised parameters are all randomised (transformers initialises the
gates to zero, which would make the tile/position paths vanish from the output).
"""
import numpy as np
import pytest
import torch

from mllama_q import _core

transformers = pytest.importorskip("transformers")
from transformers import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402

GGML_F32, GGML_F16 = 0, 1

# Tiny vision tower: 56 px tiles of 14 px patches -> 16 patches + class token = 17
# positions per tile, padded to 24 (HF pads to a multiple of 8), 4 tiles per image.
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_global_layers=2,
              attention_heads=4, image_size=56, patch_size=14, num_channels=3, max_num_tiles=4,
              intermediate_layers_indices=[0, 2, 3], norm_eps=1e-5)
TEXT_HIDDEN = 40


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _randomise(model, rng):
    """Give every vision/projector parameter a non-trivial random value.

    Matrices ~ N(0, 1/fan_in) so activations stay O(1) and attention scores are
    O(1) (peaky softmax: the padding mask visibly matters); norms/biases/embeddings
    random; every tanh gate uniform |g| in [0.3, 1.2] with a random sign.
    """
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    with torch.no_grad():
        for name, p in list(model.model.vision_model.named_parameters()) + [
                ("mm." + n, p) for n, p in model.model.multi_modal_projector.named_parameters()]:
            if name.endswith("gate") or name.endswith("gate_attn") or name.endswith("gate_ffn"):
                mag = torch.rand(p.shape, generator=g) * 0.9 + 0.3
                sign = torch.where(torch.rand(p.shape, generator=g) < 0.5, -1.0, 1.0)
                p.copy_(mag * sign)
            elif p.ndim >= 2 and "embedding" not in name:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
            elif "layernorm" in name or "layer_norm" in name or "norm" in name and p.ndim == 1 and "weight" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:  # biases, class/position/tile embeddings
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    K = len(VISION["intermediate_layers_indices"])
    cfg = MllamaConfig(
        vision_config=dict(VISION, vision_output_dim=VISION["hidden_size"] * (1 + K)),
        text_config=dict(vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=3, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, cross_attention_layers=[1]),
    )
    model = MllamaForConditionalGeneration(cfg).eval()
    _randomise(model, np.random.default_rng(7))
    return model


def _state(model):
    """The checkpoint's vision + projector tensors under the hub's key names, float32 numpy."""
    sd = {}
    for k, v in model.model.vision_model.state_dict().items():
        sd["vision_model." + k] = v.detach().float().numpy()
    for k, v in model.model.multi_modal_projector.state_dict().items():
        sd["multi_modal_projector." + k] = v.detach().float().numpy()
    return sd


def _permute_qk(w, n_head):
    """HF rotate-half row order -> interleaved pairs within each head (gguf_keys.permute_qk)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(sd, cfg, f16_matrices=False):
    """HF state dict -> {gguf name: (array, ggml type, shape)} in the mllama layout
    (gguf_keys.py): v.* / mm.0.* names, Q/K rows permuted, vision gates stored as
    tanh(g), position gate split into (1 - tanh g, tanh g), 1-D tensors F32."""
    vc = cfg.vision_config
    out = {}
    t = np.tanh

    def put(name, a, matrix=False):
        a = np.ascontiguousarray(a, np.float32)
        if matrix and f16_matrices:
            out[name] = (a.astype(np.float16).view(np.uint16), GGML_F16, a.shape)
        else:
            out[name] = (a, GGML_F32, a.shape)

    v = "vision_model."
    put("v.patch_embd.weight", sd[v + "patch_embedding.weight"], matrix=True)
    put("v.class_embd", sd[v + "class_embedding"])
    g = sd[v + "gated_positional_embedding.gate"].astype(np.float32)
    put("v.position_embd.weight", sd[v + "gated_positional_embedding.embedding"])
    put("v.position_embd.gate", (1 - t(g)))
    put("v.tile_position_embd.weight", sd[v + "gated_positional_embedding.tile_embedding.weight"])
    put("v.tile_position_embd.gate", t(g))
    for ours, hf in (("pre", "pre"), ("post", "post")):
        put(f"v.{ours}_tile_position_embd.weight", sd[v + f"{hf}_tile_positional_embedding.embedding.weight"])
        put(f"v.{ours}_tile_position_embd.gate", t(sd[v + f"{hf}_tile_positional_embedding.gate"]))
    for ours, hf in (("pre_ln", "layernorm_pre"), ("post_ln", "layernorm_post")):
        put(f"v.{ours}.weight", sd[v + hf + ".weight"])
        put(f"v.{ours}.bias", sd[v + hf + ".bias"])
    for enc, pre, n in (("transformer", "v.blk.", vc.num_hidden_layers),
                        ("global_transformer", "v.global.blk.", vc.num_global_layers)):
        for i in range(n):
            h = f"{v}{enc}.layers.{i}."
            p = f"{pre}{i}."
            put(p + "attn_norm.weight", sd[h + "input_layernorm.weight"])
            put(p + "attn_norm.bias", sd[h + "input_layernorm.bias"])
            put(p + "attn_q.weight", _permute_qk(sd[h + "self_attn.q_proj.weight"], vc.attention_heads), True)
            put(p + "attn_k.weight", _permute_qk(sd[h + "self_attn.k_proj.weight"], vc.attention_heads), True)
            put(p + "attn_v.weight", sd[h + "self_attn.v_proj.weight"], True)
            put(p + "attn_output.weight", sd[h + "self_attn.o_proj.weight"], True)
            put(p + "ffn_norm.weight", sd[h + "post_attention_layernorm.weight"])
            put(p + "ffn_norm.bias", sd[h + "post_attention_layernorm.bias"])
            put(p + "ffn_up.weight", sd[h + "mlp.fc1.weight"], True)
            put(p + "ffn_up.bias", sd[h + "mlp.fc1.bias"])
            put(p + "ffn_down.weight", sd[h + "mlp.fc2.weight"], True)
            put(p + "ffn_down.bias", sd[h + "mlp.fc2.bias"])
            if enc == "global_transformer":
                put(p + "attn_gate", t(sd[h + "gate_attn"]))
                put(p + "ffn_gate", t(sd[h + "gate_ffn"]))
    put("mm.0.weight", sd["multi_modal_projector.weight"], True)
    put("mm.0.bias", sd["multi_modal_projector.bias"])
    return out


def _hparams(cfg, **over):
    vc = cfg.vision_config
    hp = dict(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size, num_layers=vc.num_hidden_layers,
              num_global_layers=vc.num_global_layers, n_head=vc.attention_heads, image_size=vc.image_size,
              patch_size=vc.patch_size, num_channels=vc.num_channels, max_num_tiles=vc.max_num_tiles,
              max_aspect_ratio_id=vc.max_aspect_ratio_id, norm_eps=vc.norm_eps,
              intermediate_layers=list(vc.intermediate_layers_indices), out_dim=cfg.text_config.hidden_size)
    hp.update(over)
    return hp


def _inputs(cfg, rng):
    """3 images: 3 real tiles + 1 empty (1x3), 1 real + 3 empty (1x1), 4 real (2x2).
    Empty tiles are zeros, as MllamaImageProcessor pads them."""
    vc = cfg.vision_config
    ratios = vc.supported_aspect_ratios
    n_tiles = [3, 1, 4]
    ids = np.array([ratios.index([1, 3]) + 1, ratios.index([1, 1]) + 1, ratios.index([2, 2]) + 1], np.int32)
    T, C, S = vc.max_num_tiles, vc.num_channels, vc.image_size
    px = np.zeros((len(n_tiles), T, C, S, S), np.float32)
    mask = np.zeros((len(n_tiles), T), np.int32)
    for i, n in enumerate(n_tiles):
        px[i, :n] = rng.standard_normal((n, C, S, S)).astype(np.float32)
        mask[i, :n] = 1
    return px, ids, mask


def _reference(model, px, ids, mask, dtype=torch.float64):
    """HF MllamaModel's cross_attention_states for one batch of len(ids) images."""
    m = model.to(dtype)
    with torch.no_grad():
        vis = m.model.vision_model(pixel_values=torch.from_numpy(px)[None].to(dtype),
                                   aspect_ratio_ids=torch.from_numpy(ids)[None].long(),
                                   aspect_ratio_mask=torch.from_numpy(mask)[None].long())
        states = m.model.multi_modal_projector(vis.last_hidden_state)
    return states[0].numpy()  # [n_img, T, P, out_dim]


@pytest.fixture(scope="module")
def case(hf_model):
    rng = np.random.default_rng(11)
    px, ids, mask = _inputs(hf_model.config, rng)
    sd = _state(hf_model)  # float32 weights, taken before the float64 cast
    ref = _reference(hf_model, px, ids, mask)
    return dict(px=px, ids=ids, mask=mask, sd=sd, ref=ref)


def test_f32_parity(hf_model, case):
    cfg = hf_model.config
    enc = _core.VisionEncoder(_gguf_tensors(case["sd"], cfg), _hparams(cfg))
    assert enc.num_patches == 17
    out = enc.encode(case["px"], case["ids"], case["mask"])
    assert out.shape == case["ref"].shape == (3, 4, 17, TEXT_HIDDEN)
    # float32 everywhere vs a float64 reference: a few float32 ulps per op.
    errs = [_rel(out[i], case["ref"][i]) for i in range(3)]
    print("f32 rel err per image:", ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 1e-4, errs
    assert np.abs(out - case["ref"]).max() < 1e-4 * np.abs(case["ref"]).max()


def test_layer_input_convention(hf_model, case):
    """intermediate_at_layer_input=True names the INPUT of local layer i (Meta's
    reference, transformers <= 4.53): index i then equals transformers 5.x's i - 1."""
    cfg = hf_model.config
    shifted = [i + 1 for i in cfg.vision_config.intermediate_layers_indices]
    enc = _core.VisionEncoder(_gguf_tensors(case["sd"], cfg),
                              _hparams(cfg, intermediate_layers=shifted, intermediate_at_layer_input=True))
    out = enc.encode(case["px"], case["ids"], case["mask"])
    assert _rel(out, case["ref"]) < 1e-4
    # ... and the two conventions differ (the choice is visible in the output).
    enc = _core.VisionEncoder(_gguf_tensors(case["sd"], cfg), _hparams(cfg, intermediate_at_layer_input=True))
    assert _rel(enc.encode(case["px"], case["ids"], case["mask"]), case["ref"]) > 1e-2


def test_mask_and_gates_matter(hf_model, case):
    """Guards against a vacuous test: the padding mask, the tile embeddings and
    the intermediate layers all change the reference visibly."""
    ref = case["ref"]
    px, ids, mask = case["px"], case["ids"], case["mask"]
    # Marking the empty tiles real changes HF's mask (padding queries of image 0 see other padding rows).
    alt = _reference(hf_model, px, ids, np.ones_like(mask))
    assert _rel(alt[0], ref[0]) > 1e-2
    # Another aspect-ratio id changes the tile embeddings of every tile.
    alt = _reference(hf_model, px, np.roll(ids, 1), mask)
    for i in range(3):
        assert _rel(alt[i], ref[i]) > 1e-2


def test_f16_weights(hf_model, case):
    """F16 matrices (as the converter stores the vision tower), F32 norms/biases/gates.

    Against the reference run with the same f16-rounded weights, only the f32
    activation arithmetic differs: same 1e-4 bound as F32 if the kernel keeps
    activations in f32, and a kernel that rounds activations to f16 (like
    ggml's f16 dot product) adds ~u = 2^-11 relative per product, which
    averages to well under 2e-3 over the tower. Against the f32 reference the
    weight rounding (|dw| <= u|w|, random signs) adds a similar ~u/sqrt(3)
    relative error per matmul, compounded over 7 layers + projector: 5e-3."""
    cfg = hf_model.config
    tensors = _gguf_tensors(case["sd"], cfg, f16_matrices=True)
    enc = _core.VisionEncoder(tensors, _hparams(cfg))
    out = enc.encode(case["px"], case["ids"], case["mask"])
    # Reference with the same f16-rounded matrices.
    m16 = MllamaForConditionalGeneration(cfg).eval()
    m16.load_state_dict(hf_model.state_dict())
    with torch.no_grad():
        for mod in list(m16.model.vision_model.modules()) + [m16.model.multi_modal_projector]:
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):  # not the embedding tables
                mod.weight.copy_(mod.weight.to(torch.float16).to(mod.weight.dtype))
    ref16 = _reference(m16, case["px"], case["ids"], case["mask"])
    e_same, e_f32 = _rel(out, ref16), _rel(out, case["ref"])
    print(f"f16 weights: rel err vs f16-weight reference {e_same:.2e}, vs f32 reference {e_f32:.2e}")
    assert e_same < 2e-3, e_same
    assert e_f32 < 5e-3, e_f32


def test_bad_input(hf_model, case):
    cfg = hf_model.config
    tensors = _gguf_tensors(case["sd"], cfg)
    missing = dict(tensors)
    del missing["v.global.blk.1.ffn_gate"]
    with pytest.raises(RuntimeError, match="v.global.blk.1.ffn_gate"):
        _core.VisionEncoder(missing, _hparams(cfg))
    wrong = dict(tensors)
    a = np.zeros((5, 48), np.float32)
    wrong["v.blk.0.attn_q.weight"] = (a, GGML_F32, a.shape)
    with pytest.raises(RuntimeError, match="v.blk.0.attn_q.weight"):
        _core.VisionEncoder(wrong, _hparams(cfg))
    with pytest.raises(ValueError, match="intermediate layer"):
        _core.VisionEncoder(tensors, _hparams(cfg, intermediate_layers=[0, 9, 3]))
    enc = _core.VisionEncoder(tensors, _hparams(cfg))
    with pytest.raises(ValueError, match="aspect_ratio_id"):
        enc.encode(case["px"], np.array([1, 99, 2], np.int32), case["mask"])
    with pytest.raises(ValueError, match="pixel_values"):
        enc.encode(case["px"][:, :, :, :50], case["ids"], case["mask"])
    with pytest.raises(ValueError, match="aspect_ratio_mask"):
        enc.encode(case["px"], case["ids"], case["mask"][:, :3])
