"""Vision tower + projector (csrc/model/vision.cpp) against transformers.

Reference: MllamaModel's `cross_attention_states` =
multi_modal_projector(vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)),
computed by transformers in float64 on a tiny random checkpoint whose gates and
zero-/one-initialised parameters are all randomised (transformers initialises the
gates to zero, which would make the tile/position paths vanish from the output).
"""

import gguf
import numpy as np
import pytest
import torch

from mllama_q import _core
from mllama_q import gguf_keys as K

GGML_F32 = 0

# Tiny vision tower (tests/tiny_models.py defaults otherwise): 56 px tiles of 14 px
# patches -> 16 patches + class token = 17 positions per tile, padded to 24 (as HF
# pads 1601 -> 1608), 4 tiles, 8 aspect ratios, 5 local layers (3 intermediate
# outputs: projector input 64 * 4) + 2 gated global layers, 4 heads of 16.
# initializer_range 0.15 instead of 0.02: weights ~ N(0, 0.15^2) keep activations
# O(1) and make attention peaky, so the padding mask visibly changes the output
# (test_mask_and_gates_matter checks that). Gates, norms and biases are
# randomised by the tiny_checkpoint fixture (tiny_models.make_tiny_checkpoint).
VISION = {"num_hidden_layers": 5, "intermediate_layers_indices": [1, 2, 4], "initializer_range": 0.15}


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tiny_gguf, hf_model):
    """The tiny checkpoint, its float64 HF reference model and GGUFs from our converter."""
    ckpt = tiny_checkpoint(seed=5, dtype="float32", vision_config=VISION)
    files = {ftype: tiny_gguf(ckpt, ftype) for ftype in ("f32", "f16", "q8_0")}
    return {
        "ckpt": ckpt,
        "model": hf_model(ckpt, dtype="float64"),
        "files": files,
        "hf": lambda fresh=False, **kw: hf_model(ckpt, fresh=fresh, **{"dtype": "float64", **kw}),
    }


def _field(r, key):
    return r.fields[key].contents()


def _load(path, **over):
    """(tensors dict for _core.VisionEncoder, hparams dict) from a GGUF via gguf.GGUFReader
    (memory-mapped tensor data handed over without copying)."""
    r = gguf.GGUFReader(path)
    tensors = {
        t.name: (t.data, int(t.tensor_type), tuple(int(x) for x in reversed(t.shape)))
        for t in r.tensors
        if t.name.startswith(("v.", "mm."))
    }
    hp = {
        "hidden_size": _field(r, K.V_EMBEDDING_LENGTH),
        "intermediate_size": _field(r, K.V_FEED_FORWARD_LENGTH),
        "num_layers": _field(r, K.V_BLOCK_COUNT),
        "num_global_layers": _field(r, K.V_GLOBAL_BLOCK_COUNT),
        "n_head": _field(r, K.V_HEAD_COUNT),
        "image_size": _field(r, K.V_IMAGE_SIZE),
        "patch_size": _field(r, K.V_PATCH_SIZE),
        "num_channels": _field(r, K.V_NUM_CHANNELS),
        "max_num_tiles": _field(r, K.V_MAX_NUM_TILES),
        "max_aspect_ratio_id": len(_field(r, K.Q_V_ASPECT_RATIOS)) // 2,
        "norm_eps": _field(r, K.V_LN_EPS),
        "intermediate_layers": list(_field(r, K.V_INTERMEDIATE_LAYERS)),
        "out_dim": _field(r, K.Q_V_PROJECTION_DIM),
    }
    hp.update(over)
    return tensors, hp


def _inputs(cfg, rng):
    """4 images: 3 real tiles + 1 empty (1x3), 1 real + 3 empty (1x1), 4 real (2x2),
    and a padding image (aspect ratio id 0, no real tile: what MllamaProcessor
    emits to pad num_concurrent_media across a batch; every pair of its positions
    is masked, so HF attends uniformly). Empty tiles are zeros, as
    MllamaImageProcessor pads them."""
    vc = cfg.vision_config
    ratios = [list(r) for r in vc.supported_aspect_ratios]
    n_tiles = [3, 1, 4, 0]
    ids = np.array([ratios.index([1, 3]) + 1, ratios.index([1, 1]) + 1, ratios.index([2, 2]) + 1, 0], np.int32)
    T, C, S = vc.max_num_tiles, vc.num_channels, vc.image_size
    px = np.zeros((len(n_tiles), T, C, S, S), np.float32)
    mask = np.zeros((len(n_tiles), T), np.int32)
    for i, n in enumerate(n_tiles):
        px[i, :n] = rng.standard_normal((n, C, S, S)).astype(np.float32)
        mask[i, :n] = 1
    return px, ids, mask


def _reference(model, px, ids, mask):
    """HF MllamaModel's cross_attention_states (vision_model + multi_modal_projector,
    as MllamaModel.forward computes them) for one batch of len(ids) images."""
    dt = model.dtype
    with torch.no_grad():
        vis = model.model.vision_model(
            pixel_values=torch.from_numpy(px)[None].to(dt),
            aspect_ratio_ids=torch.from_numpy(ids)[None].long(),
            aspect_ratio_mask=torch.from_numpy(mask)[None].long(),
        )
        states = model.model.multi_modal_projector(vis.last_hidden_state)
    return states[0].numpy()  # [n_img, T, P, out_dim]


@pytest.fixture(scope="module")
def case(tiny):
    px, ids, mask = _inputs(tiny["model"].config, np.random.default_rng(11))
    return {"px": px, "ids": ids, "mask": mask, "ref": _reference(tiny["model"], px, ids, mask)}


def _same_weights_model(tiny, path):
    """The float64 HF reference model with every vision / projector MATRIX replaced by
    the GGUF's stored values (dequantized with gguf-py, Q/K rows un-permuted): the
    weight rounding of F16 / Q8_0 is then in both, and only arithmetic differs."""
    from gguf.quants import dequantize

    model = tiny["hf"](fresh=True)  # modified below
    vm = model.model.vision_model
    heads = model.config.vision_config.attention_heads
    hf_name = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_up": "mlp.fc1",
        "ffn_down": "mlp.fc2",
    }
    r = gguf.GGUFReader(path)
    with torch.no_grad():
        for t in r.tensors:
            parts = t.name.split(".")
            w = dequantize(t.data, t.tensor_type).astype(np.float64)
            if t.name == "v.patch_embd.weight":
                mod = vm.patch_embedding
            elif t.name == "mm.0.weight":
                mod = model.model.multi_modal_projector
            elif t.name.startswith("v.blk.") and parts[3] in hf_name and parts[-1] == "weight":
                mod = vm.transformer.layers[int(parts[2])].get_submodule(hf_name[parts[3]])
            elif t.name.startswith("v.global.blk.") and parts[4] in hf_name and parts[-1] == "weight":
                mod = vm.global_transformer.layers[int(parts[3])].get_submodule(hf_name[parts[4]])
            else:
                continue
            if parts[-2] in ("attn_q", "attn_k"):
                w = K.unpermute_qk(w, heads)
            mod.weight.copy_(torch.from_numpy(w.reshape(mod.weight.shape)))
    return model


def test_f32_parity(tiny, case):
    tensors, hp = _load(tiny["files"]["f32"])
    assert all(t[1] == GGML_F32 for t in tensors.values())
    enc = _core.VisionEncoder(tensors, hp)
    assert enc.num_patches == 17
    out = enc.encode(case["px"], case["ids"], case["mask"])
    assert out.shape == case["ref"].shape == (4, 4, 17, hp["out_dim"])
    # float32 everywhere vs a float64 reference: a few float32 ulps per op.
    errs = [_rel(out[i], case["ref"][i]) for i in range(4)]
    print("f32 rel err per image:", ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 1e-4, errs
    assert np.abs(out - case["ref"]).max() < 1e-4 * np.abs(case["ref"]).max()


def test_hf_batch_layout(tiny, case):
    """HF's [batch, n_img, ...] arrays are accepted and flattened like HF does."""
    enc = _core.VisionEncoder(*_load(tiny["files"]["f32"]))
    out = enc.encode(case["px"][None], case["ids"][None], case["mask"][None])
    assert out.shape == case["ref"].shape and _rel(out, case["ref"]) < 1e-4


def test_tile_table_shapes(tiny, case):
    """Aspect-ratio tables stored with their natural axes ([A+1, T, P, D], [A+1, T, D])
    instead of our converter's flattened [A+1, T*P*D] read the same entries."""
    tensors, hp = _load(tiny["files"]["f32"])
    T, D = hp["max_num_tiles"], hp["hidden_size"]
    alt = dict(tensors)
    for name, shape in (
        ("v.tile_position_embd.weight", (-1, T, 17, D)),
        ("v.pre_tile_position_embd.weight", (-1, T, D)),
        ("v.post_tile_position_embd.weight", (-1, T, D)),
    ):
        a = tensors[name][0].reshape(shape)
        alt[name] = (a, GGML_F32, a.shape)
    out = _core.VisionEncoder(alt, hp).encode(case["px"], case["ids"], case["mask"])
    assert _rel(out, case["ref"]) < 1e-4
    a = tensors["v.pre_tile_position_embd.weight"][0][1:]  # one entry short
    alt["v.pre_tile_position_embd.weight"] = (a, GGML_F32, a.shape)
    with pytest.raises(RuntimeError, match="v.pre_tile_position_embd.weight"):
        _core.VisionEncoder(alt, hp)


def test_layer_input_convention(tiny, case):
    """By default entry i of intermediate_layers names the INPUT of local layer i
    (Meta's reference; the reference model in `tiny` is loaded that way, see
    tiny_models.load_hf_model). intermediate_at_layer_input=False names the layer's
    OUTPUT, as the installed transformers 5.x computes it: compare that with the
    unadjusted transformers model, and check the two conventions really differ."""
    tensors, hp = _load(tiny["files"]["f32"])
    installed = tiny["hf"](intermediate="installed")
    ref_installed = _reference(installed, case["px"], case["ids"], case["mask"])
    enc = _core.VisionEncoder(tensors, dict(hp, intermediate_at_layer_input=False))
    out = enc.encode(case["px"], case["ids"], case["mask"])
    if _rel(ref_installed, case["ref"]) > 1e-2:  # transformers 5.x: outputs
        assert _rel(out, ref_installed) < 1e-4
    else:  # a transformers that collects inputs
        enc = _core.VisionEncoder(
            tensors,
            dict(hp, intermediate_layers=[i + 1 for i in hp["intermediate_layers"]], intermediate_at_layer_input=True),
        )
        assert _rel(enc.encode(case["px"], case["ids"], case["mask"]), ref_installed) < 1e-4
    assert _rel(out, case["ref"]) > 1e-2


def test_mask_and_gates_matter(tiny, case):
    """Guards against a vacuous test: the padding mask and the aspect-ratio (tile)
    embeddings change the reference visibly."""
    ref, model = case["ref"], tiny["model"]
    px, ids, mask = case["px"], case["ids"], case["mask"]
    # Marking the empty tiles real changes HF's mask (padding queries see the other padding rows).
    alt = _reference(model, px, ids, np.ones_like(mask))
    assert _rel(alt[0], ref[0]) > 1e-2 and _rel(alt[1], ref[1]) > 1e-2
    # Another aspect-ratio id changes the tile embeddings of every tile.
    alt = _reference(model, px, np.roll(ids, 1), mask)
    for i in range(4):
        assert _rel(alt[i], ref[i]) > 1e-2


def test_f16_weights(tiny, case):
    """`--type f16`: F16 matrices and patch conv, F32 norms/biases/gates/embeddings.

    Against the reference with the same f16 weights only the arithmetic differs:
    1e-4 like F32 when the kernel keeps activations in f32; a kernel that rounds
    activations to f16 as ggml's f16 dot product does adds u = 2^-11 relative
    per input, i.e. about u/sqrt(3) = 2.8e-4 per matmul output, a few times that
    over 7 layers + projector: bound 2e-3. Against the f32 reference the weight
    rounding adds a similar ~u/sqrt(3) per matmul: bound 5e-3 (issue 4's F16 bound)."""
    tensors, hp = _load(tiny["files"]["f16"])
    assert tensors["v.blk.0.attn_q.weight"][1] == 1 and tensors["v.patch_embd.weight"][1] == 1  # F16
    out = _core.VisionEncoder(tensors, hp).encode(case["px"], case["ids"], case["mask"])
    ref16 = _reference(_same_weights_model(tiny, tiny["files"]["f16"]), case["px"], case["ids"], case["mask"])
    e_same, e_f32 = _rel(out, ref16), _rel(out, case["ref"])
    print(f"f16 weights: rel err vs same-weight reference {e_same:.2e}, vs f32 reference {e_f32:.2e}")
    assert e_same < 2e-3, e_same
    assert e_f32 < 5e-3, e_f32


def test_q8_0_weights(tiny, case):
    """`--type q8_0`: vision matrices and projector Q8_0 (the default vision type of the
    quantized --types), conv F16.

    Q8_0 rounds each weight to a step d = max|w|/127 of its 32-block: error
    uniform in +-d/2, RMS d/sqrt(12); for Gaussian blocks max|w| ~ 2.1 sigma, so
    ~0.5% of the weight RMS and about that relative error on every matmul
    output; independent errors of the 15 matmuls on the path (7 layers x 2 + the
    projector, attention projections partly averaged) add in quadrature to
    ~1.5-2%: bound 5e-2 against the f32 reference. Against the same-weight
    reference only the arithmetic differs: ~1e-7 with f32 activations, and a
    kernel that quantizes activations to 8 bits (ggml's q8_0 x q8_0 dot) adds
    an error of the same size as the weight part: bound 3e-2.
    """
    tensors, hp = _load(tiny["files"]["q8_0"])
    assert tensors["v.blk.0.attn_q.weight"][1] == 8 and tensors["mm.0.weight"][1] == 8  # Q8_0
    out = _core.VisionEncoder(tensors, hp).encode(case["px"], case["ids"], case["mask"])
    refq = _reference(_same_weights_model(tiny, tiny["files"]["q8_0"]), case["px"], case["ids"], case["mask"])
    e_same, e_f32 = _rel(out, refq), _rel(out, case["ref"])
    print(f"q8_0 weights: rel err vs same-weight reference {e_same:.2e}, vs f32 reference {e_f32:.2e}")
    assert e_same < 3e-2, e_same
    assert e_f32 < 5e-2, e_f32


def test_chunked_sizes(tiny_checkpoint, tiny_gguf, hf_model):
    """Sizes where every row chunking of vision.cpp runs more than once (the tiny
    model fits in one chunk): 238 px tiles -> 17 x 17 patches, P = 290, Np = 296,
    S = 4 x 296 = 1184 positions (MLP chunks of 1024 rows), projector chunks of
    256 of the 290 rows, and an image with 3 empty tiles has 6 + 3 x 296 = 894
    padding query rows (masked attention chunks of 512)."""
    vc = {
        "image_size": 238,
        "hidden_size": 32,
        "intermediate_size": 64,
        "attention_heads": 2,
        "num_hidden_layers": 3,
        "num_global_layers": 1,
        "intermediate_layers_indices": [1, 2],
        "initializer_range": 0.15,
    }
    ckpt = tiny_checkpoint(
        seed=9,
        dtype="float32",
        vision_config=vc,
        text_config={"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "cross_attention_layers": [1]},
    )
    path = tiny_gguf(ckpt, "f32")
    model = hf_model(ckpt, dtype="float64")
    rng = np.random.default_rng(3)
    px = np.zeros((2, 4, 3, 238, 238), np.float32)
    px[0, :1] = rng.standard_normal((1, 3, 238, 238))
    px[1, :2] = rng.standard_normal((2, 3, 238, 238))
    ids = np.array([1, 2], np.int32)  # (1, 1) and (1, 2)
    mask = np.array([[1, 0, 0, 0], [1, 1, 0, 0]], np.int32)
    ref = _reference(model, px, ids, mask)
    enc = _core.VisionEncoder(*_load(path))
    assert enc.num_patches == 290
    out = enc.encode(px, ids, mask)
    assert _rel(out, ref) < 1e-4, _rel(out, ref)


def test_bad_input(tiny, case):
    tensors, hp = _load(tiny["files"]["f32"])
    missing = dict(tensors)
    del missing["v.global.blk.1.ffn_gate"]
    with pytest.raises(RuntimeError, match="v.global.blk.1.ffn_gate"):
        _core.VisionEncoder(missing, hp)
    wrong = dict(tensors)
    a = np.zeros((5, hp["hidden_size"]), np.float32)
    wrong["v.blk.0.attn_q.weight"] = (a, GGML_F32, a.shape)
    with pytest.raises(RuntimeError, match="v.blk.0.attn_q.weight"):
        _core.VisionEncoder(wrong, hp)
    with pytest.raises(ValueError, match="intermediate layer"):
        _core.VisionEncoder(tensors, dict(hp, intermediate_layers=[0, 9, 3]))
    with pytest.raises(ValueError, match="missing key 'out_dim'"):
        _core.VisionEncoder(tensors, {k: v for k, v in hp.items() if k != "out_dim"})
    enc = _core.VisionEncoder(tensors, hp)
    with pytest.raises(ValueError, match="aspect_ratio_id"):
        enc.encode(case["px"], np.array([1, 99, 2, 0], np.int32), case["mask"])
    with pytest.raises(ValueError, match="aspect_ratio_mask values"):
        enc.encode(case["px"], case["ids"], np.full_like(case["mask"], 2))
    with pytest.raises(ValueError, match="pixel_values"):
        enc.encode(case["px"][:, :, :, :50], case["ids"], case["mask"])
    with pytest.raises(ValueError, match="pixel_values"):
        enc.encode(case["px"].astype(np.float64), case["ids"], case["mask"])
    with pytest.raises(ValueError, match="aspect_ratio_mask"):
        enc.encode(case["px"], case["ids"], case["mask"][:, :3])
