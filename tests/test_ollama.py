"""Files written the way Ollama wrote llama3.2-vision load with transformers' maths.

Every GGUF here comes from tests/ollama_writer.py, a port of Ollama's Go converter (one-file
layout, three converter generations) and of what read the two-file layout (see its doc for
the commits). The logits of each file are compared with transformers' on the tiny checkpoint
the file was made from, with the F16 tolerance of test_model.test_f16_logits_match_transformers;
and every transform the loader undoes has a deliberately wrong variant that must fail that same
check, so the check is not vacuous.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from ollama_writer import write_one_file, write_two_files  # noqa: E402
from test_model import hf_logits, hf_with_file_weights, make_cases, our_logits, rel_err  # noqa: E402

import mllama_q  # noqa: E402
from mllama_q import gguf_keys as K  # noqa: E402
from mllama_q import ollama  # noqa: E402
from mllama_q.gguf_file import ModelFileError  # noqa: E402

from tiny_models import load_hf_model, make_tiny_checkpoint  # noqa: E402

F16_TOL = 5e-3  # test_model.test_f16_logits_match_transformers
IMAGE_CASES = ["one_image_1_tile", "one_image_3_tiles", "two_images_4_and_2_tiles", "two_images_adjacent"]
VISION_GATES = ("gate_attn", "gate_ffn", "gated_positional_embedding.gate", "tile_positional_embedding.gate")
TEXT_GATES = ("cross_attn_attn_gate", "cross_attn_mlp_gate")


def _set_large_gates(ckpt, seed: int) -> None:
    """Every tanh gate with |g| in [1.3, 1.7] (random sign): tanh(g) and g then differ by a lot,
    a raw vision global gate is outside (-1, 1) (how the loader recognises raw gates), and the
    text cross-attention gates let the image weigh enough on the logits for a vision-side
    mistake to show."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    for f in ckpt.glob("*.safetensors"):
        st = load_file(str(f))
        for k in st:
            if k.endswith(VISION_GATES + TEXT_GATES):
                st[k] = (rng.choice([-1.0, 1.0], st[k].shape) * rng.uniform(1.3, 1.7, st[k].shape)).astype(np.float32)
        save_file(st, str(f), metadata={"format": "pt"})


def _reference(ckpt, hf=None) -> dict:
    hf = load_hf_model(ckpt) if hf is None else hf
    cases = make_cases(int(hf.config.image_token_index))
    return {"ckpt": ckpt, "hf": hf, "cases": cases, "refs": {k: hf_logits(hf, c) for k, c in cases.items()}}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Tiny checkpoint (published config.json spelling: rope_theta + rope_scaling, as Ollama's
    converter reads it) with large vision gates."""
    d = tmp_path_factory.mktemp("ollama_big")
    ck = make_tiny_checkpoint(d / "hf", seed=3, dtype="float32", rope_spelling="rope_theta")
    _set_large_gates(ck, 3)
    r = _reference(ck)
    r["dir"] = d
    return r


@pytest.fixture(scope="module")
def small(tiny_checkpoint, hf_model):
    """The default random gates (every vision global gate of seed 0 is inside (-1, 1))."""
    ck = tiny_checkpoint(seed=0, dtype="float32", rope_spelling="rope_theta")
    return _reference(ck, hf_model(ck))


def load(path, **kw) -> mllama_q.Model:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ollama.OllamaLayoutWarning)
        return mllama_q.Model(path, kv_type=kw.pop("kv_type", "f16"), **kw)


def max_error(ref, path, names=None, **kw) -> float:
    """THE check: max relative logits error over the prompts (inf if the file does not load/run)."""
    try:
        m = load(path, **kw)
        return max(rel_err(our_logits(m, ref["cases"][n]), ref["refs"][n]) for n in (names or ref["cases"]))
    except ModelFileError:
        return float("inf")


# ---------------------------------------------------------------------------
# Guards: the references exercise what the loader undoes
# ---------------------------------------------------------------------------
def test_vision_gates_large_and_random(big, small):
    vals = [p.item() for n, p in big["hf"].named_parameters() if n.endswith(VISION_GATES)]
    assert len(vals) == 2 * 2 + 3 and all(1.3 <= abs(v) <= 1.7 for v in vals) and len({round(v, 4) for v in vals}) == 7
    small_global = [p.item() for n, p in small["hf"].named_parameters() if n.endswith(("gate_attn", "gate_ffn"))]
    assert len(small_global) == 4 and all(0.3 <= abs(v) < 1 for v in small_global)
    text = [p.item() for n, p in big["hf"].named_parameters() if n.endswith(TEXT_GATES)]
    assert len(text) == 4 and all(1.3 <= abs(v) <= 1.7 for v in text)


def test_writer_reproduces_ollama_names_and_types(big, tmp_path):
    """Spot checks of the port against values in Ollama's source: the llama-bpe pretokenizer digest
    (convert/tokenizer.go), F32 for 1-D / tile tables (convert/reader.go), the duplicated position
    gate (convert_mllama.go), sorted keys (fs/ggml/gguf.go) and no mllama_q keys."""
    p = write_one_file(big["ckpt"], tmp_path / "b.gguf")
    r = gguf.GGUFReader(str(p))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["tokenizer.ggml.pre"] == "llama-bpe" and f["general.architecture"] == "mllama"
    assert f["tokenizer.ggml.add_bos_token"] is False  # tokenizer_config.json has no add_bos_token
    assert f[K.OLLAMA_EOS_TOKEN_IDS] == big["hf"].config.text_config.eos_token_id
    assert not any(k.startswith("mllama_q.") for k in f)
    keys = [k for k in f if k != "general.architecture"]
    assert keys == sorted(keys)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["v.tile_position_embd.weight"] == "F32" and types["v.position_embd.weight"] == "F16"
    assert types["v.patch_embd.weight"] == "F16" and types["token_embd.weight"] == "F16"
    assert types["blk.1.cross_attn_q_norm.weight"] == "F32" and types["rope_freqs.weight"] == "F32"
    g = {t.name: float(np.asarray(t.data).reshape(-1)[0]) for t in r.tensors if t.name.endswith(".gate")}
    assert g["v.position_embd.gate"] == pytest.approx(1 - g["v.tile_position_embd.gate"], abs=1e-6)
    names = [t.name for t in r.tensors]
    assert names.index("blk.0.attn_k.weight") < names.index("blk.1.attn_norm.weight") < names.index("v.class_embd")


# ---------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "converter,position_f32", [("v0.7.1", False), ("v0.7.1", True), ("v0.7.1-rc0", False), ("v0.7.0", False)]
)
def test_one_file_matches_transformers(big, tmp_path, converter, position_f32):
    p = write_one_file(big["ckpt"], tmp_path / "m.gguf", converter=converter, position_embd_f32=position_f32)
    m = load(p)
    assert m.layout.kind == ollama.ONE_FILE and m.layout.converter == converter and not m.layout.assumed
    err = max_error(big, p)
    assert err < F16_TOL, f"{converter}: {err:.2e}"


def test_two_file_pair_matches_transformers(big, tmp_path):
    text, proj = write_two_files(big["ckpt"], tmp_path / "text.gguf", tmp_path / "proj.gguf")
    m = load(text, projector=proj)
    assert m.layout.kind == ollama.TWO_FILE and m.layout.projector_path == str(proj)
    assert m.vision_hparams["num_channels"] == 3  # not in the projector: mllama.cpp never read it
    err = max_error(big, text, projector=proj)
    assert err < F16_TOL, f"{err:.2e}"
    # Without the projector the text blob runs text-only prompts, and says how to get vision.
    tm = load(text, vision=False)
    assert rel_err(our_logits(tm, big["cases"]["text_only"]), big["refs"]["text_only"]) < F16_TOL
    with pytest.raises(ModelFileError, match="projector="):
        load(text)


# Each wrong variant undoes one transform wrongly (or not at all); it must fail THE check.
WRONG = {
    "norms permuted twice": dict(write=dict(bug="norms_permuted")),
    "cross q/k taken as not permuted": dict(write=dict(converter="v0.7.1"), load=dict(ollama_converter="v0.7.0")),
    "cross-attention norms not permuted": dict(write=dict(converter="v0.7.0"), load=dict(ollama_converter="v0.7.1")),
    "vision gates not tanh'd": dict(write=dict(converter="v0.7.1-rc0"), load=dict(ollama_converter="v0.7.1")),
    "vision gates tanh'd twice": dict(write=dict(converter="v0.7.1"), load=dict(ollama_converter="v0.7.1-rc0")),
    "position gate = tanh(g)": dict(write=dict(bug="position_gate_tanh")),
    "fc1/fc2 not swapped back": dict(two=True, write=dict(bug="fc_not_swapped")),
}


@pytest.mark.parametrize("name", WRONG)
def test_wrong_variants_fail_the_check(big, tmp_path, name):
    w = WRONG[name]
    if w.get("two"):
        text, proj = write_two_files(big["ckpt"], tmp_path / "t.gguf", tmp_path / "p.gguf", **w["write"])
        err = max_error(big, text, IMAGE_CASES, projector=proj)
    else:
        p = write_one_file(big["ckpt"], tmp_path / "w.gguf", **w["write"])
        err = max_error(big, p, IMAGE_CASES, **w.get("load", {}))
    assert err > 1.5 * F16_TOL, f"{name}: the wrong variant passes THE check ({err:.2e})"


def test_fc_swap_with_square_mlp_gives_wrong_numbers(tmp_path, tiny_checkpoint, hf_model):
    """With fc1 and fc2 of the same shape a missing swap cannot fail on shapes: it must fail on numbers."""
    ck = tiny_checkpoint(seed=4, dtype="float32", rope_spelling="rope_theta", vision_config={"intermediate_size": 64})
    ref = _reference(ck, hf_model(ck))
    good = write_two_files(ck, tmp_path / "t.gguf", tmp_path / "p.gguf")
    bad = write_two_files(ck, tmp_path / "tb.gguf", tmp_path / "pb.gguf", bug="fc_not_swapped")
    assert max_error(ref, good[0], projector=good[1]) < F16_TOL
    assert max_error(ref, bad[0], IMAGE_CASES, projector=bad[1]) > 1.5 * F16_TOL


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------
def test_generation_that_cannot_be_told_warns_and_override_fixes(small, tmp_path):
    """A v0.7.0 blob whose raw gates all lie in (-1, 1) looks like a current one (no eos list
    either): it is loaded as current with a warning, and ollama_converter='v0.7.0' fixes it."""
    p = write_one_file(small["ckpt"], tmp_path / "old.gguf", converter="v0.7.0")
    with pytest.warns(ollama.OllamaLayoutWarning, match="ollama_converter='v0.7.0'"):
        m = mllama_q.Model(p, kv_type="f16")
    assert m.layout.converter == "v0.7.1" and m.layout.assumed
    assert max_error(small, p, IMAGE_CASES) > 1.5 * F16_TOL
    assert max_error(small, p, ollama_converter="v0.7.0") < F16_TOL


def test_current_blob_without_eos_list_warns_and_loads(small, tmp_path):
    """A checkpoint whose generation_config.json has one eos id gives no eos_token_ids (convert/
    tokenizer.go keeps only lists); the assumed current generation is then right."""
    ck = shutil.copytree(small["ckpt"], tmp_path / "hf")  # the shared checkpoint is read-only
    gen = json.loads((ck / "generation_config.json").read_text())
    (ck / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=gen["eos_token_id"][-1])))
    p = write_one_file(ck, tmp_path / "single_eos.gguf")
    assert K.OLLAMA_EOS_TOKEN_IDS not in gguf.GGUFReader(str(p)).fields
    with pytest.warns(ollama.OllamaLayoutWarning):
        mllama_q.Model(p)
    assert max_error(small, p) < F16_TOL


def test_our_own_files_are_not_touched(tiny_checkpoint, tiny_gguf):
    ours = tiny_gguf(tiny_checkpoint(seed=0, dtype="float32"), "f16")
    m = load(ours)
    assert m.layout.kind == ollama.OURS
    with pytest.raises(ValueError, match="Ollama"):
        load(ours, ollama_converter="v0.7.0")
    with pytest.raises(ModelFileError, match="projector="):
        load(ours, projector=ours)


def test_bad_converter_name(big, tmp_path):
    p = write_one_file(big["ckpt"], tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="v0.7.0"):
        load(p, ollama_converter="0.7")


# ---------------------------------------------------------------------------
# Frontend: stop ids, BOS
# ---------------------------------------------------------------------------
def test_stop_ids_are_eos_plus_eos_token_ids(big, tmp_path):
    p = write_one_file(big["ckpt"], tmp_path / "m.gguf")
    m = load(p)
    gen = json.loads((big["ckpt"] / "generation_config.json").read_text())
    assert m.stop_ids == sorted(set(gen["eos_token_id"]))  # end_of_text, eom, eot (eot is also eos_token_id)
    # Without the list (v0.7.0): the published checkpoints' three stop tokens, by text.
    m0 = load(write_one_file(big["ckpt"], tmp_path / "o.gguf", converter="v0.7.0"))
    assert m0.stop_ids == m.stop_ids


def test_bos_rule_matches_transformers(big, tmp_path):
    """Ollama stored add_bos_token = false (tokenizer_config.json has none); the checkpoint's
    tokenizer adds BOS (post-processor). Plain encoding and the processor must agree with HF."""
    from transformers import AutoProcessor, AutoTokenizer

    m = load(write_one_file(big["ckpt"], tmp_path / "m.gguf"), vision=False)
    hf_tok = AutoTokenizer.from_pretrained(str(big["ckpt"]))
    hf_proc = AutoProcessor.from_pretrained(str(big["ckpt"]))
    for text in ("Hello world", "<|image|>Describe this.", "The quick brown fox"):
        assert m.tokenizer.encode(text) == hf_tok(text).input_ids
        assert m.tokenizer.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False).input_ids
        if "<|image|>" not in text:
            ours = m.processor(text=text)["input_ids"][0].tolist()
            assert ours == hf_proc(text=text)["input_ids"][0]


def test_greedy_matches_transformers(big, tmp_path):
    """32 greedy tokens after a two-image prompt on the Ollama blob equal transformers' running the
    blob's own F16-rounded weights (F32 KV cache)."""
    from test_model import hf_greedy, our_greedy

    p = write_one_file(big["ckpt"], tmp_path / "m.gguf", position_embd_f32=True)
    m = load(p, kv_type="f32", n_ctx=128)
    case = big["cases"]["two_images_4_and_2_tiles"]
    assert our_greedy(m, case, 32) == hf_greedy(hf_with_file_weights(load_hf_model(big["ckpt"]), p), case, 32)


# ---------------------------------------------------------------------------
# RoPE without rope_freqs.weight
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("rope", ["default", "linear"])
def test_rope_without_rope_freqs(tmp_path, rope):
    """No rope_freqs.weight in an Ollama file means plain RoPE, or linear scaling from the
    mllama.rope.scaling.* keys (convert_llama.go), never the 11B's llama3 scaling."""
    rp = {"rope_type": rope, "rope_theta": 10000.0} | ({"factor": 4.0} if rope == "linear" else {})
    ck = make_tiny_checkpoint(
        tmp_path / "hf", seed=6, dtype="float32", rope_spelling="rope_theta", text_config={"rope_parameters": rp}
    )
    cj = json.loads((ck / "config.json").read_text())
    if rope == "linear":  # Ollama's converter reads rope_scaling.type, HF's legacy spelling
        cj["text_config"]["rope_scaling"]["type"] = "linear"
        (ck / "config.json").write_text(json.dumps(cj))
    ref = _reference(ck)
    p = write_one_file(ck, tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(p))
    assert "rope_freqs.weight" not in [t.name for t in r.tensors]
    assert (K.OLLAMA_ROPE_SCALING_TYPE in r.fields) == (rope == "linear")
    long_case = {"input_ids": np.asarray([[0] + list(range(3, 200))], dtype=np.int64)}
    m = load(p, kv_type="f32")
    assert rel_err(our_logits(m, long_case), hf_logits(ref["hf"], long_case)) < 1e-3
    assert max_error(ref, p) < F16_TOL


# ---------------------------------------------------------------------------
# Quantized text weights (the published blob is Q4_K_M)
# ---------------------------------------------------------------------------
def test_q4_k_m_blob_has_our_q4_k_m_mix_and_runs(big, tmp_path, tiny_checkpoint, tiny_gguf):
    """server/quantization.go's Q4_K_M picks the same type as mllama-q's q4_k_m (gguf_keys.tensor_type)
    for every text tensor except WHICH attn_v layers get Q6_K: Ollama counts the vision towers'
    attn_v tensors into n_attn_v (GroupLayers counts every name containing "attn_v.weight") while
    only text ones advance the counter, so use_more_bits picks other layers (11B: 16 of 32 either
    way). Same kernels, same bytes per token. The blob's logits match HF running the same (gguf-py
    dequantized) weights, as in test_model.test_quantized_logits."""
    ours_path = tiny_gguf(tiny_checkpoint(seed=0, dtype="float32"), "q4_k_m")  # the same shapes
    p = write_one_file(big["ckpt"], tmp_path / "q.gguf", quantize="q4_k_m", position_embd_f32=True)
    theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(p)).tensors}
    ours = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(ours_path)).tensors}
    text = [n for n in ours if not n.startswith(("v.", "mm."))]
    other = [n for n in text if "attn_v.weight" not in n]
    assert {n: theirs[n] for n in other} == {n: ours[n] for n in other}
    attn_v = [n for n in text if "attn_v.weight" in n]  # blk.0, 2, 4; n_attn_v = 3 text + 6 vision = 9
    assert [theirs[n] for n in attn_v] == ["Q6_K", "Q4_K", "Q4_K"]  # use_more_bits(i, 9): i < 9 // 8
    assert [ours[n] for n in attn_v] == ["Q4_K", "Q4_K", "Q6_K"]  # use_more_bits(i, 3): i >= 7 * 3 // 8
    ref_q = hf_with_file_weights(load_hf_model(big["ckpt"]), p)
    m = load(p, kv_type="f32")
    for name in ("text_only", "two_images_4_and_2_tiles"):
        case = big["cases"][name]
        assert rel_err(our_logits(m, case), hf_logits(ref_q, case)) < 3e-2, name


# ---------------------------------------------------------------------------
# Files in no known layout, and misuse
# ---------------------------------------------------------------------------
def _rewrite(src, dst, rename=None, drop=(), add_kv=None, drop_kv=()):
    """Copy a GGUF with tensors renamed / dropped and metadata added / dropped."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "mllama")
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_kv:
            continue
        vt = f.types[0]
        w.add_key_value(key, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for key, (val, vt) in (add_kv or {}).items():
        w.add_key_value(key, val, vt)
    for t in r.tensors:
        if t.name in drop:
            continue
        name = rename(t.name) if rename else t.name
        a = np.array(t.data)
        w.add_tensor(name, a, raw_dtype=None if a.dtype in (np.float32, np.float16) else t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_unknown_layouts_name_what_was_recognised(big, tmp_path):
    p = write_one_file(big["ckpt"], tmp_path / "m.gguf")
    # Hugging Face tensor names in a GGUF (a community conversion).
    hfnames = _rewrite(
        p,
        tmp_path / "hf.gguf",
        rename=lambda n: n.replace("blk.", "language_model.model.layers.").replace(
            "token_embd", "language_model.model.embed_tokens"
        ),
    )
    with pytest.raises(ModelFileError) as e:
        load(hfnames)
    msg = str(e.value)
    assert "Recognised: mllama.block_count" in msg and "missing: token_embd.weight" in msg
    assert "language_model.model" in msg
    # Text fine, vision tower named otherwise.
    venc = _rewrite(p, tmp_path / "venc.gguf", rename=lambda n: n.replace("v.blk.", "v.enc.blk."))
    with pytest.raises(ModelFileError, match=r"unknown vision tower naming.*missing: v\.blk\.0\.attn_norm\.weight"):
        load(venc)


def test_two_file_misuse(big, tmp_path):
    text, proj = write_two_files(big["ckpt"], tmp_path / "t.gguf", tmp_path / "p.gguf")
    one = write_one_file(big["ckpt"], tmp_path / "one.gguf")
    with pytest.raises(ModelFileError, match="projector .*blob.*projector= this file"):
        load(proj)
    with pytest.raises(ModelFileError, match="holds text tensors"):
        load(text, projector=text)
    with pytest.raises(ModelFileError, match="already holds the vision tower"):
        load(one, projector=proj)
    with pytest.raises(ModelFileError, match="one-file naming"):
        load(
            text,
            projector=_rewrite(
                one,
                tmp_path / "vonly.gguf",
                drop=[n.name for n in gguf.GGUFReader(str(one)).tensors if not n.name.startswith(("v.", "mm."))],
            ),
        )
    with pytest.raises(ValueError, match="one-file"):
        load(text, projector=proj, ollama_converter="v0.7.0")


def test_bad_projector_values(big, tmp_path):
    text, proj = write_two_files(big["ckpt"], tmp_path / "t.gguf", tmp_path / "p.gguf")
    wide = _rewrite(
        proj,
        tmp_path / "wide.gguf",
        drop_kv=[K.OLLAMA_V_PROJECTION_DIM],
        add_kv={K.OLLAMA_V_PROJECTION_DIM: (4096, gguf.GGUFValueType.UINT32)},
    )
    with pytest.raises(ModelFileError, match="projection_dim = 4096"):
        load(text, projector=wide)
    src = gguf.GGUFReader(str(proj))
    q = next(t for t in src.tensors if t.name == "v.blk.0.attn_q.weight")
    dst = tmp_path / "bias.gguf"
    w = gguf.GGUFWriter(str(dst), "mllama")
    for key, f in src.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            vt = f.types[0]
            w.add_key_value(key, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for t in src.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.add_tensor("v.blk.0.attn_q.bias", np.zeros(int(q.shape[1]), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="attention biases"):
        load(text, projector=dst)


def test_bad_eos_token_ids(big, tmp_path):
    p = write_one_file(big["ckpt"], tmp_path / "m.gguf")
    bad = _rewrite(
        p,
        tmp_path / "bad.gguf",
        drop_kv=[K.OLLAMA_EOS_TOKEN_IDS],
        add_kv={K.OLLAMA_EOS_TOKEN_IDS: ([1, 10**6], gguf.GGUFValueType.ARRAY)},
    )
    with pytest.raises(ModelFileError, match="outside the vocabulary"):
        load(bad)


def test_bad_rope_scaling_keys(big, tmp_path):
    p = write_one_file(big["ckpt"], tmp_path / "m.gguf")
    for kind_, factor, match in (("yarn", 2.0, "unsupported"), ("linear", -1.0, "positive")):
        bad = _rewrite(
            p,
            tmp_path / f"r{kind_}.gguf",
            drop=["rope_freqs.weight"],
            add_kv={
                K.OLLAMA_ROPE_SCALING_TYPE: (kind_, gguf.GGUFValueType.STRING),
                K.OLLAMA_ROPE_SCALING_FACTOR: (factor, gguf.GGUFValueType.FLOAT32),
            },
        )
        with pytest.raises(ModelFileError, match=match):
            load(bad)


# ---------------------------------------------------------------------------
# mllama-q convert --from-ollama (vision F16 -> Q8_0, text as stored)
# ---------------------------------------------------------------------------
def test_convert_from_ollama(big, tmp_path):
    from mllama_q.convert import ConvertError
    from mllama_q.convert.from_ollama import convert_from_ollama

    src = write_one_file(big["ckpt"], tmp_path / "o.gguf", quantize="q4_k_m")
    out = tmp_path / "c.gguf"
    convert_from_ollama(str(src), out, "q8_0", progress=False)
    a = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert set(b) == set(a)
    for name, t in a.items():
        if not name.startswith(("v.", "mm.")) and "cross_attn_q_norm" not in name and "cross_attn_k_norm" not in name:
            assert b[name].tensor_type == t.tensor_type and np.array_equal(np.asarray(b[name].data), np.asarray(t.data))
    assert b["v.blk.0.attn_q.weight"].tensor_type.name == "Q8_0" and b["mm.0.weight"].tensor_type.name == "Q8_0"
    assert b["v.position_embd.weight"].tensor_type.name == "F32" and b["v.patch_embd.weight"].tensor_type.name == "F16"
    m = load(out, kv_type="f32")
    assert m.layout.kind == ollama.OURS and m.tokenizer.add_bos
    assert m.stop_ids == load(src).stop_ids
    ref = hf_with_file_weights(load_hf_model(big["ckpt"]), out)
    for name in ("text_only", "two_images_4_and_2_tiles", "one_image_3_tiles"):
        case = big["cases"][name]
        assert rel_err(our_logits(m, case), hf_logits(ref, case)) < 3e-2, name
    with pytest.raises(ConvertError, match="already exists"):
        convert_from_ollama(str(src), out, progress=False)
    with pytest.raises(ConvertError, match="already mllama-q's layout"):
        convert_from_ollama(str(out), tmp_path / "again.gguf", progress=False)


def test_convert_from_ollama_failure_leaves_no_file(big, tmp_path, monkeypatch):
    """A conversion that fails while writing tensor data (here: the re-quantizer raising at its
    third vision tensor, as an interrupt or a full disk would) leaves neither the output nor its
    temporary file (converter.write_gguf, shared with the HF converter)."""
    from mllama_q.convert import converter
    from mllama_q.convert.from_ollama import convert_from_ollama

    src = write_one_file(big["ckpt"], tmp_path / "o.gguf")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    calls = []
    real = converter.encode

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(converter, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_from_ollama(str(src), out_dir / "c.gguf", "q8_0", progress=False)
    assert len(calls) == 3 and list(out_dir.iterdir()) == []


def test_convert_from_ollama_two_file_pair_without_rope_freqs(tmp_path, monkeypatch, tiny_checkpoint, hf_model):
    """A two-file pair by name, from a plain-RoPE checkpoint: the output carries its projector's
    vision tower under mllama-q's names and a rope_freqs.weight of ones (no 11B default)."""
    from ollama_writer import make_store

    from mllama_q.cli import main

    ck = tiny_checkpoint(
        seed=2,
        dtype="float32",
        rope_spelling="rope_theta",
        text_config={"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    )
    ref = _reference(ck, hf_model(ck))
    text, proj = write_two_files(ck, tmp_path / "t.gguf", tmp_path / "p.gguf")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "store"))
    make_store(tmp_path / "store", "llama3.2-vision", "old", model=text, projector=proj)
    out = tmp_path / "c.gguf"
    assert main(["convert", "--from-ollama", "llama3.2-vision:old", "-o", str(out), "-q"]) == 0
    r = gguf.GGUFReader(str(out))
    rope = next(t for t in r.tensors if t.name == K.ROPE_FREQS)
    assert np.array_equal(np.asarray(rope.data), np.ones(32, np.float32))
    assert r.fields[K.Q_ROPE_SCALING_TYPE].contents() == "none"
    assert max_error(ref, out, ["text_only", "one_image_3_tiles"]) < 3e-2
    with pytest.raises(SystemExit):
        main(["convert", "--from-ollama", "llama3.2-vision:old", "-o", str(tmp_path / "x.gguf"), "--type", "q8_0"])
    with pytest.raises(SystemExit):
        main(["convert", "-o", str(tmp_path / "x.gguf")])
