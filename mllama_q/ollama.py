"""Files Ollama wrote for llama3.2-vision: which layout a GGUF is in, and what load undoes.

Ollama published Llama 3.2 Vision in two GGUF layouts. Everything below was read in
ollama/ollama's Go source (the mllama code was removed in 9db4bdbad, first tag v0.30.0;
"9db4bdbad^" is the last commit that has it):

ONE FILE (Ollama v0.7.0 - v0.24.0; PR #10637, commit 23125648b, 2025-05-13). Text and vision in
  one blob with mllama-q's tensor and key names (mllama_q.gguf_keys, which was modelled on it)
  but none of the `mllama_q.*` keys. Written by convert/convert_mllama.go + convert_llama.go;
  its converter changed in May 2025, so one-file blobs come in three generations:

    name        converter from      cross-attn q/k rows        vision global attn/ffn gates
    v0.7.0      23125648b 05-13     HF order (not permuted)    raw g (a bug: runtime multiplied)
    v0.7.1-rc0  55760195e 05-15     permuted (convert_llama)   raw g
    v0.7.1      adff143bc 05-22     permuted                   tanh(g)   (v0.7.1-rc1 ... v0.24)

  All of them left cross_attn_q_norm / k_norm in HF order (convert_mllama.go never touches
  them), stored the text cross-attention gates raw (model_text.go applies Tanh), wrote
  v.position_embd.gate = 1 - tanh(g) and a copy v.tile_position_embd.gate = tanh(g), and
  stored pre/post tile gates as tanh(g). `tokenizer.ggml.eos_token_ids` exists only from
  333e36042 (2025-05-16; convert/tokenizer.go reads generation_config.json's eos list).

TWO FILES (Ollama v0.4 - v0.6). A text "model" blob read by llama.cpp with Ollama's
  llama/patches/0006-add-mllama-support.patch (same text names as the one-file blob, no
  mllama.vision.* keys, token_embd n_vocab + 8 rows) plus a "projector" blob (media type
  application/vnd.ollama.image.projector) read by llama/mllama.cpp (both at 23125648b^): keys
  mllama.vision.* with projection_dim and general.description; per layer ln1 / ln2 / attn_out,
  ffn_down = fc1 (applied first) and ffn_up = fc2, gates multiplied as stored. Ollama's
  repository never held the writer of these blobs; their text half is taken to follow the same
  convention as the one-file text part (cross-attention q/k permuted, norms not), which is what
  55760195e says it restored ("cross attention Q and K projections needs to have their heads
  swapped, similar to non-cross attention Q and K tensors"). That cannot be checked without the
  published blob and is the one assumption here (Layout.assumed is True for such pairs).

What load does for an Ollama file (so the maths equals transformers'):
  * permutes cross_attn_q_norm / k_norm like the q/k rows when the rows were permuted
    (gguf_keys.permute_head_vector); leaves them when they were not (v0.7.0);
  * tanh() of the vision global gates for v0.7.0 / v0.7.1-rc0 files;
  * renames the projector's tensors to ours, swapping ffn_down / ffn_up back;
  * RoPE: rope_freqs.weight if present, else the linear mllama.rope.scaling.* keys, else plain
    RoPE (convert_llama.go writes the tensor exactly when config.json asks for llama3 scaling);
  * adds BOS on encode (Ollama wrote add_bos_token only from tokenizer_config.json, false when
    it is absent, as it is for the published checkpoints, whose tokenizer adds BOS through its
    post-processor), stops on eos_token_id + eos_token_ids (model/models/mllama/model.go), or on
    the published checkpoints' three stop tokens when the file has no list.

Which one-file generation a blob is cannot always be read off the file: eos_token_ids present
proves a converter >= 333e36042 (so q/k permuted); a vision global gate outside (-1, 1) proves
raw gates (tanh(g) never is). A blob with neither (e.g. one `ollama create`d on v0.7.0, or on a
later version from a checkpoint whose generation_config.json has a single eos id) is loaded as
the current generation with an OllamaLayoutWarning; `Model(..., ollama_converter="v0.7.0")`
overrides. Gate values alone cannot settle it because tanh(g) and a raw g in (-1, 1) look alike,
and the norm permutation is a relabelling that keeps every weight plausible.

The functions here take a GGUF reader only through gguf_file.field_value and tensors as the
{name: (array, ggml_type, numpy_shape)} dict model.py hands to the core, so they do not depend
on which GGUF reader is underneath. Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import gguf_keys as K
from .gguf_file import ModelFileError, check_tensor_types, field_value, open_gguf, tensor_entry

OURS = "mllama-q"  # mllama_q.format_version present
ONE_FILE = "ollama"  # Ollama v0.7+: one blob
TWO_FILE = "ollama-v0.4"  # Ollama v0.4 - v0.6: text blob (+ projector blob)
VISION_PREFIXES = K.VISION_PREFIXES

# The published checkpoints' generation_config.json eos_token_id [128001, 128008, 128009], by
# token text so that any vocabulary size resolves them.
PUBLISHED_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


@dataclass(frozen=True)
class Converter:
    """One generation of Ollama's one-file converter (see the module doc)."""

    name: str
    since: str
    xattn_qk_permuted: bool
    vision_gates_tanh: bool


CONVERTERS = {
    c.name: c
    for c in (
        Converter("v0.7.0", "23125648b (2025-05-13)", xattn_qk_permuted=False, vision_gates_tanh=False),
        Converter("v0.7.1-rc0", "55760195e (2025-05-15)", xattn_qk_permuted=True, vision_gates_tanh=False),
        Converter("v0.7.1", "adff143bc (2025-05-22)", xattn_qk_permuted=True, vision_gates_tanh=True),
    )
}
LATEST = "v0.7.1"


class OllamaLayoutWarning(UserWarning):
    """An Ollama file whose converter generation had to be assumed."""


@dataclass
class Layout:
    """What a file (or a text + projector pair) is, and what load has to undo."""

    kind: str  # OURS | ONE_FILE | TWO_FILE
    evidence: str = ""  # why, in words (messages, `mllama-q list`)
    converter: str | None = None  # ONE_FILE: a CONVERTERS name
    assumed: bool = False  # the convention was assumed, not read off the file
    permute_xattn_norms: bool = False  # cross-attention q/k rows permuted, norms not
    tanh_vision_gates: bool = False  # vision global attn/ffn gates stored raw
    projector_path: str | None = None
    projector_reader: Any = None  # kept open: its tensor arrays are views of its mapping
    projector_tensors: dict | None = None

    @property
    def is_ollama(self) -> bool:
        return self.kind != OURS

    def describe(self) -> str:
        if self.kind == OURS:
            return f"mllama-q ({self.evidence})"
        if self.kind == ONE_FILE:
            return f"Ollama one-file, converter {self.converter}{' (assumed)' if self.assumed else ''}"
        return "Ollama two-file (text + projector)" if self.projector_path else "Ollama two-file text blob"

    def no_vision_hint(self) -> str:
        if self.kind == TWO_FILE:
            return (
                "it is the text blob of Ollama's two-file llama3.2-vision (v0.4 - v0.6): pass projector=PATH "
                "(the manifest's application/vnd.ollama.image.projector blob), load the model by its Ollama "
                "name, or use vision=False"
            )
        return "load it with vision=False"


def tensor_entries(f) -> dict:
    """{name: (array, ggml_type, numpy_shape)} of every tensor of a GGUFFile (views of the mapping, no copy)."""
    return {name: tensor_entry(t) for name, t in f.tensors.items()}


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------
_TEXT_KEYS = (K.BLOCK_COUNT, K.EMBEDDING_LENGTH, K.HEAD_COUNT, K.CROSS_ATTENTION_LAYERS)
_TEXT_TENSORS = (K.TOKEN_EMBD, K.OUTPUT_NORM, K.blk(K.ATTN_NORM, 0), K.blk(K.FFN_DOWN, 0))
_ONE_FILE_VISION = (
    K.V_PATCH_EMBD,
    K.vblk(K.V_ATTN_NORM_W, 0),
    K.vblk(K.V_ATTN_OUTPUT, 0),
    K.vblk(K.V_FFN_UP_W, 0),
    K.MM_PROJ_W,
)
_P0 = K.V_LOCAL_PREFIX.format(bid=0)
_PROJECTOR_TENSORS = (K.V_PATCH_EMBD, _P0 + "ln1.weight", _P0 + "attn_out.weight", _P0 + "ffn_down.weight", K.MM_PROJ_W)
_PROJECTOR_KEYS = (K.V_BLOCK_COUNT, K.V_EMBEDDING_LENGTH, K.V_HEAD_COUNT, K.OLLAMA_V_PROJECTION_DIM)
_PROJECTOR_LAYER = re.compile(
    r"^(v\.(?:global\.)?blk\.\d+\.)(" + "|".join(K.OLLAMA_PROJECTOR_LAYER_NAMES) + r")\.(weight|bias)$"
)
_PROJECTOR_BIAS = re.compile(
    "^(?:"
    + "|".join(
        re.escape(b).replace(re.escape("{p}"), r"v\.(?:global\.)?blk\.\d+\.") for b in K.OLLAMA_PROJECTOR_ATTN_BIASES
    )
    + ")$"
)


def _present(reader, tensors, keys, names) -> tuple[list[str], list[str]]:
    """(found, missing) among metadata `keys` and tensor `names`."""
    found, missing = [], []
    for k in keys:
        (found if field_value(reader, k) is not None else missing).append(k)
    for n in names:
        (found if n in tensors else missing).append(n)
    return found, missing


def _unknown(path, what: str, found, missing, tensors) -> ModelFileError:
    """The error for a file in no layout mllama-q knows: what was recognised, what is missing."""
    sample = [n for n in list(tensors)[:400] if n not in found][:4]
    return ModelFileError(
        f"{path}: {what}: not mllama-q's layout (no {K.Q_FORMAT_VERSION}) nor one of Ollama's llama3.2-vision "
        f"layouts. Recognised: {', '.join(found) or 'nothing'}; missing: {', '.join(missing)}"
        + (f"; its tensors are named like {', '.join(sample)}" if sample else "")
        + ". Convert the Hugging Face checkpoint with `mllama-q convert` instead."
    )


def detect_layout(reader, path, tensors: dict, projector=None, converter: str | None = None) -> Layout:
    """The layout of an mllama GGUF (already architecture-checked) and, with `projector`, the
    projector blob of a two-file pair, opened and checked here (kept open in the Layout).

    converter: None/"auto" or a CONVERTERS name, for Ollama one-file blobs (see the module doc).
    Raises ModelFileError (what was recognised, what is missing) for a file in no known layout.
    """
    if converter == "auto":
        converter = None
    if converter is not None and converter not in CONVERTERS:
        raise ValueError(f"ollama_converter must be 'auto' or one of {', '.join(CONVERTERS)}, got {converter!r}")
    version = field_value(reader, K.Q_FORMAT_VERSION)
    if version is not None:
        if projector is not None:
            raise ModelFileError(
                f"{path} is mllama-q's own layout, which holds the vision tower itself; "
                "projector= is only for Ollama's two-file llama3.2-vision"
            )
        if converter is not None:
            raise ValueError(f"ollama_converter= applies to files written by Ollama; {path} is mllama-q's own")
        return Layout(OURS, evidence=f"{K.Q_FORMAT_VERSION} = {version}")

    found, missing = _present(reader, tensors, _TEXT_KEYS, _TEXT_TENSORS)
    if missing:
        if not _present(reader, tensors, _PROJECTOR_KEYS, _PROJECTOR_TENSORS)[1]:
            raise ModelFileError(
                f"{path} is the projector (vision) blob of Ollama's two-file llama3.2-vision "
                "(v0.4 - v0.6): load the text model blob with projector= this file, or load "
                "the model by its Ollama name"
            )
        raise _unknown(path, "not a Llama 3.2 Vision text model", found, missing, tensors)

    if any(n.startswith(VISION_PREFIXES) for n in tensors):
        if projector is not None:
            raise ModelFileError(
                f"{path} already holds the vision tower (v.* tensors): projector= is only for the "
                "text blob of Ollama's two-file layout"
            )
        vf, vm = _present(reader, tensors, (), _ONE_FILE_VISION)
        if vm:
            raise _unknown(path, "unknown vision tower naming", found + vf, vm, tensors)
        return _one_file(reader, path, tensors, converter)

    if converter is not None:
        raise ValueError("ollama_converter= applies to Ollama's one-file blobs; this is a two-file text blob")
    if projector is None:
        return Layout(
            TWO_FILE,
            evidence="no vision tensors and no mllama_q keys: a two-file text blob (or a text-only file)",
            permute_xattn_norms=True,
            assumed=True,
        )
    ppath = str(projector)
    preader = open_gguf(ppath)
    check_tensor_types(preader)
    ptensors = tensor_entries(preader)
    _check_projector(preader, ppath, ptensors)
    return Layout(
        TWO_FILE,
        evidence=f"text blob + projector {ppath}",
        permute_xattn_norms=True,
        assumed=True,
        projector_path=ppath,
        projector_reader=preader,
        projector_tensors=ptensors,
    )


def _gate_values(tensors: dict) -> list[float]:
    """The stored vision global-layer gates (1-element F32 tensors), for the raw-vs-tanh test."""
    out = []
    for name, (arr, gtype, shape) in tensors.items():
        if (
            name.startswith(K.V_GLOBAL_PREFIX.split("{")[0])
            and name.endswith(("attn_gate", "ffn_gate"))
            and gtype == int(K.GGMLType.F32)
            and int(np.prod(shape)) == 1
        ):
            out.append(float(np.asarray(arr).reshape(-1)[0]))
    return out


def _one_file(reader, path, tensors, converter: str | None) -> Layout:
    has_eos_ids = field_value(reader, K.OLLAMA_EOS_TOKEN_IDS) is not None
    raw = [g for g in _gate_values(tensors) if not abs(g) < 1.0]  # tanh(g) lies strictly inside (-1, 1)
    assumed = False
    if converter is not None:
        evidence = f"ollama_converter={converter!r} given"
    elif raw:
        converter = "v0.7.1-rc0" if has_eos_ids else "v0.7.0"
        evidence = f"vision global gate {raw[0]:+.3f} is outside (-1, 1): stored raw (converter before adff143bc); " + (
            f"{K.OLLAMA_EOS_TOKEN_IDS} present: 333e36042 or later"
            if has_eos_ids
            else f"no {K.OLLAMA_EOS_TOKEN_IDS}: before 333e36042"
        )
    elif has_eos_ids:
        converter = LATEST
        evidence = f"{K.OLLAMA_EOS_TOKEN_IDS} present (converter 333e36042 or later) and every vision gate in (-1, 1)"
    else:
        converter, assumed = LATEST, True
        evidence = f"no {K.OLLAMA_EOS_TOKEN_IDS} and every vision gate in (-1, 1): generation assumed"
        warnings.warn(
            f"{path}: an Ollama llama3.2-vision blob without {K.OLLAMA_EOS_TOKEN_IDS}: loaded as written by Ollama "
            f"{LATEST} or later (cross-attention q/k permuted, vision gates tanh'd). If it was created with "
            "`ollama create` on Ollama v0.7.0, load it with ollama_converter='v0.7.0' (CLI: --ollama-converter "
            "v0.7.0).",
            OllamaLayoutWarning,
            stacklevel=4,
        )
    c = CONVERTERS[converter]
    return Layout(
        ONE_FILE,
        evidence=evidence,
        converter=converter,
        assumed=assumed,
        permute_xattn_norms=c.xattn_qk_permuted,
        tanh_vision_gates=not c.vision_gates_tanh,
    )


def _check_projector(preader, ppath, ptensors) -> None:
    if any(n.startswith("blk.") or n == K.TOKEN_EMBD for n in ptensors):
        raise ModelFileError(f"{ppath}: given as the projector but it holds text tensors (token_embd, blk.*)")
    found, missing = _present(preader, ptensors, _PROJECTOR_KEYS, _PROJECTOR_TENSORS)
    if missing:
        if not _present(preader, ptensors, (), _ONE_FILE_VISION)[1]:
            raise ModelFileError(
                f"{ppath}: given as the projector but its vision tensors use the one-file naming; "
                "load a one-file blob alone"
            )
        raise _unknown(ppath, "not an Ollama llama3.2-vision projector", found, missing, ptensors)
    biases = [n for n in ptensors if _PROJECTOR_BIAS.match(n)]
    if biases:
        raise ModelFileError(
            f"{ppath}: attention biases ({biases[0]}, ...) that Llama 3.2 Vision does not have: "
            "not a llama3.2-vision projector mllama-q can run"
        )


# ---------------------------------------------------------------------------
# Transforms undone at load
# ---------------------------------------------------------------------------
def _f32_vector(tensors, name) -> np.ndarray:
    arr, gtype, shape = tensors[name]
    if gtype != int(K.GGMLType.F32) or len(shape) != 1:
        raise ModelFileError(f"tensor '{name}' must be a 1-D f32 vector")
    return np.asarray(arr, dtype=np.float32)


def permute_xattn_norms(tensors: dict, cross_layers) -> None:
    """Replace cross_attn_q_norm / k_norm (HF order) by copies permuted like the q/k rows
    (2 x head_dim floats per cross-attention layer), so the core's cross attention equals HF's."""
    for i in cross_layers:
        for key in (K.XATTN_Q_NORM, K.XATTN_K_NORM):
            name = K.blk(key, i)
            if name in tensors:  # else reported by the core with the tensor's name
                fixed = np.ascontiguousarray(K.permute_head_vector(_f32_vector(tensors, name)))
                tensors[name] = (fixed, tensors[name][1], tensors[name][2])


def _tanh_vision_gates(tensors: dict, n_global: int) -> None:
    for i in range(n_global):
        for key in (K.V_ATTN_GATE, K.V_FFN_GATE):
            name = K.vblk(key, i, True)
            if name in tensors:
                t = np.tanh(_f32_vector(tensors, name)).astype(np.float32)
                tensors[name] = (t, tensors[name][1], tensors[name][2])


def projector_tensors(ptensors: dict) -> dict:
    """The projector blob's tensors under mllama-q's names (ln1 -> attn_norm, ln2 -> ffn_norm,
    attn_out -> attn_output, ffn_down (fc1) -> ffn_up, ffn_up (fc2) -> ffn_down); gates and
    position tables keep their names and values (mllama.cpp multiplies them as stored)."""
    out = {}
    for name, entry in ptensors.items():
        m = _PROJECTOR_LAYER.match(name)
        if m:
            name = f"{m.group(1)}{K.OLLAMA_PROJECTOR_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
        out[name] = entry
    return out


def rope_divisors(reader, tensors: dict, head_dim: int) -> np.ndarray:
    """RoPE frequency divisors of an Ollama file without rope_freqs.weight: the linear
    mllama.rope.scaling.factor (convert_llama.go writes it for rope_scaling.type "linear"; the
    runtime scales positions by 1/factor, model_text.go newTextModel), else none (plain RoPE)."""
    kind = field_value(reader, K.OLLAMA_ROPE_SCALING_TYPE)
    if kind is None:
        return np.ones(head_dim // 2)
    if kind != "linear":
        raise ModelFileError(f"unsupported {K.OLLAMA_ROPE_SCALING_TYPE} {kind!r} (Ollama writes only 'linear')")
    factor = field_value(reader, K.OLLAMA_ROPE_SCALING_FACTOR)
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor) or factor <= 0:
        raise ModelFileError(f"{K.OLLAMA_ROPE_SCALING_FACTOR} must be a positive number, got {factor!r}")
    return np.full(head_dim // 2, float(factor))


def apply_layout(layout: Layout, reader, tensors: dict, thp: dict, vhp: dict | None) -> None:
    """Undo the layout's transforms in `tensors` (the dict handed to the core) and `thp`.

    vhp: the vision hyper-parameters when the vision tower is loaded (the projector's tensors
    are then added to `tensors` under mllama-q's names), else None."""
    if layout.kind == OURS:
        return
    if layout.permute_xattn_norms:
        permute_xattn_norms(tensors, thp["cross_attention_layers"])
    if vhp is not None:
        if layout.projector_tensors is not None:
            tensors.update(projector_tensors(layout.projector_tensors))
        if layout.tanh_vision_gates:
            _tanh_vision_gates(tensors, vhp["num_global_layers"])
    if K.ROPE_FREQS not in tensors:  # text_hparams assumed the 11B's llama3 scaling
        hd = thp["head_dim"]
        thp["rope_inv_freq"] = K.rope_inv_freq(
            hd, float(field_value(reader, K.ROPE_FREQ_BASE)), rope_divisors(reader, tensors, hd)
        )
    if layout.projector_reader is not None and vhp is not None:
        proj_dim = field_value(layout.projector_reader, K.OLLAMA_V_PROJECTION_DIM)
        if proj_dim != thp["hidden_size"]:
            raise ModelFileError(
                f"{layout.projector_path}: {K.OLLAMA_V_PROJECTION_DIM} = {proj_dim} but the text "
                f"model is {thp['hidden_size']} wide: the projector belongs to another model size"
            )


def frontend(layout: Layout, reader, tokenizer, stop_ids: list[int]) -> list[int]:
    """Tokenizer and stop-id conventions of an Ollama file (see the module doc); returns the
    stop ids. mllama-q's own files pass through unchanged."""
    if layout.kind == OURS or tokenizer is None:
        return stop_ids
    tokenizer.add_bos = True
    listed = field_value(reader, K.OLLAMA_EOS_TOKEN_IDS)
    if listed is None:
        extra = [tokenizer.token_to_id(t) for t in PUBLISHED_STOP_TOKENS]
        extra = [i for i in extra if i is not None]
    else:
        try:
            extra = [int(i) for i in np.asarray(listed).reshape(-1)]
        except (TypeError, ValueError):
            raise ModelFileError(f"metadata '{K.OLLAMA_EOS_TOKEN_IDS}' must be a list of token ids") from None
        bad = [i for i in extra if not 0 <= i < tokenizer.n_vocab]
        if bad:
            raise ModelFileError(
                f"metadata '{K.OLLAMA_EOS_TOKEN_IDS}' has ids {bad} outside the vocabulary of {tokenizer.n_vocab}"
            )
    return sorted(set(stop_ids) | set(extra))
