"""Converter tests: tiny random checkpoints saved by transformers -> every --type -> read back
with gguf-py's GGUFReader and compared with the checkpoint (torch / transformers / gguf-py as
references; the expected names, shapes, types and transforms are re-derived here from the
layout rules, not taken from the converter).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize  # noqa: E402
from gguf_reference import assert_matches_gguf_py  # noqa: E402

from mllama_q import gguf_keys as K  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Three tiny configurations covering GQA ratios, cross-attention placements, tile sizes,
# custom aspect ratios, sharding, checkpoint dtypes, both rope spellings and the three
# chat-template locations.
CONFIGS = {
    # GQA 2:1, cross layers inside, 56-px tiles (4x4 patches), 4 tiles / 8 default ratios,
    # bf16 single file, transformers-5 rope_parameters, template in tokenizer_config.json and
    # chat_template.json (as published).
    "default": dict(seed=0),
    # GQA 4:1, cross-attention first and last layer, 28-px tiles, 2 tiles with custom
    # ratios, f16 checkpoint in shards + index, published rope_theta/rope_scaling spelling.
    "gqa4_sharded": dict(
        seed=1,
        dtype="float16",
        max_shard_size="400KB",
        rope_spelling="rope_theta",
        chat_template_location="chat_template.jinja",
        text_config=dict(num_attention_heads=8, num_key_value_heads=2, cross_attention_layers=[0, 4]),
        vision_config=dict(
            image_size=28,
            max_num_tiles=2,
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
            num_global_layers=1,
            intermediate_layers_indices=[0, 2],
        ),
    ),
    # MHA, rows of 128 / 200 (Q8_0 and F16 fallbacks), plain RoPE, 42-px tiles, 3 tiles,
    # a 256-wide vision tower (real Q4_K blocks with --vision-type q4_k), f32 checkpoint.
    "mha_f32": dict(
        seed=2,
        dtype="float32",
        chat_template_location="tokenizer_config",
        text_config=dict(
            hidden_size=128,
            intermediate_size=200,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            cross_attention_layers=[2],
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        vision_config=dict(
            hidden_size=256,
            intermediate_size=512,
            attention_heads=4,
            image_size=42,
            max_num_tiles=3,
            num_hidden_layers=3,
            num_global_layers=1,
            intermediate_layers_indices=[0, 2],
            supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [2, 1], [3, 1]],
        ),
    ),
}
TYPES = ["f32", "f16", "bf16", "q8_0", "q6_k", "q4_k_m", "q4_k_s"]


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint):
    return {name: tiny_checkpoint(**kw) for name, kw in CONFIGS.items()}


@pytest.fixture(scope="module")
def hf_states(ckpts):
    from safetensors.torch import load_file

    out = {}
    for name, d in ckpts.items():
        st = {}
        for f in sorted(d.glob("*.safetensors")):
            st.update(load_file(str(f)))
        out[name] = {k: v.to(torch.float32) for k, v in st.items()}
    return out


def run_convert(ckpt, out, ftype, vision_type=None, extra=()):
    from mllama_q.convert.cli import main

    argv = [str(ckpt), "-o", str(out), "--type", ftype, "-q", *extra]
    if vision_type:
        argv += ["--vision-type", vision_type]
    return main(argv)


# ---------------------------------------------------------------------------------------------
# Expected layout, re-derived from the rules in mllama-gguf-layout.md (+ our q/k norm permutation)
# ---------------------------------------------------------------------------------------------
def permute_rows_reference(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp order by explicit indices: new row h*hd + 2i + j = old row h*hd + j*hd/2 + i."""
    hd = w.shape[0] // n_head
    src = np.empty(w.shape[0], dtype=np.int64)
    for h in range(n_head):
        for i in range(hd // 2):
            for j in range(2):
                src[h * hd + 2 * i + j] = h * hd + j * (hd // 2) + i
    return w[src]


TEXT_MAP = [  # (HF regex, GGUF name template, transform)
    (r"language_model\.model\.embed_tokens\.weight", "token_embd.weight", None),
    (r"language_model\.model\.norm\.weight", "output_norm.weight", None),
    (r"language_model\.lm_head\.weight", "output.weight", None),
    (r"language_model\.model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{}.attn_norm.weight", None),
    (r"language_model\.model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.ffn_norm.weight", None),
    (r"language_model\.model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{}.ffn_gate.weight", None),
    (r"language_model\.model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{}.ffn_up.weight", None),
    (r"language_model\.model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{}.ffn_down.weight", None),
    (r"language_model\.model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "blk.{}.attn_q.weight", "perm_q"),
    (r"language_model\.model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "blk.{}.attn_k.weight", "perm_kv"),
    (r"language_model\.model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "blk.{}.attn_v.weight", None),
    (r"language_model\.model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "blk.{}.attn_output.weight", None),
    (r"language_model\.model\.layers\.(\d+)\.cross_attn\.q_proj\.weight", "blk.{}.cross_attn_q_proj.weight", "perm_q"),
    (r"language_model\.model\.layers\.(\d+)\.cross_attn\.k_proj\.weight", "blk.{}.cross_attn_k_proj.weight", "perm_kv"),
    (r"language_model\.model\.layers\.(\d+)\.cross_attn\.v_proj\.weight", "blk.{}.cross_attn_v_proj.weight", None),
    (r"language_model\.model\.layers\.(\d+)\.cross_attn\.o_proj\.weight", "blk.{}.cross_attn_o_proj.weight", None),
    (
        r"language_model\.model\.layers\.(\d+)\.cross_attn\.q_norm\.weight",
        "blk.{}.cross_attn_q_norm.weight",
        "perm_vec",
    ),
    (
        r"language_model\.model\.layers\.(\d+)\.cross_attn\.k_norm\.weight",
        "blk.{}.cross_attn_k_norm.weight",
        "perm_vec",
    ),
    (r"language_model\.model\.layers\.(\d+)\.cross_attn_attn_gate", "blk.{}.cross_attn_attn_gate", None),
    (r"language_model\.model\.layers\.(\d+)\.cross_attn_mlp_gate", "blk.{}.cross_attn_mlp_gate", None),
    (r"multi_modal_projector\.weight", "mm.0.weight", None),
    (r"multi_modal_projector\.bias", "mm.0.bias", None),
    (r"vision_model\.patch_embedding\.weight", "v.patch_embd.weight", None),
    (r"vision_model\.class_embedding", "v.class_embd", None),
    (r"vision_model\.gated_positional_embedding\.embedding", "v.position_embd.weight", None),
    (r"vision_model\.gated_positional_embedding\.tile_embedding\.weight", "v.tile_position_embd.weight", None),
    (r"vision_model\.pre_tile_positional_embedding\.embedding\.weight", "v.pre_tile_position_embd.weight", None),
    (r"vision_model\.post_tile_positional_embedding\.embedding\.weight", "v.post_tile_position_embd.weight", None),
    (r"vision_model\.pre_tile_positional_embedding\.gate", "v.pre_tile_position_embd.gate", "tanh"),
    (r"vision_model\.post_tile_positional_embedding\.gate", "v.post_tile_position_embd.gate", "tanh"),
    (r"vision_model\.layernorm_pre\.(weight|bias)", "v.pre_ln.{}", None),
    (r"vision_model\.layernorm_post\.(weight|bias)", "v.post_ln.{}", None),
]
VISION_LAYER_MAP = [  # suffix regex -> GGUF suffix, transform
    (r"input_layernorm\.(weight|bias)", "attn_norm.{}", None),
    (r"post_attention_layernorm\.(weight|bias)", "ffn_norm.{}", None),
    (r"self_attn\.q_proj\.weight", "attn_q.weight", "perm_v"),
    (r"self_attn\.k_proj\.weight", "attn_k.weight", "perm_v"),
    (r"self_attn\.v_proj\.weight", "attn_v.weight", None),
    (r"self_attn\.o_proj\.weight", "attn_output.weight", None),
    (r"mlp\.fc1\.(weight|bias)", "ffn_up.{}", None),
    (r"mlp\.fc2\.(weight|bias)", "ffn_down.{}", None),
    (r"gate_attn", "attn_gate", "tanh"),
    (r"gate_ffn", "ffn_gate", "tanh"),
]


def expected_tensors(state: dict, cfg: dict) -> dict:
    """{gguf name: float32 numpy array the file must hold (before its storage type)}."""
    tc, vc = cfg["text_config"], cfg["vision_config"]
    n_head, n_kv, vh = tc["num_attention_heads"], tc["num_key_value_heads"], vc["attention_heads"]
    out = {}

    def put(name, x, how):
        x = x.numpy()
        if how == "perm_q":
            x = permute_rows_reference(x, n_head)
        elif how == "perm_kv":
            x = permute_rows_reference(x, n_kv)
        elif how == "perm_v":
            x = permute_rows_reference(x, vh)
        elif how == "perm_vec":
            x = permute_rows_reference(x, 1)
        elif how == "tanh":
            x = torch.tanh(torch.from_numpy(x).double()).float().numpy()
        out[name] = x

    for key, x in state.items():
        done = False
        for pat, name, how in TEXT_MAP:
            m = re.fullmatch(pat, key)
            if m:
                put(name.format(*m.groups()), x, how)
                done = True
                break
        m = re.fullmatch(r"vision_model\.(transformer|global_transformer)\.layers\.(\d+)\.(.+)", key)
        if not done and m:
            prefix = ("v.global.blk." if m.group(1) == "global_transformer" else "v.blk.") + m.group(2) + "."
            for pat, name, how in VISION_LAYER_MAP:
                mm = re.fullmatch(pat, m.group(3))
                if mm:
                    put(prefix + name.format(*mm.groups()), x, how)
                    done = True
                    break
        if not done and key == "vision_model.gated_positional_embedding.gate":
            g = torch.tanh(x.double())
            out["v.position_embd.gate"] = (1 - g).float().numpy()
            out["v.tile_position_embd.gate"] = g.float().numpy()
            done = True
        assert done, f"test mapping misses {key}"
    return out


def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def expected_type(name: str, shape, ftype: str, vision_type, cfg) -> T:
    """The mix rules of the issue / llama.cpp, written out independently."""
    tc = cfg["text_config"]
    row = shape[-1]
    is_f32 = (
        len(shape) == 1
        or name.endswith((".bias", "_gate", ".gate", "position_embd.weight"))
        or "norm" in name
        or name in ("v.class_embd", "rope_freqs.weight")
        or name.endswith("tile_position_embd.weight")
    )
    if is_f32:
        return T.F32
    if name == "v.patch_embd.weight":
        return {"f32": T.F32, "bf16": T.BF16}.get(ftype, T.F16)
    if name.startswith(("v.", "mm.")):
        if vision_type is None:
            vision_type = {"f32": "f32", "f16": "f16", "bf16": "bf16"}.get(ftype, "q8_0")
        t = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_k": T.Q4_K}[vision_type]
    else:
        t = {
            "f32": T.F32,
            "f16": T.F16,
            "bf16": T.BF16,
            "q8_0": T.Q8_0,
            "q6_k": T.Q6_K,
            "q4_k_m": T.Q4_K,
            "q4_k_s": T.Q4_K,
        }[ftype]
        if ftype == "q4_k_m":
            n_layer = tc["num_hidden_layers"]
            self_layers = [i for i in range(n_layer) if i not in tc["cross_attention_layers"]]
            m = re.fullmatch(r"blk\.(\d+)\.(attn_v|ffn_down)\.weight", name)
            if name == "output.weight":
                t = T.Q6_K
            elif m and m.group(2) == "attn_v" and use_more_bits(self_layers.index(int(m.group(1))), len(self_layers)):
                t = T.Q6_K
            elif m and m.group(2) == "ffn_down" and use_more_bits(int(m.group(1)), n_layer):
                t = T.Q6_K
    if t in (T.Q4_K, T.Q6_K) and row % 256:
        t = T.Q8_0
    if t == T.Q8_0 and row % 32:
        t = T.F16
    return t


def check_values(name, t: T, stored: np.ndarray, ref: np.ndarray):
    """Stored data of type t equals (float types) or approximates within the type's bound
    (block types, dequantized by gguf-py) the expected float32 values `ref`."""
    if t == T.F32:
        if name.endswith("gate"):
            np.testing.assert_allclose(stored.reshape(ref.shape), ref, rtol=1e-6, atol=1e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(stored.reshape(ref.shape), ref, err_msg=name)
    elif t == T.F16:
        expect = torch.from_numpy(ref).to(torch.float16).numpy()
        np.testing.assert_array_equal(stored.view(np.float16).reshape(ref.shape), expect, err_msg=name)
    elif t == T.BF16:
        expect = torch.from_numpy(ref).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(stored.view(np.uint16).reshape(ref.shape), expect, err_msg=name)
    else:
        y = dequantize(stored, t).reshape(ref.shape).astype(np.float64)
        x = ref.astype(np.float64)
        block = {T.Q8_0: 32, T.Q6_K: 256, T.Q4_K: 256}[t]
        # Max error per block relative to the block's max |x|: Q8_0 rounds to amax/127 steps
        # with an f16 scale (<= amax * (0.5/127 + 2^-11)); the K-quants' bounds leave ~2x
        # margin over what ggml's reference quantizers reach on Gaussian data.
        rel_max = {T.Q8_0: 0.5 / 127 + 2.0**-11 + 1e-6, T.Q6_K: 0.05, T.Q4_K: 0.2}[t]
        err = np.abs(y - x).reshape(-1, block).max(axis=1)
        amax = np.abs(x).reshape(-1, block).max(axis=1)
        worst = np.max(err / np.maximum(amax, 1e-30))
        assert np.all(err <= rel_max * amax + 1e-12), f"{name} {t.name}: max error {worst:.4f} x block amax"
        rms = np.sqrt(np.sum((y - x) ** 2) / max(np.sum(x**2), 1e-30))
        assert rms <= {T.Q8_0: 0.015, T.Q6_K: 0.04, T.Q4_K: 0.12}[t], f"{name} {t.name}: relative RMS error {rms:.4f}"


def expected_metadata(ckpt: Path) -> dict:
    cfg = json.loads((ckpt / "config.json").read_text())
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    gen = json.loads((ckpt / "generation_config.json").read_text())
    tc, vc = cfg["text_config"], cfg["vision_config"]
    rp = tc.get("rope_parameters") or dict(tc.get("rope_scaling") or {}, rope_theta=tc["rope_theta"])
    exp = {
        "general.architecture": "mllama",
        "mllama.vocab_size": tc["vocab_size"],
        "mllama.block_count": tc["num_hidden_layers"],
        "mllama.context_length": tc["max_position_embeddings"],
        "mllama.embedding_length": tc["hidden_size"],
        "mllama.feed_forward_length": tc["intermediate_size"],
        "mllama.attention.head_count": tc["num_attention_heads"],
        "mllama.attention.head_count_kv": tc["num_key_value_heads"],
        "mllama.rope.dimension_count": tc["hidden_size"] // tc["num_attention_heads"],
        "mllama.rope.freq_base": rp["rope_theta"],
        "mllama.attention.layer_norm_rms_epsilon": tc["rms_norm_eps"],
        "mllama.attention.cross_attention_layers": tc["cross_attention_layers"],
        "mllama.vision.block_count": vc["num_hidden_layers"],
        "mllama.vision.global.block_count": vc["num_global_layers"],
        "mllama.vision.intermediate_layers_indices": vc["intermediate_layers_indices"],
        "mllama.vision.embedding_length": vc["hidden_size"],
        "mllama.vision.feed_forward_length": vc["intermediate_size"],
        "mllama.vision.attention.head_count": vc["attention_heads"],
        "mllama.vision.attention.layer_norm_epsilon": vc["norm_eps"],
        "mllama.vision.image_size": vc["image_size"],
        "mllama.vision.patch_size": vc["patch_size"],
        "mllama.vision.max_num_tiles": vc["max_num_tiles"],
        "mllama.vision.num_channels": vc["num_channels"],
        "mllama_q.format_version": 1,
        "mllama_q.image_token_id": cfg["image_token_index"],
        "mllama_q.stop_token_ids": gen["eos_token_id"],
        "mllama_q.vision.supported_aspect_ratios": [x for p in vc["supported_aspect_ratios"] for x in p],
        "mllama_q.vision.output_dim": vc["vision_output_dim"],
        "mllama_q.vision.projection_dim": tc["hidden_size"],
        "mllama_q.image.tile_size": pre["size"]["height"],
        "mllama_q.image.max_image_tiles": pre["max_image_tiles"],
        "mllama_q.image.mean": pre["image_mean"],
        "mllama_q.image.std": pre["image_std"],
        "mllama_q.image.rescale_factor": pre["rescale_factor"],
        "mllama_q.image.resample": pre["resample"],
        "mllama_q.image.do_convert_rgb": True,
        "mllama_q.image.do_resize": True,
        "mllama_q.image.do_rescale": True,
        "mllama_q.image.do_normalize": True,
        "mllama_q.image.do_pad": True,
        "general.sampling.temp": gen["temperature"],
        "general.sampling.top_p": gen["top_p"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
    }
    if rp.get("rope_type", "default") == "llama3":
        exp.update(
            {
                "mllama_q.rope.scaling.type": "llama3",
                "mllama_q.rope.scaling.factor": rp["factor"],
                "mllama_q.rope.scaling.low_freq_factor": rp["low_freq_factor"],
                "mllama_q.rope.scaling.high_freq_factor": rp["high_freq_factor"],
                "mllama_q.rope.scaling.original_context_length": rp["original_max_position_embeddings"],
            }
        )
    else:
        exp["mllama_q.rope.scaling.type"] = "none"
    return exp


def read_fields(r) -> dict:
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        out[k] = f.contents()
    return out


def check_file(path: Path, ckpt: Path, state: dict, ftype: str, vision_type=None):
    cfg = json.loads((ckpt / "config.json").read_text())
    r = gguf.GGUFReader(path)
    assert r.fields["GGUF.version"].contents() == 3
    fields = read_fields(r)
    for k, v in expected_metadata(ckpt).items():
        assert k in fields, k
        if isinstance(v, float) or (isinstance(v, list) and v and isinstance(v[0], float)):
            np.testing.assert_allclose(fields[k], v, rtol=1e-6, err_msg=k)
        else:
            assert fields[k] == v, (k, fields[k], v)
    ft = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q6_k": 18, "q4_k_m": 15, "q4_k_s": 14}[ftype]
    assert fields["general.file_type"] == ft
    tmpl_sources = [ckpt / "chat_template.jinja", ckpt / "chat_template.json", ckpt / "tokenizer_config.json"]
    assert "<|start_header_id|>" in fields["tokenizer.chat_template"], tmpl_sources

    expect = expected_tensors(state, cfg)
    tc = cfg["text_config"]
    rp = tc.get("rope_parameters") or dict(tc.get("rope_scaling") or {}, rope_theta=tc["rope_theta"])
    tensors = {t.name: t for t in r.tensors}
    want_names = set(expect) | ({"rope_freqs.weight"} if rp.get("rope_type") == "llama3" else set())
    assert set(tensors) == want_names
    for name, ref in expect.items():
        t = tensors[name]
        assert tuple(int(s) for s in t.shape[::-1]) == ref.shape, name  # GGUF lists ne (reversed)
        want_t = expected_type(name, ref.shape, ftype, vision_type, cfg)
        assert t.tensor_type == want_t, (name, t.tensor_type.name, want_t.name)
        check_values(name, want_t, np.asarray(t.data), ref)
    assert_matches_gguf_py(path)  # the runtime's reader sees exactly what gguf-py sees
    return r


@pytest.mark.parametrize("ftype", TYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_convert_every_type(ckpts, hf_states, tmp_path, config, ftype):
    out = tmp_path / f"{config}-{ftype}.gguf"
    assert run_convert(ckpts[config], out, ftype) == 0
    check_file(out, ckpts[config], hf_states[config], ftype)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp file left


@pytest.mark.parametrize(
    "config,ftype,vision_type",
    [("mha_f32", "q4_k_m", "q4_k"), ("default", "q8_0", "f16"), ("gqa4_sharded", "f16", "q8_0")],
)
def test_vision_type(ckpts, hf_states, tmp_path, config, ftype, vision_type):
    out = tmp_path / "v.gguf"
    assert run_convert(ckpts[config], out, ftype, vision_type) == 0
    r = check_file(out, ckpts[config], hf_states[config], ftype, vision_type)
    if config == "mha_f32":  # the 256-wide tower really uses Q4_K blocks
        assert {t.tensor_type for t in r.tensors if t.name.startswith("v.blk.")} >= {T.Q4_K}


def test_sharded_and_in_memory_names(ckpts, tmp_path):
    """The sharded fixture really is sharded, and a checkpoint using transformers-5 in-memory
    names (model.language_model.*, lm_head.weight, model.vision_model.*) converts to the same file."""
    from safetensors.torch import load_file, save_file

    assert len(list(ckpts["gqa4_sharded"].glob("model-*-of-*.safetensors"))) > 1
    assert (ckpts["gqa4_sharded"] / "model.safetensors.index.json").is_file()
    ck = _copy(ckpts["default"], tmp_path / "ck")
    st = load_file(str(ck / "model.safetensors"))
    renamed = {}
    for k, v in st.items():
        k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
        if k.startswith(("vision_model.", "multi_modal_projector.")):
            k = "model." + k
        renamed[k] = v
    assert set(renamed) != set(st)
    save_file(renamed, str(ck / "model.safetensors"), metadata={"format": "pt"})
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert run_convert(ckpts["default"], a, "q4_k_s") == 0
    assert run_convert(ck, b, "q4_k_s") == 0
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    for ta, tb in zip(ra.tensors, rb.tensors, strict=True):
        np.testing.assert_array_equal(np.asarray(ta.data), np.asarray(tb.data), err_msg=ta.name)


def test_spec_type_tables_match_gguf_py():
    """gguf_keys declares ggml's type ids, block sizes and llama.cpp's file types itself (so the
    runtime never imports gguf-py); they must equal gguf-py's tables."""
    from gguf.constants import GGML_QUANT_SIZES, LlamaFileType

    for t in K.GGMLType:
        assert T[t.name] == int(t), t
        assert GGML_QUANT_SIZES[T[t.name]] == K.BLOCK_SIZES[t], t
    assert set(K.BLOCK_SIZES) == set(K.GGMLType)
    expected_ftype = {
        "f32": LlamaFileType.ALL_F32,
        "f16": LlamaFileType.MOSTLY_F16,
        "bf16": LlamaFileType.MOSTLY_BF16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
        "q6_k": LlamaFileType.MOSTLY_Q6_K,
        "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
        "q4_k_s": LlamaFileType.MOSTLY_Q4_K_S,
    }
    assert K.FILE_TYPE == {k: int(v) for k, v in expected_ftype.items()}


def test_gguf_keys_helpers(ckpts, tmp_path):
    from mllama_q import gguf_keys as K

    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    np.testing.assert_array_equal(K.permute_qk(w, 6), permute_rows_reference(w, 6))
    np.testing.assert_array_equal(K.unpermute_qk(K.permute_qk(w, 6), 6), w)
    v = np.arange(16, dtype=np.float32)
    np.testing.assert_array_equal(K.unpermute_head_vector(K.permute_head_vector(v)), v)
    out = tmp_path / "k.gguf"
    assert run_convert(ckpts["mha_f32"], out, "f16") == 0
    from mllama_q.gguf_file import ModelFileError, kv, open_gguf

    r = open_gguf(out)
    assert kv(r, K.BLOCK_COUNT) == 3 and kv(r, K.Q_ROPE_SCALING_TYPE) == "none"
    assert kv(r, "mllama_q.not.a.key", 7) == 7
    bare = tmp_path / "bare.gguf"  # an Ollama-like file without the mllama_q.* keys: 11B values
    w = gguf.GGUFWriter(str(bare), K.ARCH)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert kv(open_gguf(bare), K.Q_IMAGE_TOKEN_ID) == 128256
    with pytest.raises(ModelFileError, match="mllama_q.not.a.key"):
        kv(r, "mllama_q.not.a.key")
    # Keys Ollama's files lack fall back to the published 11B values.
    assert K.DEFAULTS_11B[K.Q_STOP_TOKEN_IDS] == [128001, 128008, 128009]


def test_rope_freqs_match_transformers_llama3(ckpts, tmp_path):
    """inv_freq / rope_freqs.weight == transformers' llama3-scaled inv_freq."""
    from transformers import MllamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    out = tmp_path / "r.gguf"
    assert run_convert(ckpts["default"], out, "f32") == 0
    r = gguf.GGUFReader(out)
    freqs = np.asarray(next(t for t in r.tensors if t.name == "rope_freqs.weight").data, dtype=np.float64)
    tc = MllamaConfig.from_pretrained(ckpts["default"]).text_config
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](tc, "cpu")
    hd = tc.hidden_size // tc.num_attention_heads
    base = 1.0 / (tc.rope_parameters["rope_theta"] ** (np.arange(0, hd, 2) / hd))
    assert np.any(freqs != 1.0) and np.any(freqs == 1.0)  # both regimes present
    np.testing.assert_allclose(base / freqs, hf_inv.double().numpy(), rtol=2e-6)


def _rope_interleaved(x, pos, inv_freq):
    """ggml's normal-mode RoPE: pairs (2i, 2i+1) rotate by pos * inv_freq[i]. x: [heads, hd]."""
    ang = pos * inv_freq
    c, s = np.cos(ang), np.sin(ang)
    x0, x1 = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2] = x0 * c - x1 * s
    out[:, 1::2] = x0 * s + x1 * c
    return out


def test_attention_scores_equal_hf(ckpts, tmp_path):
    """Semantic check of the layout, through transformers' own modules: self-attention scores
    with HF's rotate-half RoPE equal scores computed from the GGUF tensors with interleaved
    RoPE and rope_freqs; cross-attention scores with HF's q_norm/k_norm equal those from
    the GGUF q/k projections and (permuted) norms."""
    from transformers import MllamaForConditionalGeneration
    from transformers.models.mllama.modeling_mllama import apply_rotary_pos_emb

    ck = ckpts["default"]
    out = tmp_path / "a.gguf"
    assert run_convert(ck, out, "f32") == 0
    r = gguf.GGUFReader(out)
    ten = {t.name: np.asarray(t.data, dtype=np.float64) for t in r.tensors}
    model = MllamaForConditionalGeneration.from_pretrained(ck, dtype=torch.float64).eval()
    lm = model.model.language_model
    tc = model.config.text_config
    H, Hkv = tc.num_attention_heads, tc.num_key_value_heads
    hd = tc.hidden_size // H
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, tc.hidden_size, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 1, 5, 77, 300, 1000])
    inv_freq = 1.0 / (tc.rope_parameters["rope_theta"] ** (np.arange(0, hd, 2) / hd)) / ten["rope_freqs.weight"]

    bid = next(i for i in range(tc.num_hidden_layers) if i not in tc.cross_attention_layers)
    attn = lm.layers[bid].self_attn
    with torch.no_grad():
        q = attn.q_proj(x).view(6, H, hd).transpose(0, 1)[None]
        k = attn.k_proj(x).view(6, Hkv, hd).transpose(0, 1)[None]
        cos, sin = lm.rotary_emb(x[None], pos[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(H // Hkv, dim=1)
        hf_scores = (q @ k.transpose(-1, -2))[0].numpy()
    xn = x.numpy()
    qg = (xn @ ten[f"blk.{bid}.attn_q.weight"].T).reshape(6, H, hd)
    kg = (xn @ ten[f"blk.{bid}.attn_k.weight"].T).reshape(6, Hkv, hd)
    qg = np.stack([_rope_interleaved(qg[t], float(pos[t]), inv_freq) for t in range(6)])
    kg = np.stack([_rope_interleaved(kg[t], float(pos[t]), inv_freq) for t in range(6)])
    gg_scores = np.einsum("thd,shd->hts", qg, np.repeat(kg, H // Hkv, axis=1))
    # HF builds cos/sin in float32: agreement to ~1e-6 relative; a wrong permutation, head
    # mapping or rope_freqs gives O(1) differences.
    np.testing.assert_allclose(gg_scores, hf_scores, rtol=1e-4, atol=1e-5 * np.abs(hf_scores).max())

    cid = tc.cross_attention_layers[0]
    xa = model.model.language_model.layers[cid].cross_attn
    img = torch.randn(9, tc.hidden_size, generator=g, dtype=torch.float64)
    with torch.no_grad():
        q = xa.q_norm(xa.q_proj(x).view(6, H, hd))
        k = xa.k_norm(xa.k_proj(img).view(9, Hkv, hd)).repeat_interleave(H // Hkv, dim=1)
        hf_x = torch.einsum("thd,shd->hts", q, k).numpy()
    eps = tc.rms_norm_eps

    def rms(v, w):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w

    qg = rms(
        (xn @ ten[f"blk.{cid}.cross_attn_q_proj.weight"].T).reshape(6, H, hd),
        ten[f"blk.{cid}.cross_attn_q_norm.weight"],
    )
    kg = rms(
        (img.numpy() @ ten[f"blk.{cid}.cross_attn_k_proj.weight"].T).reshape(9, Hkv, hd),
        ten[f"blk.{cid}.cross_attn_k_norm.weight"],
    )
    gg_x = np.einsum("thd,shd->hts", qg, np.repeat(kg, H // Hkv, axis=1))
    np.testing.assert_allclose(gg_x, hf_x, rtol=1e-5, atol=1e-6 * np.abs(hf_x).max())  # HF RMSNorm runs in float32
    # The gates are stored raw for text and as tanh for vision (Ollama's convention).
    assert ten[f"blk.{cid}.cross_attn_attn_gate"][0] == pytest.approx(
        model.model.language_model.layers[cid].cross_attn_attn_gate.item()
    )


def test_chunked_streaming_gives_identical_file(ckpts, tmp_path, monkeypatch):
    """Tiny chunks (a few rows, whole heads for Q/K) produce the same bytes as whole tensors."""
    from mllama_q.convert import converter

    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert run_convert(ckpts["gqa4_sharded"], a, "q4_k_m") == 0
    monkeypatch.setattr(converter, "CHUNK_BYTES", 3000)
    assert run_convert(ckpts["gqa4_sharded"], b, "q4_k_m") == 0
    assert a.read_bytes() == b.read_bytes()


def test_cli_entry_points(ckpts, tmp_path, child_env):
    """`python -m mllama_q.convert` and `mllama-q convert` (mllama_q.cli) both work."""
    out = tmp_path / "m.gguf"
    res = subprocess.run(
        [sys.executable, "-m", "mllama_q.convert", str(ckpts["mha_f32"]), "-o", str(out), "--type", "q8_0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=child_env(),
    )
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stderr and out.is_file()
    from mllama_q.cli import main as mq_main

    out2 = tmp_path / "m2.gguf"
    assert mq_main(["convert", str(ckpts["mha_f32"]), "-o", str(out2), "--type", "q8_0", "-q"]) == 0
    assert out.read_bytes() == out2.read_bytes()


# ---------------------------------------------------------------------------------------------
# Bad input: one-line error naming the file or tensor, exit 1, nothing left behind
# ---------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _resave(ck: Path, fn):
    """Rewrite model.safetensors after fn(state dict of torch tensors)."""
    from safetensors.torch import load_file, save_file

    f = ck / "model.safetensors"
    st = load_file(str(f))
    fn(st)
    save_file(st, str(f), metadata={"format": "pt"})


def _corrupt_header(ck: Path):
    f = ck / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 : 8 + 20] = b"{ this is not json  "
    assert n > 20
    f.write_bytes(bytes(data))


def _truncate(ck: Path):
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])


BAD_CASES = {
    "missing config": (lambda ck: (ck / "config.json").unlink(), "config.json"),
    "missing tokenizer": (lambda ck: (ck / "tokenizer.json").unlink(), "tokenizer.json"),
    "missing preprocessor": (lambda ck: (ck / "preprocessor_config.json").unlink(), "preprocessor_config.json"),
    "missing weights": (lambda ck: (ck / "model.safetensors").unlink(), "model.safetensors"),
    "not mllama": (lambda ck: _edit_json(ck / "config.json", lambda d: d.update(model_type="llama")), "model_type"),
    "shape mismatch": (
        lambda ck: _edit_json(ck / "config.json", lambda d: d["text_config"].update(intermediate_size=384)),
        "language_model.model.layers.0.mlp.gate_proj.weight",
    ),
    "unsupported dtype": (
        lambda ck: _resave(
            ck,
            lambda st: st.update({"vision_model.class_embedding": st["vision_model.class_embedding"].to(torch.int64)}),
        ),
        "vision_model.class_embedding",
    ),
    "missing tensor": (
        lambda ck: _resave(ck, lambda st: st.pop("language_model.model.layers.1.cross_attn_mlp_gate")),
        "language_model.model.layers.1.cross_attn_mlp_gate",
    ),
    "unexpected tensor": (
        lambda ck: _resave(ck, lambda st: st.update({"extra.weight": torch.zeros(3)})),
        "extra.weight",
    ),
    "corrupt header": (_corrupt_header, "model.safetensors"),
    "truncated file": (_truncate, "model.safetensors"),
    "bad rope type": (
        lambda ck: _edit_json(
            ck / "config.json",
            lambda d: d["text_config"].update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
        ),
        "yarn",
    ),
    # Malformed JSON, wrong value types and out-of-range values (mllama_q/hparams.py): one
    # `error:` line each. Regressions: tracebacks (RecursionError, ValueError from int("x"),
    # AttributeError on a list), and hangs / unbounded memory (2**31 layers planned one by one,
    # a token id of 1e9 sizing the token list).
    "malformed json": (lambda ck: (ck / "config.json").write_text('{"model_type": "mllama",'), "invalid JSON"),
    "deeply nested json": (
        lambda ck: (ck / "config.json").write_text("[" * 200000 + "]" * 200000),
        "nested too deeply",
    ),
    "json not an object": (lambda ck: (ck / "preprocessor_config.json").write_text("[1, 2]"), "expected a JSON object"),
    "generation config list": (lambda ck: (ck / "generation_config.json").write_text("[]"), "generation_config.json"),
    "string layer count": (lambda ck: _edit_text(ck, num_hidden_layers="40"), "num_hidden_layers"),
    "float layer count": (lambda ck: _edit_text(ck, num_hidden_layers=5.0), "num_hidden_layers"),
    "2**31 layers": (lambda ck: _edit_text(ck, num_hidden_layers=2**31), "num_hidden_layers = 2147483648"),
    "2**40 heads": (
        lambda ck: _edit_text(ck, num_attention_heads=2**40, hidden_size=2**46),
        "hidden_size = 70368744177664",
    ),
    "vocab 2**40": (lambda ck: _edit_text(ck, vocab_size=2**40), "vocab_size"),
    "rms eps nan": (lambda ck: _edit_text(ck, rms_norm_eps=float("nan")), "rms_norm_eps"),
    "rms eps inf": (lambda ck: _edit_text(ck, rms_norm_eps=float("inf")), "rms_norm_eps"),
    "rms eps zero": (lambda ck: _edit_text(ck, rms_norm_eps=0), "rms_norm_eps"),
    "rope factor inf": (
        lambda ck: _edit_text(
            ck,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=5e5,
                factor=float("inf"),
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
        "rope factor",
    ),
    "context 2**40": (lambda ck: _edit_text(ck, max_position_embeddings=2**40), "max_position_embeddings"),
    "vision layers 2**31": (lambda ck: _edit_vision(ck, num_hidden_layers=2**31), "num_hidden_layers"),
    "tiles 100000": (lambda ck: _edit_vision(ck, max_num_tiles=100000), "max_num_tiles"),
    "repeated aspect ratio": (lambda ck: _edit_vision(ck, supported_aspect_ratios=[[1, 1], [1, 1]]), "repeats"),
    "tile 20000 px": (
        lambda ck: (
            _edit_vision(ck, image_size=20000),
            _edit_json(ck / "preprocessor_config.json", lambda d: d.update(size={"height": 20000, "width": 20000})),
        ),
        "image_size",
    ),
    "image std zero": (
        lambda ck: _edit_json(ck / "preprocessor_config.json", lambda d: d.update(image_std=[0.0, 0.26, 0.27])),
        "image_std",
    ),
    "image mean strings": (
        lambda ck: _edit_json(ck / "preprocessor_config.json", lambda d: d.update(image_mean=["a", "b", "c"])),
        "image_mean",
    ),
    "max_image_tiles 100000": (
        lambda ck: _edit_json(ck / "preprocessor_config.json", lambda d: d.update(max_image_tiles=100000)),
        "max_image_tiles",
    ),
    "do_resize string": (
        lambda ck: _edit_json(ck / "preprocessor_config.json", lambda d: d.update(do_resize="no")),
        "do_resize",
    ),
    "image token 1e9": (
        lambda ck: _edit_json(ck / "config.json", lambda d: d.update(image_token_index=10**9)),
        "image_token_index",
    ),
    "eos id string": (
        lambda ck: _edit_json(ck / "generation_config.json", lambda d: d.update(eos_token_id=["x"])),
        "eos_token_id",
    ),
    "eos id 2**40": (
        lambda ck: _edit_json(ck / "generation_config.json", lambda d: d.update(eos_token_id=[2**40])),
        "eos_token_id",
    ),
    "temperature nan": (
        lambda ck: _edit_json(ck / "generation_config.json", lambda d: d.update(temperature=float("nan"))),
        "temperature",
    ),
    "vocab id 1e9": (
        lambda ck: _edit_json(
            ck / "tokenizer.json",
            lambda d: d["added_tokens"].append({"id": 10**9, "content": "<|far|>", "special": True}),
        ),
        "1000000000",
    ),
    "vocab id float": (
        lambda ck: _edit_json(
            ck / "tokenizer.json",
            lambda d: d["added_tokens"].append({"id": 1e9, "content": "<|far|>", "special": True}),
        ),
        "token id",
    ),
    "tokenizer model list": (
        lambda ck: _edit_json(ck / "tokenizer.json", lambda d: d.update(pre_tokenizer=[1])),
        "tokenizer.json",
    ),
    "image token past the tokenizer": (
        lambda ck: _edit_json(
            ck / "config.json", lambda d: d.update(image_token_index=d["text_config"]["vocab_size"] + 7)
        ),
        "is not a token of tokenizer.json",
    ),
    "rope original context inf": (
        lambda ck: _edit_text(
            ck,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=5e5,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=float("inf"),
            ),
        ),
        "llama3 rope scaling",
    ),
    "index escapes the directory": (
        lambda ck: (ck / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"x": "../../outside.safetensors"}})
        ),
        "weight_map",
    ),
}


def _edit_text(ck: Path, **kw):
    _edit_json(ck / "config.json", lambda d: d["text_config"].update(kw))


def _edit_vision(ck: Path, **kw):
    _edit_json(ck / "config.json", lambda d: d["vision_config"].update(kw))


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input(ckpts, tmp_path, capsys, case, within):
    ck = _copy(ckpts["default"], tmp_path / "ck")
    breaker, needle = BAD_CASES[case]
    breaker(ck)
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc = within(60, lambda: run_convert(ck, outdir / "o.gguf", "q8_0"))  # a hang is a regression
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1 and err.startswith("mllama-q convert: error: "), err
    assert needle in err, err
    assert list(outdir.iterdir()) == []


def test_disk_full_leaves_no_temp_file(ckpts, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing: one error line, no OUT.gguf and no .tmp file. Regression: closing
    the writer flushed its buffer, failed again on the full disk, and skipped the removal."""
    import errno

    import gguf.gguf_writer as gw

    class FullDisk:
        """A file that takes `room` bytes, then fails every write and the final flush."""

        def __init__(self, f, room):
            self.f, self.room = f, room

        def write(self, b):
            n = memoryview(b).nbytes
            if n > self.room:
                self.room = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= n
            return self.f.write(b)

        def close(self):
            self.f.close()
            if self.room == 0:
                raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    for room in (100, 200_000, 2_000_000):  # in the header, the metadata, the tensor data
        monkeypatch.setattr(
            gw, "open", lambda path, mode="r", *a, _room=room: FullDisk(open(path, mode, *a), _room), raising=False
        )
        out = tmp_path / "o.gguf"
        assert run_convert(ckpts["default"], out, "q8_0") == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "No space left on device" in err and str(out) in err, err
        assert list(tmp_path.iterdir()) == [], room


def test_not_a_directory(tmp_path, capsys):
    assert run_convert(tmp_path / "nope", tmp_path / "o.gguf", "f16") == 1
    err = capsys.readouterr().err.strip()
    assert "nope" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(ckpts, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    assert run_convert(ckpts["default"], out, "q8_0") == 1
    err = capsys.readouterr().err.strip()
    assert str(out) in err and "--force" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b"keep me"
    assert run_convert(ckpts["default"], out, "q8_0", extra=["--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf"]


@pytest.mark.parametrize("exc,rc", [(KeyboardInterrupt, 130), (RuntimeError, 1), (OSError, 1)])
def test_failure_mid_write_leaves_nothing(ckpts, tmp_path, monkeypatch, capsys, exc, rc):
    """A failure (or Ctrl-C) while tensor data are being written removes the temp file and
    never creates OUT.gguf, even with --force over an existing file (which is kept)."""
    from mllama_q.convert import converter

    calls = {"n": 0}
    real = converter.encode

    def flaky(x, gtype, block_row):
        calls["n"] += 1
        if calls["n"] == 20:
            raise exc("simulated failure")
        return real(x, gtype, block_row)

    monkeypatch.setattr(converter, "encode", flaky)
    out = tmp_path / "o.gguf"
    assert run_convert(ckpts["default"], out, "q4_k_m") == rc
    assert calls["n"] == 20
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old")
    calls["n"] = 0
    assert run_convert(ckpts["default"], out, "q4_k_m", extra=["--force"]) == rc
    assert [p.name for p in tmp_path.iterdir()] == ["o.gguf"] and out.read_bytes() == b"old"
    err = capsys.readouterr().err
    assert "simulated failure" in err or "interrupted" in err


# ---------------------------------------------------------------------------------------------
# The plan for the real 11B config (no weights): names, shapes, llama.cpp's Q4_K_M choices
# ---------------------------------------------------------------------------------------------
REAL_11B_CONFIG = {  # published Llama-3.2-11B-Vision-Instruct config.json (sizes only)
    "model_type": "mllama",
    "image_token_index": 128256,
    "text_config": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 40,
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": False,
        "eos_token_id": [128001, 128008, 128009],
    },
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_global_layers": 8,
        "attention_heads": 16,
        "image_size": 560,
        "patch_size": 14,
        "num_channels": 3,
        "max_num_tiles": 4,
        "norm_eps": 1e-05,
        "intermediate_layers_indices": [3, 7, 15, 23, 30],
        "vision_output_dim": 7680,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    },
}


def test_real_11b_plan_and_q4_k_m_mix():
    from mllama_q.convert.hf import Checkpoint, parse_config
    from mllama_q.convert.plan import assign_types, build_plan

    text, vision, img = parse_config(REAL_11B_CONFIG, "config.json")
    ck = Checkpoint(
        dir=Path("."), text=text, vision=vision, image_token_id=img, preprocessor={}, generation={}, stop_ids=[]
    )
    outs = build_plan(ck)
    assign_types(outs, ck, "q4_k_m", "q8_0")
    by = {o.name: o for o in outs}
    assert by["token_embd.weight"].shape == (128264, 4096) and by["token_embd.weight"].gtype == T.Q4_K
    assert by["output.weight"].shape == (128256, 4096) and by["output.weight"].gtype == T.Q6_K
    assert by["v.tile_position_embd.weight"].shape == (9, 4 * 1601 * 1280)
    assert by["v.tile_position_embd.weight"].gtype == T.F32
    assert by["v.position_embd.weight"].shape == (1601, 1280)
    assert by["mm.0.weight"].shape == (4096, 7680) and by["mm.0.weight"].gtype == T.Q8_0
    assert by["v.patch_embd.weight"].shape == (1280, 3, 14, 14) and by["v.patch_embd.weight"].gtype == T.F16
    assert by["blk.3.cross_attn_k_proj.weight"].gtype == T.Q4_K  # image-side K/V follow the text rule
    assert by["blk.3.cross_attn_v_proj.weight"].gtype == T.Q4_K
    assert "blk.3.attn_v.weight" not in by and "blk.3.cross_attn_q_norm.weight" in by
    # llama.cpp's use_more_bits(i, n), written out by hand for n = 40 (ffn_down: all layers)
    # and n = 32 (attn_v: the ordinal among the 32 self-attention layers).
    ffn_q6 = {0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 35, 36, 37, 38, 39}
    assert {i for i in range(40) if by[f"blk.{i}.ffn_down.weight"].gtype == T.Q6_K} == ffn_q6
    self_layers = [i for i in range(40) if i not in REAL_11B_CONFIG["text_config"]["cross_attention_layers"]]
    v_q6 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    assert {j for j, i in enumerate(self_layers) if by[f"blk.{i}.attn_v.weight"].gtype == T.Q6_K} == v_q6
    others = {o.gtype for o in outs if o.kind == "text" and o.role == ""}
    assert others == {T.Q4_K}
    assert len(outs) == 1 + 1 + 32 * 9 + 8 * 13 + 2 + (2 + 4 + 4 + 4 + 32 * 12 + 8 * 14 + 2)


def test_tiny_checkpoint_is_a_usable_nonvacuous_reference(ckpts, hf_states, hf_model):
    """The builder's checkpoints load in transformers with its processor and chat template,
    every tanh gate is non-zero, and the image changes the logits (runtime parity tests
    built on them cannot pass with a dead vision path)."""
    from PIL import Image
    from transformers import AutoProcessor

    for key, x in hf_states["gqa4_sharded"].items():
        if key.endswith(("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")):
            assert 0.29 <= float(x.abs().min()) and float(x.abs().max()) <= 1.21, key
    ck = ckpts["gqa4_sharded"]
    model = hf_model(ck, intermediate="installed")  # checks the checkpoint, not our runtime
    proc = AutoProcessor.from_pretrained(ck)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>")
    rng = np.random.default_rng(0)
    logits = []
    for _ in range(2):
        img = Image.fromarray((rng.random((40, 70, 3)) * 255).astype(np.uint8))
        inp = proc(images=img, text=text, return_tensors="pt")
        assert tuple(inp["pixel_values"].shape) == (1, 1, 2, 3, 28, 28)
        with torch.no_grad():
            logits.append(model(**inp).logits)
    diff = (logits[0] - logits[1]).abs().max().item()
    assert diff > 1e-2 * logits[0].abs().max().item()
