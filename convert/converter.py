"""HF Mllama checkpoint directory -> one GGUF file, streaming with bounded memory.

Flow: parse configs and safetensors headers -> plan (names, shapes, types,
transforms; every input tensor checked against config.json) -> GGUFWriter gets
all KV pairs and tensor infos, writes header + KV + tensor-info table -> tensor
data are streamed chunk by chunk (<= CHUNK_BYTES of float32 at a time): mmap the
rows, widen to float32, transform, quantize with the compiled core (all
threads, GIL released), append to the file. Nothing holds more than one chunk,
so peak RSS is about the interpreter + 2-3 chunks, whatever the model size.

The file is written as ".NAME.PID.tmp" beside the output and renamed only after
the last byte is flushed; any exception (incl. KeyboardInterrupt) removes it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from mllama_q import gguf_keys as K

from .errors import ConvertError
from .hf import Checkpoint, load_checkpoint
from .plan import CONST, ONE_MINUS_TANH, PERMUTE_QK, PERMUTE_VEC, TANH, Out, assign_types, build_plan, check_tensors
from .tokenizer import add_tokenizer_metadata

CHUNK_BYTES = 64 << 20  # float32 bytes per streamed chunk


def add_metadata(w, ck: Checkpoint, ftype: str) -> None:
    """All non-tokenizer KV pairs (see gguf_keys for each key)."""
    t, v, pp = ck.text, ck.vision, ck.preprocessor
    w.add_name(ck.dir.resolve().name)
    w.add_uint32(K.GENERAL_FILE_TYPE, int(K.FILE_TYPE[ftype]))
    w.add_uint32(K.GENERAL_QUANTIZATION_VERSION, 2)
    gen = ck.generation
    for key, name, cast in (
        (K.GENERAL_SAMPLING_TEMP, "temperature", float),
        (K.GENERAL_SAMPLING_TOP_P, "top_p", float),
        (K.GENERAL_SAMPLING_TOP_K, "top_k", int),
    ):
        if isinstance(gen.get(name), (int, float)) and not isinstance(gen.get(name), bool):
            (w.add_float32 if cast is float else w.add_int32)(key, cast(gen[name]))
    # Text.
    w.add_uint32(K.VOCAB_SIZE, t.vocab_size)
    w.add_uint32(K.BLOCK_COUNT, t.n_layer)
    w.add_uint32(K.CONTEXT_LENGTH, t.context_length)
    w.add_uint32(K.EMBEDDING_LENGTH, t.hidden)
    w.add_uint32(K.FEED_FORWARD_LENGTH, t.intermediate)
    w.add_uint32(K.HEAD_COUNT, t.n_head)
    w.add_uint32(K.HEAD_COUNT_KV, t.n_head_kv)
    w.add_uint32(K.ROPE_DIMENSION_COUNT, t.head_dim)
    w.add_float32(K.ROPE_FREQ_BASE, t.rope_theta)
    w.add_float32(K.RMS_EPS, t.rms_eps)
    _add_i32_array(w, K.CROSS_ATTENTION_LAYERS, t.cross_layers)
    # Vision.
    w.add_uint32(K.V_BLOCK_COUNT, v.n_layer)
    w.add_uint32(K.V_GLOBAL_BLOCK_COUNT, v.n_global)
    _add_i32_array(w, K.V_INTERMEDIATE_LAYERS, v.inter_layers)
    w.add_uint32(K.V_EMBEDDING_LENGTH, v.hidden)
    w.add_uint32(K.V_FEED_FORWARD_LENGTH, v.intermediate)
    w.add_uint32(K.V_HEAD_COUNT, v.n_head)
    w.add_float32(K.V_LN_EPS, v.norm_eps)
    w.add_uint32(K.V_IMAGE_SIZE, v.image_size)
    w.add_uint32(K.V_PATCH_SIZE, v.patch_size)
    w.add_uint32(K.V_MAX_NUM_TILES, v.max_tiles)
    w.add_uint32(K.V_NUM_CHANNELS, v.n_channels)
    # mllama_q extras.
    w.add_uint32(K.Q_FORMAT_VERSION, K.FORMAT_VERSION)
    w.add_uint32(K.Q_IMAGE_TOKEN_ID, ck.image_token_id)
    _add_i32_array(w, K.Q_STOP_TOKEN_IDS, ck.stop_ids)
    rs = t.rope_scaling
    w.add_string(K.Q_ROPE_SCALING_TYPE, rs["type"] if rs else "none")
    if rs:
        w.add_float32(K.Q_ROPE_SCALING_FACTOR, rs["factor"])
        w.add_float32(K.Q_ROPE_SCALING_LOW_FREQ_FACTOR, rs["low_freq_factor"])
        w.add_float32(K.Q_ROPE_SCALING_HIGH_FREQ_FACTOR, rs["high_freq_factor"])
        w.add_uint32(K.Q_ROPE_SCALING_ORIG_CTX, rs["original_context_length"])
    _add_i32_array(w, K.Q_V_ASPECT_RATIOS, [x for pair in v.aspect_ratios for x in pair])
    w.add_uint32(K.Q_V_OUTPUT_DIM, v.output_dim)
    w.add_uint32(K.Q_V_PROJECTION_DIM, t.hidden)
    w.add_uint32(K.Q_IMG_TILE_SIZE, pp["tile_size"])
    w.add_uint32(K.Q_IMG_MAX_TILES, int(pp["max_image_tiles"]))
    w.add_array(K.Q_IMG_MEAN, [float(x) for x in pp["image_mean"]])
    w.add_array(K.Q_IMG_STD, [float(x) for x in pp["image_std"]])
    w.add_float32(K.Q_IMG_RESCALE_FACTOR, float(pp["rescale_factor"]))
    w.add_uint32(K.Q_IMG_RESAMPLE, int(pp["resample"]))
    w.add_bool(K.Q_IMG_DO_CONVERT_RGB, bool(pp["do_convert_rgb"]))
    w.add_bool(K.Q_IMG_DO_RESIZE, bool(pp["do_resize"]))
    w.add_bool(K.Q_IMG_DO_RESCALE, bool(pp["do_rescale"]))
    w.add_bool(K.Q_IMG_DO_NORMALIZE, bool(pp["do_normalize"]))
    w.add_bool(K.Q_IMG_DO_PAD, bool(pp["do_pad"]))


def _add_i32_array(w, key: str, values) -> None:
    from gguf import GGUFValueType

    # add_array() skips empty lists; an empty list (e.g. no cross-attention layers) is still information.
    w.add_key_value(key, [int(x) for x in values], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bf16 bits (uint16), NaN kept quiet (ggml_compute_fp32_to_bf16)."""
    u = x.view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return r


def encode(x: np.ndarray, gtype, block_row: int) -> np.ndarray:
    """float32 chunk -> the bytes of `gtype` (an array whose buffer is written as is)."""
    from gguf import GGMLQuantizationType as T

    if gtype == T.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if gtype == T.F16:
        return np.ascontiguousarray(x).astype(np.float16)
    if gtype == T.BF16:
        return f32_to_bf16(np.ascontiguousarray(x, dtype=np.float32))
    from mllama_q import quants

    return quants.quantize(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, block_row), K.QUANT_NAME[gtype])


def _transform(o: Out, x: np.ndarray) -> np.ndarray:
    if o.transform == PERMUTE_QK:
        hd = o.rows // o.n_head
        return K.permute_qk(x, x.shape[0] // hd)  # chunks hold whole heads
    if o.transform == PERMUTE_VEC:
        return K.permute_head_vector(x)
    if o.transform == TANH:
        return np.tanh(x.astype(np.float64)).astype(np.float32)
    if o.transform == ONE_MINUS_TANH:
        return (1.0 - np.tanh(x.astype(np.float64))).astype(np.float32)
    return x


def _chunks(o: Out):
    """Row ranges [r0, r1) of at most CHUNK_BYTES float32 each; whole heads for PERMUTE_QK."""
    rows, row_bytes = o.rows, max(1, o.row_len) * 4
    step = max(1, CHUNK_BYTES // row_bytes)
    if o.transform == PERMUTE_QK:
        hd = rows // o.n_head
        step = max(hd, step // hd * hd)
    if o.transform in (PERMUTE_VEC, TANH, ONE_MINUS_TANH, CONST):
        step = rows
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _stream_tensor_data(ck: Checkpoint, outs: list, sizes: dict, writer, progress: bool) -> int:
    """Write every tensor's data, chunk by chunk, after the tensor-info table; returns input bytes.

    Each tensor starts at the writer's alignment and is padded after, matching the offsets
    GGUFWriter.write_ti_data_to_file recorded (cumulative ggml_pad(nbytes, alignment)).
    Pipeline: a helper thread reads + widens + transforms chunk i+1 (numpy releases the GIL)
    while the core quantizes chunk i on all threads, and the kernel reads ahead chunk i+2
    (posix_fadvise). At most two float32 chunks (2 x CHUNK_BYTES) are alive at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    fout = writer.fout[0]
    work = []  # (out, r0, r1) in file order
    for o in outs:
        work.extend((o, r0, r1) for r0, r1 in _chunks(o))
    total_in = sum(ck.tensors[o.src].nbytes for o in outs if o.src is not None)

    def prefetch(i):
        if i < len(work) and work[i][0].src is not None:
            o, a, b = work[i]
            e = ck.tensors[o.src]
            ck.file_of(e).prefetch(e, a, b)

    def load(i):
        """float32 rows of work item i after the layout transform: [r1 - r0, *shape[1:]]."""
        o, r0, r1 = work[i]
        if o.transform == CONST:
            return o.data
        e = ck.tensors[o.src]
        return _transform(o, ck.file_of(e).read_rows(e, r0, r1).reshape((r1 - r0,) + o.shape[1:]))

    bar = tqdm(
        total=total_in,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        desc="convert",
        dynamic_ncols=True,
        leave=True,
    )
    written = 0
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-read") as reader:
            prefetch(0)
            prefetch(1)
            pending = reader.submit(load, 0) if work else None
            for i, (o, r0, r1) in enumerate(work):
                x = pending.result()
                prefetch(i + 2)
                pending = reader.submit(load, i + 1) if i + 1 < len(work) else None
                if r0 == 0:
                    writer.write_padding(fout, fout.tell())
                    written = 0
                    bar.set_postfix_str(f"{o.name} {o.gtype.name}", refresh=False)
                try:
                    data = encode(x, o.gtype, o.block_row)
                except (RuntimeError, ValueError) as err:
                    raise ConvertError(f"tensor {o.src or o.name} -> {o.name} ({o.gtype.name}): {err}") from None
                fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                written += data.nbytes
                if o.src is not None:
                    e = ck.tensors[o.src]
                    bar.update(x.size * e.nbytes // max(1, e.numel))
                if r1 == o.rows:
                    if written != sizes[o.name]:  # internal consistency, never expected
                        raise ConvertError(f"tensor {o.name}: wrote {written} bytes, expected {sizes[o.name]}")
                    writer.write_padding(fout, sizes[o.name])
                del x, data
    finally:
        bar.close()
    return total_in


def check_output_path(out_path, force: bool) -> Path:
    """The output path as a Path; ConvertError if it exists (without force), is a directory, or
    its directory does not exist."""
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise ConvertError(f"{out_path}: already exists (use --force to overwrite)")
    if out_path.is_dir():
        raise ConvertError(f"{out_path}: is a directory")
    if not out_path.parent.is_dir():
        raise ConvertError(f"{out_path.parent}: output directory does not exist")
    return out_path


def write_gguf(writer, out_path: Path, write_data) -> int:
    """Writes `writer` (a gguf.GGUFWriter holding metadata and tensor infos, no data) to a
    temporary file beside out_path: header, metadata, tensor infos, then write_data(fout) writes
    the tensor data. The file is fsynced and renamed over out_path, so a failed or interrupted
    conversion never leaves a partial file under the output name (the temporary one is removed).
    Returns the bytes written; an OSError while writing (ENOSPC, EIO) is a ConvertError."""
    tmp = out_path.parent / f".{out_path.name}.{os.getpid()}.tmp"
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        write_data(fout)
        fout.flush()
        os.fsync(fout.fileno())
        out_bytes = fout.tell()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        # Closing flushes the write buffer, which fails again on a full disk (ENOSPC):
        # that second error must not skip the removal of the temp file.
        try:
            writer.close()
        except Exception:  # noqa: BLE001  the first error is the one reported
            pass
        tmp.unlink(missing_ok=True)
        err = sys.exc_info()[1]
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):  # e.g. ENOSPC, EIO
            raise ConvertError(f"{out_path}: conversion failed ({err}); nothing was written") from None
        raise
    return out_bytes


def convert(
    hf_dir,
    out_path,
    ftype: str = "q4_k_m",
    vision_type: str | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Convert; returns a summary dict (tensors, bytes read/written, seconds, and `fallbacks`: the
    tensors stored in another type than the mix asked for, from plan.assign_types). Raises ConvertError."""
    import gguf

    if ftype not in K.FTYPES:
        raise ConvertError(f"unknown --type {ftype!r}; expected one of {', '.join(K.FTYPES)}")
    if vision_type is not None and vision_type not in K.VISION_TYPES:
        raise ConvertError(f"unknown --vision-type {vision_type!r}; expected one of {', '.join(K.VISION_TYPES)}")
    if vision_type is None:
        vision_type = K.default_vision_type(ftype)
    out_path = check_output_path(out_path, force)

    t0 = time.perf_counter()
    ck = load_checkpoint(hf_dir)
    try:
        outs = build_plan(ck)
        check_tensors(ck, outs)
        fallbacks = assign_types(outs, ck, ftype, vision_type)

        writer = gguf.GGUFWriter(None, K.ARCH)
        add_metadata(writer, ck, ftype)
        try:  # llama.cpp's tokenizer keys + chat template (convert/tokenizer.py)
            add_tokenizer_metadata(writer, ck.dir, max_tokens=ck.text.vocab_size + 8)
        except ValueError as e:  # its messages name the file
            raise ConvertError(str(e)) from None
        except (KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:  # a wrong JSON shape
            raise ConvertError(f"{ck.dir / 'tokenizer.json'}: malformed ({type(e).__name__}: {e})") from None
        toks = writer.kv_data[0].get(K.TOKENIZER_TOKENS)
        n_tok = len(toks.value) if toks is not None else 0
        if n_tok > ck.text.vocab_size + 8:
            raise ConvertError(
                f"{ck.dir / 'tokenizer.json'}: {n_tok} tokens exceed the {ck.text.vocab_size + 8} rows of embed_tokens"
            )
        if not ck.image_token_id < ck.text.vocab_size + 8:
            raise ConvertError(
                f"{ck.dir / 'config.json'}: image_token_index {ck.image_token_id} is outside "
                f"embed_tokens ({ck.text.vocab_size + 8} rows)"
            )
        if n_tok and not ck.image_token_id < n_tok:  # the processor writes this token for every image
            raise ConvertError(
                f"{ck.dir / 'config.json'}: image_token_index {ck.image_token_id} is not a token of "
                f"tokenizer.json ({n_tok} tokens)"
            )

        # Tensor infos only (no data: GGUFWriter would keep added tensors in memory). With
        # raw_dtype set and a non-uint8 numpy dtype, GGUFWriter takes `shape` as the element shape.
        sizes = {}
        for o in outs:
            sizes[o.name] = K.nbytes(o.gtype, o.shape)
            writer.add_tensor_info(o.name, o.shape, np.dtype(np.float32), sizes[o.name], raw_dtype=o.gtype)

        total_in = 0

        def write_data(_fout):
            nonlocal total_in
            total_in = _stream_tensor_data(ck, outs, sizes, writer, progress)

        out_bytes = write_gguf(writer, out_path, write_data)
    finally:
        ck.close()
    dt = time.perf_counter() - t0
    return {
        "tensors": len(outs),
        "bytes_in": total_in,
        "bytes_out": out_bytes,
        "seconds": dt,
        "ftype": ftype,
        "vision_type": vision_type,
        "output": str(out_path),
        "fallbacks": fallbacks,
    }
