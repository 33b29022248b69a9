"""An Ollama llama3.2-vision blob (or two-file pair) -> one mllama-q GGUF, without the HF checkpoint.

    from mllama_q.convert.from_ollama import convert_from_ollama
    convert_from_ollama("llama3.2-vision", "llama-3.2-11b-vision.gguf", vision_type="q8_0")

or `mllama-q convert --from-ollama NAME -o OUT.gguf [--vision-type q8_0]`.

Why: Ollama never quantized the vision tower (server/quantization.go skips v.* / mm.*), so its
blobs carry it in F16 (1.8 GB for 11B); Q8_0 halves that memory and the CPU encodes an image
faster with it on AVX-512 (bench/results/2026-12-03-epyc-zen5-2c-ollama.md). The text
weights are copied byte for byte.

What is written: the file as mllama-q's loader sees it after undoing Ollama's layout
(mllama_q.ollama.apply_layout: cross-attention norms permuted like their q/k rows, vision gates
tanh'd, a projector's names and fc1/fc2 order put right), so the result is an ordinary mllama-q
file: `mllama_q.*` keys for the format version, image token, stop ids (Ollama's eos list, or
the published three) and RoPE (rope_freqs.weight always present: Ollama's, else its linear
factor or ones, so no 11B default can be assumed by mistake), add_bos_token true (what the
checkpoint's tokenizer does; Ollama wrote false), v.position_embd.weight F32. Image
preprocessing keys are left out: the loader then uses the 11B/90B published values, as it does
for the Ollama file itself. Streaming: one tensor in memory at a time.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from mllama_q import gguf_keys as K

from .errors import ConvertError

# Tensors of the vision tower that keep their type (gguf_keys: conv kernel, F32 tables).
_KEEP = (K.V_PATCH_EMBD, K.V_TILE_POS_EMBD, K.V_PRE_TILE_EMBD, K.V_POST_TILE_EMBD)
_DROP_KEYS = (
    "GGUF.",
    K.GENERAL_ARCHITECTURE,
    K.TOKENIZER_ADD_BOS,
    K.OLLAMA_EOS_TOKEN_IDS,
    K.OLLAMA_ROPE_SCALING_TYPE,
    K.OLLAMA_ROPE_SCALING_FACTOR,
    K.GENERAL_DESCRIPTION,
)


def _floats(arr, gtype: int, shape) -> np.ndarray:
    """float32 values of a tensor entry (F32 / F16 / BF16 arrays, or block bytes)."""
    from mllama_q import quants

    if gtype == K.GGMLType.F32:
        return np.asarray(arr, dtype=np.float32).reshape(shape)
    if gtype == K.GGMLType.F16:
        return np.asarray(arr).astype(np.float32).reshape(shape)
    if gtype == K.GGMLType.BF16:
        return (np.asarray(arr).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return quants.dequantize(np.ascontiguousarray(arr), K.QUANT_NAME[K.GGMLType(gtype)], shape)


def _out_type(name: str, gtype: int, shape, vision_type: str) -> K.GGMLType:
    if not name.startswith(("v.", "mm.")) or name in _KEEP or len(shape) < 2:
        return K.GGMLType(gtype)
    if name == K.V_POS_EMBD:
        return K.GGMLType.F32
    return K.tensor_type("vision", "", int(shape[-1]), "f16", vision_type)


def convert_from_ollama(
    source,
    out_path,
    vision_type: str = "q8_0",
    *,
    projector=None,
    ollama_converter: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Convert `source` (an Ollama model name, or a blob path; `projector` for a two-file pair
    given by path) to `out_path`; returns a summary dict. Raises ConvertError."""
    import gguf
    from gguf import GGUFValueType as VT
    from tqdm import tqdm

    from mllama_q import ollama
    from mllama_q.generate import stop_ids_from_gguf
    from mllama_q.gguf_file import ModelFileError, check_architecture, field_value, open_gguf
    from mllama_q.model import text_hparams, vision_hparams
    from mllama_q.store import resolve_model
    from mllama_q.tokenizer import Tokenizer

    from .converter import check_output_path, encode, write_gguf

    if vision_type not in K.VISION_TYPES:
        raise ConvertError(f"unknown --vision-type {vision_type!r}; expected one of {', '.join(K.VISION_TYPES)}")
    out_path = check_output_path(out_path, force)
    t0 = time.perf_counter()
    try:
        path, found, _ = resolve_model(source)
        f = open_gguf(path)
        check_architecture(f, path)
        entries = ollama.tensor_entries(f)
        with warnings.catch_warnings():  # an assumed converter generation is reported in the summary
            warnings.simplefilter("ignore", ollama.OllamaLayoutWarning)
            layout = ollama.detect_layout(f, path, entries, projector=projector or found, converter=ollama_converter)
        if layout.kind == ollama.OURS:
            raise ConvertError(f"{path} is already mllama-q's layout: nothing to convert")
        thp = text_hparams(f, path)
        vf, vpath, vnames = f, path, entries
        if layout.projector_reader is not None:
            vf, vpath, vnames = layout.projector_reader, layout.projector_path, layout.projector_tensors
        if not any(n.startswith(ollama.VISION_PREFIXES) for n in vnames):
            raise ConvertError(f"{path}: no vision tower; {layout.no_vision_hint()}")
        vhp = vision_hparams(vf, vpath, thp["hidden_size"])
        tensors = dict(entries)
        ollama.apply_layout(layout, f, tensors, thp, vhp)
        hd = thp["head_dim"]
        if K.ROPE_FREQS not in tensors:
            div = ollama.rope_divisors(f, tensors, hd).astype(np.float32)
            tensors[K.ROPE_FREQS] = (div, int(K.GGMLType.F32), (hd // 2,))
        tok = Tokenizer.from_gguf(f)
        stop = ollama.frontend(layout, f, tok, stop_ids_from_gguf(f, tok))
    except ModelFileError as e:
        raise ConvertError(str(e)) from None

    w = gguf.GGUFWriter(None, K.ARCH)
    # Metadata copied with its GGUF types: gguf-py reads them (the converter's GGUF library).
    for src_path in (path, vpath) if vpath != path else (path,):
        for key, field in gguf.GGUFReader(str(src_path)).fields.items():
            if key.startswith(_DROP_KEYS) or key == K.OLLAMA_V_PROJECTION_DIM or key in w.kv_data[0]:
                continue
            vt = field.types[0]
            w.add_key_value(key, field.contents(), vt, sub_type=field.types[-1] if vt == VT.ARRAY else None)
    if field_value(vf, K.V_NUM_CHANNELS) is None:
        w.add_uint32(K.V_NUM_CHANNELS, vhp["num_channels"])
    w.add_bool(K.TOKENIZER_ADD_BOS, True)
    w.add_uint32(K.Q_FORMAT_VERSION, K.FORMAT_VERSION)
    image_id = tok.token_to_id("<|image|>")
    w.add_uint32(K.Q_IMAGE_TOKEN_ID, int(image_id if image_id is not None else thp["vocab_size"]))
    w.add_key_value(K.Q_STOP_TOKEN_IDS, [int(i) for i in stop], VT.ARRAY, sub_type=VT.INT32)
    d = K.DEFAULTS_11B
    llama3 = K.rope_freqs_llama3(
        hd,
        float(field_value(f, K.ROPE_FREQ_BASE)),
        d[K.Q_ROPE_SCALING_FACTOR],
        d[K.Q_ROPE_SCALING_LOW_FREQ_FACTOR],
        d[K.Q_ROPE_SCALING_HIGH_FREQ_FACTOR],
        d[K.Q_ROPE_SCALING_ORIG_CTX],
    )
    rope = np.asarray(tensors[K.ROPE_FREQS][0], dtype=np.float32).reshape(-1)
    if rope.shape == llama3.shape and np.array_equal(rope, llama3):
        w.add_string(K.Q_ROPE_SCALING_TYPE, "llama3")
        for key in (K.Q_ROPE_SCALING_FACTOR, K.Q_ROPE_SCALING_LOW_FREQ_FACTOR, K.Q_ROPE_SCALING_HIGH_FREQ_FACTOR):
            w.add_float32(key, float(d[key]))
        w.add_uint32(K.Q_ROPE_SCALING_ORIG_CTX, int(d[K.Q_ROPE_SCALING_ORIG_CTX]))
    else:  # the divisors are in rope_freqs.weight (linear scaling, plain RoPE, other factors)
        w.add_string(K.Q_ROPE_SCALING_TYPE, "none")
    w.add_uint32(K.Q_V_PROJECTION_DIM, thp["hidden_size"])
    w.add_uint32(K.Q_V_OUTPUT_DIM, vhp["hidden_size"] * (1 + len(vhp["intermediate_layers"])))

    plan = []  # (name, out type, shape, entry)
    for name, (arr, gtype, shape) in tensors.items():
        plan.append((name, _out_type(name, gtype, shape, vision_type), tuple(shape), (arr, gtype, shape)))
    for name, t, shape, _ in plan:
        w.add_tensor_info(name, shape, np.dtype(np.float32), K.nbytes(t, shape), raw_dtype=t)
    total = sum(K.nbytes(t, shape) for _, t, shape, _ in plan)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        desc="convert --from-ollama",
        dynamic_ncols=True,
    )
    bytes_in = 0

    def write_data(fout):
        nonlocal bytes_in
        for _name, t, shape, (arr, gtype, _) in plan:
            w.write_padding(fout, fout.tell())
            if t == gtype:  # copied as stored (the text weights: byte for byte)
                a = np.asarray(arr)
                rows = max(1, (64 << 20) // max(1, a.nbytes // max(1, len(a))))
                for r in range(0, len(a), rows):
                    fout.write(memoryview(np.ascontiguousarray(a[r : r + rows])).cast("B"))
            else:
                vals = _floats(arr, gtype, shape)
                data = encode(vals, t, int(shape[-1]))
                fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            bytes_in += np.asarray(arr).nbytes
            w.write_padding(fout, K.nbytes(t, shape))
            bar.update(K.nbytes(t, shape))

    try:
        out_bytes = write_gguf(w, out_path, write_data)
    finally:
        bar.close()
    return {
        "tensors": len(plan),
        "bytes_in": bytes_in,
        "bytes_out": out_bytes,
        "seconds": time.perf_counter() - t0,
        "vision_type": vision_type,
        "layout": layout.describe(),
        "output": str(out_path),
    }
