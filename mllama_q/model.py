"""`Model`: an mllama GGUF file loaded for inference (no torch).

    m = Model("llama-3.2-11b-vision-q4_k_m.gguf")
    logits = m.forward(input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)

The file is memory-mapped and validated by our own reader (mllama_q.gguf_file,
csrc/gguf) before any tensor is used; its tensor arrays are views of the mapping
handed to the compiled core without copying (they keep the mapping alive as long
as the model).
With `vision=False` the vision tower's tensors are never handed over, so they
are never read from disk.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np

from . import _core, ollama
from . import gguf_keys as K
from . import hparams as HP
from .gguf_file import (
    GGUFFile,
    ModelFileError,
    check_architecture,
    check_tensor_types,
    field_value,
    get_float,
    get_int,
    get_int_list,
    get_str,
    open_gguf,
    require_keys,
)

# Metadata every mllama file has (Ollama's and ours).
REQUIRED_TEXT_KEYS = (
    K.BLOCK_COUNT,
    K.EMBEDDING_LENGTH,
    K.FEED_FORWARD_LENGTH,
    K.HEAD_COUNT,
    K.HEAD_COUNT_KV,
    K.RMS_EPS,
    K.ROPE_FREQ_BASE,
    K.CROSS_ATTENTION_LAYERS,
)
REQUIRED_VISION_KEYS = (
    K.V_BLOCK_COUNT,
    K.V_GLOBAL_BLOCK_COUNT,
    K.V_INTERMEDIATE_LAYERS,
    K.V_EMBEDDING_LENGTH,
    K.V_FEED_FORWARD_LENGTH,
    K.V_HEAD_COUNT,
    K.V_LN_EPS,
    K.V_IMAGE_SIZE,
    K.V_PATCH_SIZE,
    K.V_MAX_NUM_TILES,
)  # num_channels: 3 if absent (mllama.cpp never read it from a projector)
VISION_PREFIXES = K.VISION_PREFIXES
MAX_N_CTX = 1 << 24  # 128x Llama 3.2's 131072 positions; beyond it the KV cache size alone is absurd


def _d(key):
    """The published 11B value of a `mllama_q.` key (files written by Ollama lack them)."""
    return K.DEFAULTS_11B.get(key)


def rope_inv_freq(f: GGUFFile, head_dim: int, theta: float) -> list[float]:
    """RoPE inverse frequencies [head_dim/2] with llama3 scaling, as HF's rotary embedding uses.

    inv_freq[i] = theta^(-2i/head_dim) / rope_freqs[i]   (transformers
    modeling_rope_utils._compute_llama3_parameters; the divisors are the
    `rope_freqs.weight` tensor, or computed from the mllama_q.rope.scaling.*
    keys when the file has no such tensor; no scaling when its type is "none").
    """
    t = f.tensors.get(K.ROPE_FREQS)
    if t is not None:
        if t.ggml_type != 0 or t.n_elements != head_dim // 2:
            raise ModelFileError(f"tensor '{K.ROPE_FREQS}' must be f32 [{head_dim // 2}]")
        div = np.asarray(t.data, dtype=np.float64).reshape(-1)
    elif get_str(f, K.Q_ROPE_SCALING_TYPE, _d(K.Q_ROPE_SCALING_TYPE)) == "llama3":
        keys = {
            "factor": K.Q_ROPE_SCALING_FACTOR,
            "low_freq_factor": K.Q_ROPE_SCALING_LOW_FREQ_FACTOR,
            "high_freq_factor": K.Q_ROPE_SCALING_HIGH_FREQ_FACTOR,
            "original_context_length": K.Q_ROPE_SCALING_ORIG_CTX,
        }
        rs = {name: field_value(f, key, _d(key)) for name, key in keys.items()}
        HP.check_rope_scaling(rs, keys)  # HParamError: types and ranges
        div = K.rope_freqs_llama3(
            head_dim,
            theta,
            float(rs["factor"]),
            float(rs["low_freq_factor"]),
            float(rs["high_freq_factor"]),
            int(rs["original_context_length"]),
        ).astype(np.float64)
    else:
        div = np.ones(head_dim // 2)
    if not np.all(np.isfinite(div)) or np.any(div <= 0):
        raise ModelFileError(f"'{K.ROPE_FREQS}' must hold positive finite divisors")
    return K.rope_inv_freq(head_dim, theta, div)


# GGUF key of each hyper-parameter, for the messages of mllama_q.hparams' range checks.
TEXT_LABELS = {
    "vocab_size": K.VOCAB_SIZE,
    "hidden_size": K.EMBEDDING_LENGTH,
    "intermediate_size": K.FEED_FORWARD_LENGTH,
    "n_layer": K.BLOCK_COUNT,
    "n_head": K.HEAD_COUNT,
    "n_kv_head": K.HEAD_COUNT_KV,
    "head_dim": K.ROPE_DIMENSION_COUNT,
    "rms_eps": K.RMS_EPS,
    "rope_theta": K.ROPE_FREQ_BASE,
    "cross_attention_layers": K.CROSS_ATTENTION_LAYERS,
}
VISION_LABELS = {
    "hidden_size": K.V_EMBEDDING_LENGTH,
    "intermediate_size": K.V_FEED_FORWARD_LENGTH,
    "num_layers": K.V_BLOCK_COUNT,
    "num_global_layers": K.V_GLOBAL_BLOCK_COUNT,
    "n_head": K.V_HEAD_COUNT,
    "image_size": K.V_IMAGE_SIZE,
    "patch_size": K.V_PATCH_SIZE,
    "num_channels": K.V_NUM_CHANNELS,
    "max_num_tiles": K.V_MAX_NUM_TILES,
    "norm_eps": K.V_LN_EPS,
    "intermediate_layers": K.V_INTERMEDIATE_LAYERS,
    "out_dim": K.Q_V_PROJECTION_DIM,
}


def _check(fn, *args, path=None):
    """Run a mllama_q.hparams check; its HParamError becomes a ModelFileError naming the file."""
    try:
        return fn(*args)
    except HP.HParamError as e:
        raise ModelFileError(f"{path}: {e}" if path else str(e)) from None


def text_hparams(f: GGUFFile, path) -> dict:
    require_keys(f, path, REQUIRED_TEXT_KEYS)
    D = get_int(f, K.EMBEDDING_LENGTH)
    H = get_int(f, K.HEAD_COUNT)
    hd = get_int(f, K.ROPE_DIMENSION_COUNT, D // H if H > 0 else 0)
    out = f.tensors.get(K.OUTPUT)
    vocab_default = out.shape[0] if out is not None and len(out.shape) == 2 else None  # [vocab, hidden]
    hp = {
        "vocab_size": get_int(f, K.VOCAB_SIZE, vocab_default),
        "hidden_size": D,
        "intermediate_size": get_int(f, K.FEED_FORWARD_LENGTH),
        "n_layer": get_int(f, K.BLOCK_COUNT),
        "n_head": H,
        "n_kv_head": get_int(f, K.HEAD_COUNT_KV),
        "head_dim": hd,
        "rms_eps": get_float(f, K.RMS_EPS),
        "cross_attention_layers": get_int_list(f, K.CROSS_ATTENTION_LAYERS),
        "rope_inv_freq": None,
    }
    theta = get_float(f, K.ROPE_FREQ_BASE)
    # Ranges (mllama_q/hparams.py) before anything is sized from these numbers.
    _check(HP.check_text, dict(hp, rope_theta=theta), TEXT_LABELS, path=path)
    # Structure: the file must hold every layer (at least 9 tensors each) and consistent heads.
    n_layer = hp["n_layer"]
    if n_layer * 9 > len(f.tensors):
        raise ModelFileError(f"{path}: {K.BLOCK_COUNT} = {n_layer} but the file has only {len(f.tensors)} tensors")
    if hd * H != D:
        raise ModelFileError(f"{path}: rope dimension {hd} x head_count {H} != embedding_length {D}")
    hp["rope_inv_freq"] = _check(rope_inv_freq, f, hd, theta, path=path)
    return hp


def vision_hparams(f: GGUFFile, path, text_hidden: int) -> dict:
    require_keys(f, path, REQUIRED_VISION_KEYS)
    flat = get_int_list(f, K.Q_V_ASPECT_RATIOS, _d(K.Q_V_ASPECT_RATIOS))
    hp = {
        "hidden_size": get_int(f, K.V_EMBEDDING_LENGTH),
        "intermediate_size": get_int(f, K.V_FEED_FORWARD_LENGTH),
        "num_layers": get_int(f, K.V_BLOCK_COUNT),
        "num_global_layers": get_int(f, K.V_GLOBAL_BLOCK_COUNT),
        "n_head": get_int(f, K.V_HEAD_COUNT),
        "image_size": get_int(f, K.V_IMAGE_SIZE),
        "patch_size": get_int(f, K.V_PATCH_SIZE),
        "num_channels": get_int(f, K.V_NUM_CHANNELS, 3),
        "max_num_tiles": get_int(f, K.V_MAX_NUM_TILES),
        "max_aspect_ratio_id": 0,
        "norm_eps": get_float(f, K.V_LN_EPS),
        "intermediate_layers": get_int_list(f, K.V_INTERMEDIATE_LAYERS),
        "out_dim": get_int(f, K.Q_V_PROJECTION_DIM, text_hidden),
    }
    _check(HP.check_vision, {k: v for k, v in hp.items() if k != "max_aspect_ratio_id"}, VISION_LABELS, path=path)
    if len(flat) % 2 or len(flat) > 2 * len(HP.all_aspect_ratios(hp["max_num_tiles"])):
        raise ModelFileError(
            f"{path}: {K.Q_V_ASPECT_RATIOS} has {len(flat)} values; expected (rows, cols) pairs "
            f"of at most {hp['max_num_tiles']} tiles"
        )
    pairs = [flat[i : i + 2] for i in range(0, len(flat), 2)]
    ratios = _check(HP.check_aspect_ratios, pairs, hp["max_num_tiles"], K.Q_V_ASPECT_RATIOS, path=path)
    hp["max_aspect_ratio_id"] = len(ratios)
    if (hp["num_layers"] + hp["num_global_layers"]) * 12 > len(f.tensors):
        raise ModelFileError(f"{path}: vision layer counts do not match the {len(f.tensors)} tensors")
    return hp


def required_vision_tensors(vhp: dict) -> list[str]:
    """Every tensor name the vision tower reads (gguf_keys.py), for the load-time check."""
    names = [
        K.V_PATCH_EMBD,
        K.V_CLASS_EMBD,
        K.V_POS_EMBD,
        K.V_POS_EMBD_GATE,
        K.V_TILE_POS_EMBD,
        K.V_TILE_POS_EMBD_GATE,
        K.V_PRE_TILE_EMBD,
        K.V_PRE_TILE_EMBD_GATE,
        K.V_POST_TILE_EMBD,
        K.V_POST_TILE_EMBD_GATE,
        K.V_PRE_LN_W,
        K.V_PRE_LN_B,
        K.V_POST_LN_W,
        K.V_POST_LN_B,
        K.MM_PROJ_W,
        K.MM_PROJ_B,
    ]
    per_layer = [
        K.V_ATTN_NORM_W,
        K.V_ATTN_NORM_B,
        K.V_ATTN_Q,
        K.V_ATTN_K,
        K.V_ATTN_V,
        K.V_ATTN_OUTPUT,
        K.V_FFN_NORM_W,
        K.V_FFN_NORM_B,
        K.V_FFN_UP_W,
        K.V_FFN_UP_B,
        K.V_FFN_DOWN_W,
        K.V_FFN_DOWN_B,
    ]
    for i in range(vhp["num_layers"]):
        names += [K.vblk(n, i) for n in per_layer]
    for i in range(vhp["num_global_layers"]):
        names += [K.vblk(n, i, True) for n in per_layer + [K.V_ATTN_GATE, K.V_FFN_GATE]]
    return names


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


class Model:
    """An mllama GGUF model on one device, serving up to `max_sessions` conversations at once.

    Args:
      path: the .gguf file, or an Ollama model name ("llama3.2-vision", "llama3.2-vision:11b", ...)
        resolved through the local Ollama store (mllama_q.store.resolve_model; its params layer
        becomes the sampling defaults). Files Ollama wrote are read as they are (mllama_q.ollama).
      projector: Ollama's two-file layout (v0.4 - v0.6): the projector blob beside the text blob
        `path` (found by itself when `path` is a name or a blob inside an Ollama store).
      ollama_converter: "auto" (default) or which Ollama converter wrote a one-file blob
        ("v0.7.0", "v0.7.1-rc0", "v0.7.1"), for the files whose generation cannot be told
        (mllama_q.ollama explains which).
      device: "cpu", "cuda" or "cuda:N".
      n_ctx: tokens per session (the self-attention KV cache of each; llama.cpp -c, Ollama num_ctx).
      max_sessions: sessions (KV-cache slots) that can live at once. The KV memory is
        allocated up front: n_ctx x max_sessions x (the cache of one token); a ValueError says
        so when it does not fit. See memory().
      n_threads: CPU threads (None: all available cores); sets the process-wide pool.
      vision: False loads the text decoder only (the vision weights stay untouched on disk).
      kv_type: "f16" (default) or "f32" KV cache and cached cross-attention K/V.
      image_cache: encoded images kept for reuse beyond those the sessions hold (LRU, shared
        by the sessions; each costs memory()["image_bytes"]).
      n_batch: most tokens in one forward pass (the batch of decoding sequences plus prompt
        chunks; llama.cpp's n_ubatch), at most 512.
      prefill_chunk: most prompt tokens a step takes while other sessions are decoding (so
        their streams keep flowing); alone, a prompt goes n_batch tokens per step.

    Use as a context manager or call close(): it stops generation, frees the backend memory
    and unmaps the file.

    Raises ModelFileError (a ValueError) for a missing, corrupt, truncated or non-mllama
    file, before any tensor is used.
    """

    def __init__(
        self,
        path,
        device: str = "cpu",
        n_ctx: int = 4096,
        n_threads: int | None = None,
        vision: bool = True,
        kv_type: str = "f16",
        max_sessions: int = 1,
        image_cache: int = 4,
        n_batch: int = 512,
        prefill_chunk: int = 64,
        projector=None,
        ollama_converter: str | None = None,
    ):
        self._core = None
        self._scheduler = None
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or not 0 < n_ctx <= MAX_N_CTX:
            raise ValueError(f"n_ctx must be an integer in [1, {MAX_N_CTX}], got {n_ctx!r}")
        if (
            not isinstance(max_sessions, (int, np.integer))
            or isinstance(max_sessions, bool)
            or not 1 <= max_sessions <= 256
        ):
            raise ValueError(f"max_sessions must be an integer in [1, 256], got {max_sessions!r}")
        if int(n_ctx) * int(max_sessions) >= 1 << 31:
            raise ValueError(f"n_ctx x max_sessions = {int(n_ctx) * int(max_sessions)} cache rows is too many")
        if kv_type not in ("f16", "f32"):
            raise ValueError(f"kv_type must be 'f16' or 'f32', got {kv_type!r}")
        for name, v, lo, hi in (
            ("image_cache", image_cache, 0, 1 << 16),
            ("n_batch", n_batch, 1, 512),
            ("prefill_chunk", prefill_chunk, 1, 512),
        ):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        if int(n_batch) <= int(max_sessions) and int(max_sessions) > 1:
            raise ValueError(
                f"n_batch ({n_batch}) must exceed max_sessions ({max_sessions}): every decoding "
                "session takes one row of a step"
            )
        if n_threads is not None:
            if not isinstance(n_threads, (int, np.integer)) or n_threads <= 0:
                raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}")
            _core.set_num_threads(int(n_threads))
        t_load = time.perf_counter()
        from .store import apply_defaults, resolve_model

        model_path, store_projector, store_defaults = resolve_model(path)
        self.path = os.fspath(model_path)
        f = open_gguf(self.path)
        check_architecture(f, self.path)
        check_tensor_types(f)
        # Which layout (ours, Ollama's one-file or two-file) and what load must undo (mllama_q.ollama).
        entries = ollama.tensor_entries(f)
        layout = ollama.detect_layout(
            f, self.path, entries, projector=projector or store_projector, converter=ollama_converter
        )
        thp = text_hparams(f, self.path)
        vfile, vpath, vnames = f, self.path, entries
        if layout.projector_reader is not None:
            vfile, vpath, vnames = layout.projector_reader, layout.projector_path, layout.projector_tensors
        has_vision_tensors = any(n.startswith(VISION_PREFIXES) for n in vnames)
        vhp = None
        if vision and has_vision_tensors:
            vhp = vision_hparams(vfile, vpath, thp["hidden_size"])
        elif vision and not has_vision_tensors:
            raise ModelFileError(f"{self.path}: the file has no vision tensors (v.*, mm.*); {layout.no_vision_hint()}")

        # The memory budget, explicit and checked before anything is allocated.
        n_self = thp["n_layer"] - len(thp["cross_attention_layers"])
        kv_per_session = n_self * 2 * int(n_ctx) * thp["n_kv_head"] * thp["head_dim"] * (2 if kv_type == "f16" else 4)
        kv_total = kv_per_session * int(max_sessions)
        avail = _available_memory() if device == "cpu" else None
        budget = (
            f"n_ctx={int(n_ctx)} x max_sessions={int(max_sessions)} needs {_gib(kv_total)} of KV cache "
            f"({_gib(kv_per_session)} per session, kv_type={kv_type})"
        )
        if avail is not None and kv_total > avail:
            raise ValueError(
                f"{budget}, but only {_gib(avail)} of memory is available: lower n_ctx or "
                f"max_sessions, or use kv_type='f16'"
            )

        # Hand over the mapped arrays (no copy); the vision ones only when used. The core
        # uploads them and builds the vision encoder at the first encode_images, so a
        # text-only session never reads them; their presence is checked now.
        tensors = {n: e for n, e in entries.items() if vhp is not None or not n.startswith(VISION_PREFIXES)}
        ollama.apply_layout(layout, f, tensors, thp, vhp)
        if vhp is not None:
            missing = [n for n in required_vision_tensors(vhp) if n not in tensors]
            if missing:
                raise ModelFileError(
                    f"{vpath}: missing vision tensor(s): {', '.join(missing[:8])}"
                    + (" ..." if len(missing) > 8 else "")
                )
        try:
            core = _core.MllamaModel(tensors, thp, vhp, device, int(n_ctx), kv_type, int(max_sessions))
        except (RuntimeError, ValueError) as e:
            # Everything the core is given comes from the file (tensors, hyper-parameters) except
            # the device and the memory budget: a missing / misshaped tensor or an unusable
            # hyper-parameter is the file's fault, a missing CUDA build or GPU, or a budget that
            # does not fit, is not.
            msg = str(e)
            if "out of memory" in msg:
                raise ValueError(f"{budget}: {msg}") from e
            if "cuda" in msg.lower() or "device" in msg.lower():
                raise
            raise ModelFileError(f"{self.path}: {msg}") from e
        self._core = core
        self._reader = f  # the GGUFFile (metadata); the tensor arrays keep the mapping alive
        self._projector_reader = layout.projector_reader  # likewise for a two-file pair's projector
        self.layout = layout
        self._vision_path = vpath  # the file the vision tensors come from (the projector of a two-file pair)
        self._tensors = tensors
        self.text_hparams = thp
        self.vision_hparams = vhp
        self.device = device
        self.kv_type = kv_type
        self.n_ctx = int(n_ctx)
        self.max_sessions = int(max_sessions)
        # the context length the model was trained for (None if the file does not say); the
        # command line warns when n_ctx exceeds it
        n_train = field_value(f, K.CONTEXT_LENGTH)
        ok = isinstance(n_train, (int, np.integer)) and not isinstance(n_train, bool) and n_train > 0
        self.n_ctx_train = int(n_train) if ok else None
        n_embd_rows = thp["vocab_size"] + 8  # token_embd rows (HF: vocab_size + 8; <|image|> = vocab_size)
        # Files without the key (Ollama's) use HF's convention: <|image|> = vocab_size (11B: 128256).
        self.image_token_id = _check(
            HP.check_token_id,
            field_value(f, K.Q_IMAGE_TOKEN_ID, thp["vocab_size"]),
            n_embd_rows,
            K.Q_IMAGE_TOKEN_ID,
            path=self.path,
        )
        # Tokenizer, processor, stop ids and sampling defaults from the same file (frontend).
        from .generate import generation_defaults_from_gguf, stop_ids_from_gguf
        from .processor import Processor, ProcessorSettings
        from .sampling import SamplingParams
        from .tokenizer import Tokenizer

        self.tokenizer = None
        self.processor = None
        try:
            if any(k.startswith(K.TOKENIZER_PREFIX) for k in f.metadata):
                self.tokenizer = Tokenizer.from_gguf(f)
                settings = ProcessorSettings.from_gguf(f, self.tokenizer, vfile if vfile is not f else None)
                self.processor = Processor(self.tokenizer, settings)
            self.stop_ids = ollama.frontend(layout, f, self.tokenizer, stop_ids_from_gguf(f, self.tokenizer))
            self.generation_defaults = generation_defaults_from_gguf(f)
            SamplingParams(**self.generation_defaults)  # a NaN temperature in the file fails here, not per call
        except ModelFileError:
            raise
        except (ValueError, TypeError, OverflowError) as e:  # the frontends' checks (out-of-range mllama_q.image.*
            # settings: mllama_q/hparams.py; general.sampling.* values) of what the file says
            raise ModelFileError(f"{self.path}: bad tokenizer / processor / generation metadata ({e})") from e
        if self.processor is not None:
            self.image_token_id = self.processor.settings.image_token_id
        # The Ollama manifest's params layer (resolve_model): sampling defaults and stop strings.
        self.store_defaults = dict(store_defaults)
        self.stop_ids = apply_defaults(self.generation_defaults, self.stop_ids, self.tokenizer, store_defaults)

        self.max_images = HP.MAX_IMAGES_PER_PROMPT

        from .session import ImageCache, Scheduler

        self._image_cache = ImageCache(int(image_cache))
        self._scheduler = Scheduler(self, core, int(max_sessions), int(n_batch), int(prefill_chunk), self._image_cache)
        # The low-level API below (reset / encode_images / eval / forward) works on a slot of
        # its own, taken on first use and given back by reset() (or to a session that needs it).
        self._ll_lock = threading.Lock()
        self._ll_slot: int | None = None
        self._ll_handles: list = []
        self.load_time_s = time.perf_counter() - t_load  # reported by generate() as timings["load_s"]

    # -- sessions ----------------------------------------------------------------------
    def session(self):
        """A new conversation (mllama_q.session.Session): its own KV-cache slot, reused across
        turns. Raises RuntimeError when all max_sessions slots are held."""
        from .session import Session

        self._check_open()
        return Session(self)

    def generate(
        self,
        messages: Sequence[Mapping] | None = None,
        prompt: str | None = None,
        images: Sequence | None = None,
        *,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        aspect_ratio_ids=None,
        aspect_ratio_mask=None,
        cross_attention_mask=None,
        max_new_tokens: int = 512,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_strings: Sequence[str] | str | None = None,
        stop: Sequence[str] | str | None = None,
        stream: bool = False,
        add_generation_prompt: bool = True,
        chat_kwargs: Mapping[str, Any] | None = None,
        progress=None,
    ):
        from .generate import GenerationStream
        from .session import Session

        self._check_open()
        sess = Session(self, _temporary=True)  # waits for a slot held by another one-shot call
        try:
            out = sess.generate(
                messages,
                prompt,
                images,
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                aspect_ratio_ids=aspect_ratio_ids,
                aspect_ratio_mask=aspect_ratio_mask,
                cross_attention_mask=cross_attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                repetition_penalty=repetition_penalty,
                seed=seed,
                stop_strings=stop_strings,
                stop=stop,
                stream=stream,
                add_generation_prompt=add_generation_prompt,
                chat_kwargs=chat_kwargs,
                progress=progress,
            )
        except BaseException:
            sess.close()
            raise
        if not stream:
            sess.close()
            return out

        def pieces():
            try:
                yield from out
                return out.result
            finally:
                out.close()
                sess.close()

        def on_close(wait):
            if wait:
                out.close()
                sess.close()
                return out.result
            sess._abandoned = True  # no caller waits on it (acquire_slot's same-thread check)
            out.__del__()  # cancel without waiting; the slot is freed when the turn ends
            return None

        return GenerationStream(pieces(), on_close=on_close)

    def memory(self) -> dict:
        """Memory the model's caches take, in bytes: the self-attention KV cache of one session
        and of all (allocated at load), the cross-attention K/V of one image, the image cache's
        capacity (images) and what it holds now."""
        self._check_open()
        per = int(self._core.kv_bytes_per_seq)
        return {
            "kv_bytes_per_session": per,
            "kv_bytes_total": per * self.max_sessions,
            "image_bytes": int(self._core.image_bytes),
            "image_cache_images": self._image_cache.capacity,
            "image_cache_bytes": self._image_cache.nbytes(),
        }

    def close(self) -> None:
        """Stop every generation, free the KV caches, images and backend memory, unmap the file.
        The Model (and its sessions, tokenizer and processor) cannot be used afterwards."""
        sched, self._scheduler = self._scheduler, None
        if sched is not None:
            sched.close()
            for s in list(sched._sessions):
                s._closed = True
                s._handles, s._keys = [], []
            sched.core = None
        if getattr(self, "_image_cache", None) is not None:
            self._image_cache.clear()
        self._ll_handles = []
        self._core = None
        self._tensors = None
        # The tokenizer's vocabulary (and token types) are views of the mapping too: the
        # mapping goes with the last of them (a tokenizer the caller still holds keeps it).
        self.tokenizer = self.processor = None
        for attr in ("_reader", "_projector_reader"):  # a two-file pair maps its projector too
            reader = getattr(self, attr, None)
            setattr(self, attr, None)
            close = getattr(reader, "close", None)
            if callable(close):
                close()
        import gc

        gc.collect()  # the mapped arrays go with the last reference to them

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._core is None or self._scheduler is None:
            raise RuntimeError("the model is closed")

    def _load_vision(self) -> None:
        try:
            self._core.load_vision()  # first use: upload the vision weights, build the encoder
        except RuntimeError as e:  # a misshaped vision tensor
            if "tensor" in str(e):
                raise ModelFileError(f"{self._vision_path}: {e}") from e
            raise

    # -- the low-level API (one sequence; parity tests, benchmarks) ---------------------
    @property
    def n_past(self) -> int:
        """Tokens evaluated by eval() since the last reset()."""
        self._check_open()
        slot = self._ll_slot
        return 0 if slot is None else int(self._core.seq_len(slot))

    @property
    def has_vision(self) -> bool:
        return self._core is not None and self._core.has_vision

    def _ll(self) -> int:
        """The low-level API's slot (call with _ll_lock held)."""
        self._check_open()
        if self._ll_slot is None:
            from .session import _LOW_LEVEL

            self._ll_slot = self._scheduler.acquire_slot(_LOW_LEVEL, wait_for_temporary=True)
            self._ll_handles = []
        return self._ll_slot

    def _take_back_low_level(self) -> bool:
        """A session needs the low-level API's slot (called by the scheduler): give it up
        unless a low-level call is running."""
        if not self._ll_lock.acquire(blocking=False):
            return False
        try:
            self._ll_slot = None
            self._ll_handles = []
            return True
        finally:
            self._ll_lock.release()

    def reset(self) -> None:
        """Forget every evaluated token and image (and give the slot back)."""
        self._check_open()
        with self._ll_lock:
            slot, self._ll_slot = self._ll_slot, None
            self._ll_handles = []
            if slot is not None:
                self._scheduler.release_slot(slot)

    def _image_handles(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> list:
        """Cross-attention K/V of each image (the shared cache, else the vision tower)."""
        from .session import image_key

        px = np.ascontiguousarray(pixel_values, dtype=np.float32)
        # ids and masks keep their integer dtype: the core range-checks them before narrowing
        # (an int64 2**32 + 5 must not become 5)
        from .session import checked_int32

        max_id = int(self.vision_hparams["max_aspect_ratio_id"]) if self.vision_hparams else 0
        ids = checked_int32(aspect_ratio_ids, "aspect_ratio_ids", 0, max_id)
        msk = checked_int32(aspect_ratio_mask, "aspect_ratio_mask", 0, 1)
        while px.ndim > 5 and px.shape[0] == 1:
            px = px[0]
        while ids.ndim > 1 and ids.shape[0] == 1:
            ids = ids[0]
        while msk.ndim > 2 and msk.shape[0] == 1:
            msk = msk[0]
        if px.ndim != 5:
            raise ValueError(f"pixel_values must be [n_img, max_tiles, C, H, W] (plus a batch of 1), got {px.shape}")
        if ids.shape != (px.shape[0],) or msk.shape != px.shape[:2]:
            raise ValueError("aspect_ratio_ids must be [n_img] and aspect_ratio_mask [n_img, max_tiles]")
        _check(HP.check_image_count, int(px.shape[0]), self.max_images)

        if not self._core.vision_loaded:
            self._load_vision()
        out = []
        for i in range(px.shape[0]):
            key = image_key(px[i], int(ids[i]), msk[i])
            h = self._image_cache.get(key)
            if h is None:
                job = self._core.begin_image(px[i], int(ids[i]), msk[i])
                while job.step():
                    pass
                h = job.result()
                self._image_cache.put(key, h)
            out.append(h)
        return out

    def encode_images(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> None:
        """Run the vision tower on a set of images (MllamaProcessor's arrays, batch 1) and cache
        the cross-attention K/V every later token reads; replaces the previous image set."""
        if not self.has_vision:
            raise ValueError("this model was loaded with vision=False (or the file has no vision tower)")
        with self._ll_lock:
            slot = self._ll()
            handles = self._image_handles(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
            self._core.seq_set_images(slot, handles)
            self._ll_handles = handles

    def eval(self, tokens, cross_attention_mask=None) -> np.ndarray:
        """Evaluate `tokens` after the cached ones; returns float32 logits [vocab] of the last token.

        cross_attention_mask: int [n_tokens, n_images, max_tiles] (MllamaProcessor's
        rows for these tokens). None repeats the last row given since the images
        were encoded, as transformers' generate() does for each new token.
        """
        toks = self._tokens(tokens)
        mask = None if cross_attention_mask is None else np.ascontiguousarray(cross_attention_mask)
        with self._ll_lock:
            slot = self._ll()
            n_past = int(self._core.seq_len(slot))
            if n_past + len(toks) > self.n_ctx:
                raise ValueError(f"{n_past} cached + {len(toks)} new tokens exceed the context n_ctx={self.n_ctx}")
            return self._core.step([(slot, toks, mask, 1, None)])[0][0]

    def forward(
        self, input_ids, pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None, cross_attention_mask=None
    ) -> np.ndarray:
        """Logits float32 [seq, vocab] for one sequence from an empty cache (resets the low-level state).

        Arguments as MllamaProcessor returns them (batch 1; a leading batch axis
        of 1 is accepted). Without pixel_values the cross-attention layers are
        skipped, as in transformers for text-only input.
        """
        toks = self._tokens(input_ids)
        if len(toks) > self.n_ctx:
            raise ValueError(f"prompt of {len(toks)} tokens is longer than the context n_ctx={self.n_ctx}")
        if pixel_values is not None and (aspect_ratio_ids is None or aspect_ratio_mask is None):
            raise ValueError("pixel_values needs aspect_ratio_ids and aspect_ratio_mask")
        self.reset()
        if pixel_values is not None:
            self.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        mask = None
        if cross_attention_mask is not None and pixel_values is not None:
            mask = np.ascontiguousarray(cross_attention_mask)
        with self._ll_lock:
            slot = self._ll()
            return self._core.step([(slot, toks, mask, 2, None)])[0][0]

    @staticmethod
    def _tokens(tokens) -> np.ndarray:
        a = np.asarray(tokens)
        if a.ndim == 2 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"tokens must be a non-empty 1-D sequence of ids (or [1, n]), got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got dtype {a.dtype}")
        return np.ascontiguousarray(a)  # any integer dtype: the core range-checks before narrowing

    def __repr__(self) -> str:
        h = self.text_hparams
        return (
            f"Model({self.path!r}, device={self.device!r}, layers={h['n_layer']}, hidden={h['hidden_size']}, "
            f"vision={self.vision_hparams is not None}, n_ctx={self.n_ctx}, max_sessions={self.max_sessions})"
        )


Model.generate.__doc__ = None  # set below from GENERATE_DOC (one statement of the options)


def _set_docs() -> None:
    from .generate import GENERATE_DOC
    from .session import Session

    Model.generate.__doc__ = (
        "Stateless one-shot generation (a temporary session, closed at the end).\n\n" + GENERATE_DOC
    )
    Session.generate.__doc__ = (
        "Generate the next turn of this conversation; only the tokens past the "
        "longest common prefix with session.tokens are prefilled.\n\n" + GENERATE_DOC
    )


_set_docs()
