"""Test-only: write Hugging Face Mllama checkpoints the way Ollama did, and fake Ollama stores.

    from ollama_writer import write_one_file, write_two_files, make_store
    write_one_file(ckpt, "blob.gguf")                          # Ollama's last converter (9db4bdbad^)
    write_one_file(ckpt, "old.gguf", converter="v0.7.0")       # 23125648b (2025-05-13)
    write_two_files(ckpt, "text.gguf", "projector.gguf")       # the v0.4 - v0.6 pair
    make_store(root, "llama3.2-vision", "11b", model="blob.gguf", params={...})

A port of ollama/ollama's Go converter, independent of mllama-q's converter and loader (it
imports nothing from mllama_q except, for --quantize, the ggml-exact block quantizers):

  convert/convert.go       LoadModelMetadata, ModelParameters.KV, writeFile (shape reversal)
  convert/convert_llama.go llamaModel.KV (rope_freqs from llama3 scaling), Tensors, repack,
                           Replacements
  convert/convert_mllama.go mllamaModel.KV, Replacements, Tensors, repack (gates, vision q/k)
  convert/tokenizer.go     parseTokenizer, parseVocabularyFromTokenizer, SpecialVocabulary.Key
  convert/reader.go        tensorBase.Kind (which tensors stay F32)
  fs/ggml/gguf.go          WriteGGUF (keys sorted, tensors sorted by block then name, v3, align 32)
  server/quantization.go   newType / getTensorNewType (the published Q4_K_M text weights)

all read at 9db4bdbad^ (the last commit with mllama), with the May 2025 generations of
convert_mllama.go / convert_llama.go / tokenizer.go for `converter=`:
  "v0.7.0"     23125648b: cross-attn q/k not permuted, vision gates raw, no vision q/k
               permutation, no eos_token_ids
  "v0.7.1-rc0" 55760195e + 333e36042: cross-attn q/k permuted, eos_token_ids, gates still raw
  "v0.7.1"     adff143bc and later: + vision global gates tanh'd, vision q/k permuted
position_embd_f32: v.position_embd.weight F32 (reader.go since 96b202d34, 2026-04-02) or F16.

The two-file pair (Ollama v0.4 - v0.6) has no writer in Ollama's repository; this one is
reconstructed from what read it: the text blob as llama.cpp with llama/patches/0006-add-mllama-
support.patch loads it (the one-file text part without mllama.vision.* keys, cross-attention
q/k permuted like the later converter, which 55760195e says it matched), the projector as
llama/mllama.cpp (at 23125648b^) loads it: ln1/ln2/attn_out names, ffn_down = fc1 and ffn_up =
fc2, gates multiplied as stored, mllama.vision.* keys + projection_dim + general.description
(num_channels left out: mllama.cpp never read it).

`bug=` writes a deliberately wrong file for the tests that must fail (see BUGS).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np

CONVERTERS = ("v0.7.0", "v0.7.1-rc0", "v0.7.1")
BUGS = (
    None,
    "norms_permuted",  # cross_attn_q/k_norm permuted like the q/k rows (the loader permutes again)
    "position_gate_tanh",  # v.position_embd.gate = tanh(g) instead of 1 - tanh(g)
    "fc_not_swapped",  # projector: fc1 -> ffn_up, fc2 -> ffn_down (not mllama.cpp's order)
)

# ---------------------------------------------------------------------------
# Go's strings.Replacer (generic algorithm): scan left to right; at each position the
# old string that comes FIRST in the argument list among those matching there wins.
# ---------------------------------------------------------------------------
LLAMA_REPLACEMENTS = [  # convert_llama.go Replacements
    ("lm_head", "output"),
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("model.layers", "blk"),
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.down_proj", "ffn_down"),
    ("mlp.up_proj", "ffn_up"),
    ("post_attention_layernorm", "ffn_norm"),
]
MLLAMA_REPLACEMENTS = LLAMA_REPLACEMENTS + [  # convert_mllama.go Replacements
    ("language_model.", ""),
    ("gate_attn", "attn_gate"),
    ("gate_ffn", "ffn_gate"),
    ("cross_attn.", "cross_attn_"),
    ("vision_model", "v"),
    ("class_embedding", "class_embd"),
    ("patch_embedding", "patch_embd"),
    ("gated_positional_embedding.tile_embedding", "tile_position_embd"),
    ("gated_positional_embedding.embedding", "position_embd.weight"),
    ("gated_positional_embedding", "position_embd"),
    ("embedding.weight", "weight"),
    ("pre_tile_positional_embedding", "pre_tile_position_embd"),
    ("post_tile_positional_embedding", "post_tile_position_embd"),
    ("layernorm_pre", "pre_ln"),
    ("layernorm_post", "post_ln"),
    ("global_transformer.layers", "global.blk"),
    ("transformer.layers", "blk"),
    ("mlp.fc1", "ffn_up"),
    ("mlp.fc2", "ffn_down"),
    ("multi_modal_projector", "mm.0"),
]
# The projector's per-layer names, from llama/mllama.cpp mllama_layers_load (23125648b^): a
# separate table applied to the one-file names of the v.* layer tensors.
PROJECTOR_LAYER_RENAMES = {
    "attn_norm": "ln1",
    "ffn_norm": "ln2",
    "attn_output": "attn_out",
    "ffn_up": "ffn_down",
    "ffn_down": "ffn_up",
}


def go_replace(s: str, pairs) -> str:
    out, i = [], 0
    while i < len(s):
        for old, new in pairs:
            if old and s.startswith(old, i):
                out.append(new)
                i += len(old)
                break
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


# ---------------------------------------------------------------------------
# Checkpoint reading (config.json with Go's json tags)
# ---------------------------------------------------------------------------
def _f32(x) -> float:
    return float(np.float32(x))


def read_checkpoint(ckpt) -> dict:
    ckpt = Path(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    tensors = {}
    from safetensors.numpy import load_file

    for f in sorted(ckpt.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            tensors[k] = v
    return {"dir": ckpt, "config": cfg, "tensors": tensors}


# ---------------------------------------------------------------------------
# Tokenizer (convert/tokenizer.go)
# ---------------------------------------------------------------------------
PRE_DIGESTS = {
    "d98f9631be1e9607a9848c26c1f9eac1aa9fc21ac6ba82a2fc0741af9780a48f": "llama-bpe",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855": None,
}
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # ModelParameters.specialTokenTypes
SPECIAL_KEY = {
    "bos": "bos",
    "eos": "eos",
    "cls": "cls",
    "mask": "mask",
    "unk": "unknown",
    "sep": "seperator",
    "pad": "padding",
}  # SpecialVocabulary.Key (the upstream typo included)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def ollama_tokenizer(ckpt: Path, eos_ids: bool) -> dict:
    """The tokenizer.* KV pairs Ollama writes, {key: (value, gguf type name)}."""
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    tokens = {v: (k, False, False) for k, v in tj["model"]["vocab"].items()}  # id -> (content, special, user)
    for t in tj.get("added_tokens", []):
        tokens[t["id"]] = (t["content"], bool(t.get("special")), True)
    ids = sorted(tokens)
    toks = [tokens[i][0] for i in ids]
    types = [TOKEN_CONTROL if tokens[i][1] else TOKEN_USER_DEFINED if tokens[i][2] else TOKEN_NORMAL for i in ids]
    scores = [float(i) for i in ids]
    merges = tj["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    h = hashlib.sha256()
    for pt in (tj.get("pre_tokenizer") or {}).get("pretokenizers", []):
        if pt.get("type") == "Split" and (pt.get("pattern") or {}).get("Regex"):
            h.update(pt["pattern"]["Regex"].encode())
    pre = PRE_DIGESTS.get(h.hexdigest(), "default") or "default"
    kv = {
        "tokenizer.ggml.pre": (pre, "string"),
        "tokenizer.ggml.model": ("gpt2", "string"),
        "tokenizer.ggml.tokens": (toks, "array[string]"),
        "tokenizer.ggml.scores": (scores, "array[float32]"),
        "tokenizer.ggml.token_type": (types, "array[int32]"),
    }
    if merges:
        kv["tokenizer.ggml.merges"] = (merges, "array[string]")
    tc = json.loads((ckpt / "tokenizer_config.json").read_text()) if (ckpt / "tokenizer_config.json").is_file() else {}
    tmpl = tc.get("chat_template")
    if isinstance(tmpl, list):
        tmpl = next((e["template"] for e in tmpl if e.get("name") == "default"), None)
    if tmpl:
        kv["tokenizer.chat_template"] = (tmpl, "string")
    specials = {}
    for st in SPECIAL_TYPES:
        add = tc.get(f"add_{st}_token", False)
        content = tc.get(f"{st}_token")
        if isinstance(content, dict):
            content = content.get("content")
        if isinstance(content, str) and content in added:
            specials[st] = {"id": added[content]["id"], "add": bool(add), "ids": None}
    gen_path = ckpt / "generation_config.json"
    if eos_ids and gen_path.is_file():  # 333e36042: list values of <type>_token_id
        gen = json.loads(gen_path.read_text())
        for st in SPECIAL_TYPES:
            v = gen.get(f"{st}_token_id")
            if isinstance(v, list) and st in specials:
                specials[st]["ids"] = [int(x) for x in v]
    for st, sv in specials.items():
        key = SPECIAL_KEY[st]
        kv[f"tokenizer.ggml.add_{key}_token"] = (sv["add"], "bool")
        kv[f"tokenizer.ggml.{key}_token_id"] = (sv["id"], "uint32")
        if sv["ids"]:
            kv[f"tokenizer.ggml.{key}_token_ids"] = (sv["ids"], "array[int32]")
    return kv


# ---------------------------------------------------------------------------
# Metadata (convert_llama.go / convert_mllama.go KV)
# ---------------------------------------------------------------------------
def llama3_rope_factors(tc: dict) -> list[float] | None:
    """convert_llama.go llamaModel.KV: the rope_freqs.weight values for rope_type llama3, with its
    float64 wavelength and float32 thresholds / smoothing."""
    rs = tc.get("rope_scaling") or {}
    if rs.get("rope_type") != "llama3":
        return None
    hidden, heads = int(tc["hidden_size"]), int(tc["num_attention_heads"])
    theta = _f32(tc.get("rope_theta", 0))
    dim = hidden // heads
    factor = _f32(rs.get("factor") or 8.0)
    low = _f32(rs.get("low_freq_factor") or 1.0)
    high = _f32(rs.get("high_freq_factor") or 4.0)
    original = int(rs.get("original_max_position_embeddings") or 8192)
    lam_low = np.float32(original) / np.float32(low)
    lam_high = np.float32(original) / np.float32(high)
    out = []
    for i in range(0, dim, 2):
        lam = 2 * math.pi * math.pow(float(theta), float(i) / float(dim))
        if lam < float(lam_high):
            out.append(1.0)
        elif lam > float(lam_low):
            out.append(float(factor))
        else:
            smooth = (np.float32(original) / np.float32(lam) - np.float32(low)) / (np.float32(high) - np.float32(low))
            out.append(float(np.float32(1.0) / ((np.float32(1) - smooth) / np.float32(factor) + smooth)))
    return out


def ollama_kv(ck: dict, converter: str, with_vision_keys: bool = True) -> dict:
    cfg = ck["config"]
    tc, vc = cfg["text_config"], cfg["vision_config"]
    kv = {
        "general.architecture": ("mllama", "string"),
        "general.file_type": (1, "uint32"),
        "general.quantization_version": (2, "uint32"),
    }
    kv.update(ollama_tokenizer(ck["dir"], eos_ids=converter != "v0.7.0"))
    P = "mllama."
    kv[P + "vocab_size"] = (int(tc["vocab_size"]), "uint32")
    kv[P + "block_count"] = (int(tc["num_hidden_layers"]), "uint32")
    if tc.get("max_position_embeddings"):
        kv[P + "context_length"] = (int(tc["max_position_embeddings"]), "uint32")
    kv[P + "embedding_length"] = (int(tc["hidden_size"]), "uint32")
    kv[P + "feed_forward_length"] = (int(tc["intermediate_size"]), "uint32")
    kv[P + "attention.head_count"] = (int(tc["num_attention_heads"]), "uint32")
    kv[P + "rope.dimension_count"] = (int(tc["hidden_size"]) // int(tc["num_attention_heads"]), "uint32")
    if tc.get("head_dim"):
        kv[P + "attention.head_dim"] = (int(tc["head_dim"]), "uint32")
        kv[P + "attention.key_length"] = (int(tc["head_dim"]), "uint32")
        kv[P + "attention.value_length"] = (int(tc["head_dim"]), "uint32")
    if tc.get("rope_theta", 0) > 0:
        kv[P + "rope.freq_base"] = (_f32(tc["rope_theta"]), "float32")
    rs = tc.get("rope_scaling") or {}
    if rs.get("type") == "linear":
        kv[P + "rope.scaling.type"] = ("linear", "string")
        kv[P + "rope.scaling.factor"] = (_f32(rs.get("factor", 0)), "float32")
    if tc.get("num_key_value_heads"):
        kv[P + "attention.head_count_kv"] = (int(tc["num_key_value_heads"]), "uint32")
    if tc.get("rms_norm_eps"):
        kv[P + "attention.layer_norm_rms_epsilon"] = (_f32(tc["rms_norm_eps"]), "float32")
    kv[P + "attention.cross_attention_layers"] = ([int(i) for i in tc["cross_attention_layers"]], "array[int32]")
    if with_vision_keys:
        kv.update(vision_kv(vc))
    return kv


def vision_kv(vc: dict, num_channels: bool = True) -> dict:
    V = "mllama.vision."
    kv = {
        V + "block_count": (int(vc["num_hidden_layers"]), "uint32"),
        V + "global.block_count": (int(vc["num_global_layers"]), "uint32"),
        V + "intermediate_layers_indices": ([int(i) for i in vc["intermediate_layers_indices"]], "array[int32]"),
        V + "embedding_length": (int(vc["hidden_size"]), "uint32"),
        V + "feed_forward_length": (int(vc["intermediate_size"]), "uint32"),
        V + "attention.head_count": (int(vc["attention_heads"]), "uint32"),
        V + "attention.layer_norm_epsilon": (_f32(vc["norm_eps"]), "float32"),
        V + "image_size": (int(vc["image_size"]), "uint32"),
        V + "patch_size": (int(vc["patch_size"]), "uint32"),
        V + "max_num_tiles": (int(vc["max_num_tiles"]), "uint32"),
    }
    if num_channels:
        kv[V + "num_channels"] = (int(vc["num_channels"]), "uint32")
    return kv


# ---------------------------------------------------------------------------
# Tensors (convert_llama.go / convert_mllama.go Tensors, repack; reader.go Kind)
# ---------------------------------------------------------------------------
def repack_heads(w: np.ndarray, heads: int) -> np.ndarray:
    """llamaModel.repack / mllamaModel.repack for attn_q/attn_k: reshape [heads, 2, rows/heads/2,
    cols], transpose axes (0, 2, 1, 3), reshape back."""
    rows = w.shape[0]
    axes = (0, 2, 1) + tuple(range(3, w.ndim + 2))
    return np.ascontiguousarray(w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(axes).reshape(w.shape))


ALWAYS_F32 = (
    "token_types.weight",
    "v.positional_embedding_vlm",
    "v.tile_position_embd.weight",
    "v.pre_tile_position_embd.weight",
    "v.post_tile_position_embd.weight",
)


def kind(name: str, shape, position_embd_f32: bool) -> str:
    """reader.go tensorBase.Kind: "f32" or "f16" (F32 sources)."""
    f32 = ALWAYS_F32 + (("v.position_embd.weight",) if position_embd_f32 else ())
    if name.endswith((".ffn_gate_inp.weight", ".bias")) or name in f32:
        return "f32"
    return "f32" if len(shape) == 1 else "f16"


def ollama_tensors(ck: dict, converter: str, bug: str | None = None) -> list[tuple[str, np.ndarray]]:
    """(name, float32 values in numpy shape) in mllamaModel.Tensors' order: vision first, then
    the text model's (rope_freqs first). Kinds are assigned at write time."""
    cfg = ck["config"]
    tc, vc = cfg["text_config"], cfg["vision_config"]
    H, Hkv, Hv = (
        int(tc["num_attention_heads"]),
        int(tc.get("num_key_value_heads") or tc["num_attention_heads"]),
        int(vc["attention_heads"]),
    )
    renamed = [(go_replace(k, MLLAMA_REPLACEMENTS), np.asarray(v, dtype=np.float32)) for k, v in ck["tensors"].items()]
    vision, text, out = [], [], []
    for name, t in renamed:
        (text if not name.startswith(("v.", "mm.")) else vision).append((name, t))
    tanh = lambda a: np.tanh(a).astype(np.float32)  # noqa: E731
    for name, t in vision:
        if name == "v.position_embd.gate":
            pos = tanh(t) if bug == "position_gate_tanh" else (np.float32(1) - tanh(t)).astype(np.float32)
            out += [("v.position_embd.gate", pos), ("v.tile_position_embd.gate", tanh(t))]
        elif name in ("v.pre_tile_position_embd.gate", "v.post_tile_position_embd.gate"):
            out.append((name, tanh(t)))
        elif name.endswith(("attn_q.weight", "attn_k.weight")):
            out.append((name, repack_heads(t, Hv) if converter == "v0.7.1" else t))  # adff143bc
        elif name.endswith(("attn_gate", "ffn_gate")):
            out.append((name, tanh(t) if converter == "v0.7.1" else t))  # adff143bc
        else:
            out.append((name, t))
    factors = llama3_rope_factors(tc)
    if factors is not None:
        out.append(("rope_freqs.weight", np.asarray(factors, dtype=np.float32)))
    cross = converter != "v0.7.0"  # 55760195e added the cross-attention names to the repack
    q_names = ("attn_q.weight",) + (("attn_q_proj.weight",) if cross else ())
    k_names = ("attn_k.weight",) + (("attn_k_proj.weight",) if cross else ())
    for name, t in text:
        if name.endswith(q_names):
            t = repack_heads(t, H)
        elif name.endswith(k_names):
            t = repack_heads(t, Hkv)
        elif bug == "norms_permuted" and name.endswith(("cross_attn_q_norm.weight", "cross_attn_k_norm.weight")):
            t = repack_heads(t, 1)
        out.append((name, t))
    return out


# ---------------------------------------------------------------------------
# Quantization (server/quantization.go), optional
# ---------------------------------------------------------------------------
def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quant_types(names_shapes, ftype: str) -> dict:
    """{name: "q4_k"|"q6_k"|...} for the tensors quantize() changes (newType / getTensorNewType,
    Q4_K_M only; the published llama3.2-vision text weights). Iterates in file order, as the
    Go code's attn_v / ffn_down counters do."""
    assert ftype == "q4_k_m"
    n_attn_v = sum("attn_v.weight" in n for n, _ in names_shapes)
    n_ffn_down = len({n.split(".")[1] for n, _ in names_shapes if n.startswith("blk.")})  # layerCount
    has_output = any(n == "output.weight" for n, _ in names_shapes)
    i_attn_v = i_ffn_down = 0
    out = {}
    for name, shape in names_shapes:
        q = name.endswith("weight") and not name.startswith(("v.", "a.")) and "mm." not in name and len(shape) >= 2
        q = q and "_norm.weight" not in name and name != "position_embd.weight"
        if not q:
            continue
        t = "q4_k"
        if name in ("output.weight", "output_norm.weight") or (not has_output and name == "token_embd.weight"):
            t = "q6_k" if shape[-1] % 256 == 0 else "q8_0"
        elif "attn_v.weight" in name:
            if _use_more_bits(i_attn_v, n_attn_v):
                t = "q6_k"
            i_attn_v += 1
        elif "ffn_down" in name:
            if _use_more_bits(i_ffn_down, n_ffn_down):
                t = "q6_k"
            i_ffn_down += 1
        block = {"q4_k": 256, "q6_k": 256, "q8_0": 32}
        if shape[-1] % block[t]:  # finalize: Q4_K -> Q5_0, Q6_K -> Q8_0, then F16 if still not a multiple
            if t == "q4_k":
                raise NotImplementedError("Q5_0 fallback (rows not a multiple of 256): use other test shapes")
            t = "q8_0" if t == "q6_k" else t
            if shape[-1] % block[t]:
                t = "f16"
        out[name] = t
    return out


# ---------------------------------------------------------------------------
# GGUF writing (fs/ggml/gguf.go WriteGGUF)
# ---------------------------------------------------------------------------
def _block(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else 1 << 62


def write_gguf(path, kv: dict, tensors: list[tuple[str, np.ndarray, str]]) -> Path:
    """kv {key: (value, type)}; tensors (name, float32 values, "f32"|"f16"|"q4_k"|"q6_k"|"q8_0")."""
    import gguf

    GT = gguf.GGUFValueType
    types = {"string": GT.STRING, "uint32": GT.UINT32, "float32": GT.FLOAT32, "bool": GT.BOOL, "int32": GT.INT32}
    path = Path(path)
    w = gguf.GGUFWriter(str(path), kv["general.architecture"][0])
    for key in sorted(kv):
        if key == "general.architecture":
            continue
        val, t = kv[key]
        if t.startswith("array["):
            sub = {"string": GT.STRING, "float32": GT.FLOAT32, "int32": GT.INT32, "uint32": GT.UINT32}[t[6:-1]]
            w.add_key_value(key, list(val), GT.ARRAY, sub_type=sub)
        else:
            w.add_key_value(key, val, types[t])
    qt = {
        "q4_k": gguf.GGMLQuantizationType.Q4_K,
        "q6_k": gguf.GGMLQuantizationType.Q6_K,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }
    for name, arr, k in sorted(tensors, key=lambda x: (_block(x[0]), x[0])):
        if k == "f32":
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif k == "f16":
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16))
        else:  # ggml-exact block quantizers (mllama_q.quants), from the F16 values as Ollama quantizes
            from mllama_q import quants

            src = np.ascontiguousarray(arr.astype(np.float16).astype(np.float32))
            w.add_tensor(name, quants.quantize(src, k), raw_dtype=qt[k])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_one_file(
    ckpt,
    out,
    converter: str = "v0.7.1",
    position_embd_f32: bool = False,
    quantize: str | None = None,
    bug: str | None = None,
) -> Path:
    """One Ollama llama3.2-vision blob from a Hugging Face checkpoint directory (F32 or F16 safetensors)."""
    assert converter in CONVERTERS and bug in BUGS
    ck = read_checkpoint(ckpt)
    kv = ollama_kv(ck, converter)
    ts = ollama_tensors(ck, converter, bug)
    kinds = {n: kind(n, t.shape, position_embd_f32) for n, t in ts}
    if quantize:
        kinds.update(quant_types([(n, t.shape) for n, t in sorted(ts, key=lambda x: (_block(x[0]), x[0]))], quantize))
        kv["general.file_type"] = (15, "uint32")  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    return write_gguf(out, kv, [(n, t, kinds[n]) for n, t in ts])


def write_two_files(
    ckpt, text_out, projector_out, quantize: str | None = None, bug: str | None = None
) -> tuple[Path, Path]:
    """The Ollama v0.4 - v0.6 pair: text blob + projector blob (see the module doc)."""
    assert bug in BUGS
    ck = read_checkpoint(ckpt)
    cfg = ck["config"]
    ts = ollama_tensors(ck, "v0.7.1", bug if bug != "fc_not_swapped" else None)
    text = [(n, t) for n, t in ts if not n.startswith(("v.", "mm."))]
    vision = [(n, t) for n, t in ts if n.startswith(("v.", "mm."))]
    kv = ollama_kv(ck, "v0.7.1", with_vision_keys=False)
    kinds = {n: kind(n, t.shape, False) for n, t in text}
    if quantize:
        kinds.update(quant_types([(n, t.shape) for n, t in sorted(text, key=lambda x: (_block(x[0]), x[0]))], quantize))
        kv["general.file_type"] = (15, "uint32")
    write_gguf(text_out, kv, [(n, t, kinds[n]) for n, t in text])

    renames = dict(PROJECTOR_LAYER_RENAMES)
    if bug == "fc_not_swapped":
        renames.update(ffn_up="ffn_up", ffn_down="ffn_down")
    proj = []
    for n, t in vision:
        m = re.match(r"^(v\.(?:global\.)?blk\.\d+\.)(" + "|".join(PROJECTOR_LAYER_RENAMES) + r")\.(weight|bias)$", n)
        if m:
            n = f"{m.group(1)}{renames[m.group(2)]}.{m.group(3)}"
        proj.append((n, t, "f32" if len(t.shape) == 1 or n in ALWAYS_F32 else "f16"))
    pkv = {
        "general.architecture": ("mllama", "string"),
        "general.file_type": (1, "uint32"),
        "general.description": ("vision encoder for Mllama", "string"),
        "mllama.vision.projection_dim": (int(cfg["text_config"]["hidden_size"]), "uint32"),
    }
    pkv.update(vision_kv(cfg["vision_config"], num_channels=False))
    write_gguf(projector_out, pkv, proj)
    return Path(text_out), Path(projector_out)


# ---------------------------------------------------------------------------
# A fake Ollama store (manifest/manifest.go WriteManifest, manifest/layer.go NewLayer)
# ---------------------------------------------------------------------------
MEDIA = {
    "model": "application/vnd.ollama.image.model",
    "projector": "application/vnd.ollama.image.projector",
    "template": "application/vnd.ollama.image.template",
    "params": "application/vnd.ollama.image.params",
    "system": "application/vnd.ollama.image.system",
    "license": "application/vnd.ollama.image.license",
}


def add_blob(root, data_or_path) -> tuple[str, int]:
    """Store bytes (or a file, hard-linked or copied) as blobs/sha256-<hex>; (digest, size)."""
    blobs = Path(root) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if isinstance(data_or_path, (bytes, bytearray)):
        digest = hashlib.sha256(data_or_path).hexdigest()
        (blobs / f"sha256-{digest}").write_bytes(data_or_path)
        return digest, len(data_or_path)
    src = Path(data_or_path)
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    dst = blobs / f"sha256-{digest}"
    if not dst.exists():
        try:
            dst.hardlink_to(src)
        except OSError:
            shutil.copyfile(src, dst)
    return digest, src.stat().st_size


def make_store(
    root,
    model_name: str,
    tag: str = "latest",
    *,
    model,
    projector=None,
    params: dict | None = None,
    template: str | None = None,
    system: str | None = None,
    license: str | None = None,
    family: str = "mllama",
    file_type: str = "F16",
    host: str = "registry.ollama.ai",
    namespace: str = "library",
) -> Path:
    """Write blobs + manifests/<host>/<namespace>/<model>/<tag> the way `ollama pull` leaves them."""
    root = Path(root)
    layers = []
    for kind_, content in (
        ("model", model),
        ("projector", projector),
        ("template", template),
        ("system", system),
        ("params", None if params is None else json.dumps(params)),
        ("license", license),
    ):
        if content is None:
            continue
        data = content.encode() if isinstance(content, str) and kind_ != "model" and kind_ != "projector" else content
        digest, size = add_blob(root, data)
        layers.append({"mediaType": MEDIA[kind_], "digest": f"sha256:{digest}", "size": size})
    config = json.dumps(
        {
            "model_format": "gguf",
            "model_family": family,
            "model_families": [family],
            "model_type": "tiny",
            "file_type": file_type,
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [la["digest"] for la in layers]},
        }
    ).encode()
    cdigest, csize = add_blob(root, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": f"sha256:{cdigest}",
            "size": csize,
        },
        "layers": layers,
    }
    mpath = root / "manifests" / host / namespace / model_name / tag
    mpath.parent.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(manifest))
    return mpath
