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

import contextlib
import os
import threading
import time

import numpy as np

from . import _core
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
    tensor_entry,
)

# Metadata every mllama file has (Ollama's and ours).
REQUIRED_TEXT_KEYS = (K.BLOCK_COUNT, K.EMBEDDING_LENGTH, K.FEED_FORWARD_LENGTH, K.HEAD_COUNT, K.HEAD_COUNT_KV,
                      K.RMS_EPS, K.ROPE_FREQ_BASE, K.CROSS_ATTENTION_LAYERS)
REQUIRED_VISION_KEYS = (K.V_BLOCK_COUNT, K.V_GLOBAL_BLOCK_COUNT, K.V_INTERMEDIATE_LAYERS, K.V_EMBEDDING_LENGTH,
                        K.V_FEED_FORWARD_LENGTH, K.V_HEAD_COUNT, K.V_LN_EPS, K.V_IMAGE_SIZE, K.V_PATCH_SIZE,
                        K.V_MAX_NUM_TILES, K.V_NUM_CHANNELS)
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
    base = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    t = f.tensors.get(K.ROPE_FREQS)
    if t is not None:
        if t.ggml_type != 0 or t.n_elements != head_dim // 2:
            raise ModelFileError(f"tensor '{K.ROPE_FREQS}' must be f32 [{head_dim // 2}]")
        div = np.asarray(t.data, dtype=np.float64).reshape(-1)
    elif get_str(f, K.Q_ROPE_SCALING_TYPE, _d(K.Q_ROPE_SCALING_TYPE)) == "llama3":
        keys = {"factor": K.Q_ROPE_SCALING_FACTOR, "low_freq_factor": K.Q_ROPE_SCALING_LOW_FREQ_FACTOR,
                "high_freq_factor": K.Q_ROPE_SCALING_HIGH_FREQ_FACTOR,
                "original_context_length": K.Q_ROPE_SCALING_ORIG_CTX}
        rs = {name: field_value(f, key, _d(key)) for name, key in keys.items()}
        HP.check_rope_scaling(rs, keys)  # HParamError: types and ranges
        div = K.rope_freqs_llama3(head_dim, theta, float(rs["factor"]), float(rs["low_freq_factor"]),
                                  float(rs["high_freq_factor"]), int(rs["original_context_length"])
                                  ).astype(np.float64)
    else:
        div = np.ones(head_dim // 2)
    if not np.all(np.isfinite(div)) or np.any(div <= 0):
        raise ModelFileError(f"'{K.ROPE_FREQS}' must hold positive finite divisors")
    return [float(x) for x in (base / div).astype(np.float32)]


# GGUF key of each hyper-parameter, for the messages of mllama_q.hparams' range checks.
TEXT_LABELS = {"vocab_size": K.VOCAB_SIZE, "hidden_size": K.EMBEDDING_LENGTH,
               "intermediate_size": K.FEED_FORWARD_LENGTH, "n_layer": K.BLOCK_COUNT, "n_head": K.HEAD_COUNT,
               "n_kv_head": K.HEAD_COUNT_KV,
               "head_dim": K.ROPE_DIMENSION_COUNT, "rms_eps": K.RMS_EPS, "rope_theta": K.ROPE_FREQ_BASE,
               "cross_attention_layers": K.CROSS_ATTENTION_LAYERS}
VISION_LABELS = {"hidden_size": K.V_EMBEDDING_LENGTH, "intermediate_size": K.V_FEED_FORWARD_LENGTH,
                 "num_layers": K.V_BLOCK_COUNT, "num_global_layers": K.V_GLOBAL_BLOCK_COUNT, "n_head": K.V_HEAD_COUNT,
                 "image_size": K.V_IMAGE_SIZE, "patch_size": K.V_PATCH_SIZE, "num_channels": K.V_NUM_CHANNELS,
                 "max_num_tiles": K.V_MAX_NUM_TILES, "norm_eps": K.V_LN_EPS,
                 "intermediate_layers": K.V_INTERMEDIATE_LAYERS, "out_dim": K.Q_V_PROJECTION_DIM}


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
        "num_channels": get_int(f, K.V_NUM_CHANNELS),
        "max_num_tiles": get_int(f, K.V_MAX_NUM_TILES),
        "max_aspect_ratio_id": 0,
        "norm_eps": get_float(f, K.V_LN_EPS),
        "intermediate_layers": get_int_list(f, K.V_INTERMEDIATE_LAYERS),
        "out_dim": get_int(f, K.Q_V_PROJECTION_DIM, text_hidden),
    }
    _check(HP.check_vision, {k: v for k, v in hp.items() if k != "max_aspect_ratio_id"}, VISION_LABELS, path=path)
    if len(flat) % 2 or len(flat) > 2 * len(HP.all_aspect_ratios(hp["max_num_tiles"])):
        raise ModelFileError(f"{path}: {K.Q_V_ASPECT_RATIOS} has {len(flat)} values; expected (rows, cols) pairs "
                             f"of at most {hp['max_num_tiles']} tiles")
    pairs = [flat[i:i + 2] for i in range(0, len(flat), 2)]
    ratios = _check(HP.check_aspect_ratios, pairs, hp["max_num_tiles"], K.Q_V_ASPECT_RATIOS, path=path)
    hp["max_aspect_ratio_id"] = len(ratios)
    if (hp["num_layers"] + hp["num_global_layers"]) * 12 > len(f.tensors):
        raise ModelFileError(f"{path}: vision layer counts do not match the {len(f.tensors)} tensors")
    return hp


def ollama_norms(tensors: dict, thp: dict) -> None:
    """Files written by Ollama (no mllama_q.* keys) permuted the cross-attention Q/K rows to
    llama.cpp's RoPE order but left the per-head q_norm/k_norm vectors in HF order, which
    changes the maths (gguf_keys.permute_head_vector). Replace them, in `tensors`, by permuted
    copies (2 x head_dim floats per cross-attention layer) so the result equals HF's."""
    for i in thp["cross_attention_layers"]:
        for key in (K.XATTN_Q_NORM, K.XATTN_K_NORM):
            name = K.blk(key, i)
            if name not in tensors:
                continue  # reported by the core with the tensor's name
            arr, gtype, shape = tensors[name]
            if gtype != 0 or len(shape) != 1:
                raise ModelFileError(f"tensor '{name}' must be a 1-D f32 vector")
            fixed = np.ascontiguousarray(K.permute_head_vector(np.asarray(arr, dtype=np.float32)))
            tensors[name] = (fixed, gtype, shape)


def required_vision_tensors(vhp: dict) -> list[str]:
    """Every tensor name the vision tower reads (gguf_keys.py), for the load-time check."""
    names = [K.V_PATCH_EMBD, K.V_CLASS_EMBD, K.V_POS_EMBD, K.V_POS_EMBD_GATE, K.V_TILE_POS_EMBD,
             K.V_TILE_POS_EMBD_GATE, K.V_PRE_TILE_EMBD, K.V_PRE_TILE_EMBD_GATE, K.V_POST_TILE_EMBD,
             K.V_POST_TILE_EMBD_GATE, K.V_PRE_LN_W, K.V_PRE_LN_B, K.V_POST_LN_W, K.V_POST_LN_B,
             K.MM_PROJ_W, K.MM_PROJ_B]
    per_layer = [K.V_ATTN_NORM_W, K.V_ATTN_NORM_B, K.V_ATTN_Q, K.V_ATTN_K, K.V_ATTN_V, K.V_ATTN_OUTPUT,
                 K.V_FFN_NORM_W, K.V_FFN_NORM_B, K.V_FFN_UP_W, K.V_FFN_UP_B, K.V_FFN_DOWN_W, K.V_FFN_DOWN_B]
    for i in range(vhp["num_layers"]):
        names += [K.vblk(n, i) for n in per_layer]
    for i in range(vhp["num_global_layers"]):
        names += [K.vblk(n, i, True) for n in per_layer + [K.V_ATTN_GATE, K.V_FFN_GATE]]
    return names


class Model:
    """An mllama GGUF model on one device.

    Args:
      path: the .gguf file.
      device: "cpu", "cuda" or "cuda:N".
      n_ctx: maximum number of tokens in one session (self-attention KV cache length).
      n_threads: CPU threads (None: all available cores); sets the process-wide pool.
      vision: False loads the text decoder only (the vision weights stay untouched on disk).
      kv_type: "f16" (default) or "f32" KV cache and cached cross-attention K/V.

    Raises ModelFileError (a ValueError) for a missing, corrupt, truncated or
    non-mllama file, before any tensor is used.

    Threads: one Model holds ONE sequence (its KV cache), so calls from several threads are
    serialised by a lock, never interleaved. `generate()` and `forward()` hold the model for
    their whole sequence (a stream from its first item until it is exhausted or closed), so
    concurrent calls return exactly what they would return one after another; the others
    wait. `reset()`, `encode_images()` and `eval()` are each atomic, but a sequence of them is
    the caller's: do not mix them from several threads. A thread that starts a call while its
    own stream is still unfinished gets a RuntimeError (instead of waiting for itself).
    (Sessions, later, will run several sequences at once.)
    """

    def __init__(self, path, device: str = "cpu", n_ctx: int = 4096, n_threads: int | None = None,
                 vision: bool = True, kv_type: str = "f16"):
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or not 0 < n_ctx <= MAX_N_CTX:
            raise ValueError(f"n_ctx must be an integer in [1, {MAX_N_CTX}], got {n_ctx!r}")
        if kv_type not in ("f16", "f32"):
            raise ValueError(f"kv_type must be 'f16' or 'f32', got {kv_type!r}")
        if n_threads is not None:
            if not isinstance(n_threads, (int, np.integer)) or n_threads <= 0:
                raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}")
            _core.set_num_threads(int(n_threads))
        t_load = time.perf_counter()
        self.path = os.fspath(path)
        f = open_gguf(self.path)
        check_architecture(f, self.path)
        check_tensor_types(f)
        thp = text_hparams(f, self.path)
        has_vision_tensors = any(name.startswith(VISION_PREFIXES) for name in f.tensors)
        vhp = None
        if vision and has_vision_tensors:
            vhp = vision_hparams(f, self.path, thp["hidden_size"])
        elif vision and not has_vision_tensors:
            raise ModelFileError(f"{self.path}: the file has no vision tensors (v.*, mm.*); load it with vision=False")

        # Hand over the mapped arrays (no copy); the vision ones only when used. The core
        # uploads them and builds the vision encoder at the first encode_images, so a
        # text-only session never reads them; their presence is checked now.
        tensors = {name: tensor_entry(t) for name, t in f.tensors.items()
                   if vhp is not None or not name.startswith(VISION_PREFIXES)}
        if K.Q_FORMAT_VERSION not in f.metadata:
            ollama_norms(tensors, thp)
        if vhp is not None:
            missing = [n for n in required_vision_tensors(vhp) if n not in tensors]
            if missing:
                raise ModelFileError(f"{self.path}: missing vision tensor(s): {', '.join(missing[:8])}"
                                     + (" ..." if len(missing) > 8 else ""))
        try:
            self._core = _core.MllamaModel(tensors, thp, vhp, device, int(n_ctx), kv_type)
        except (RuntimeError, ValueError) as e:
            # Everything the core is given comes from the file (tensors, hyper-parameters) except
            # the device: a missing / misshaped tensor or an unusable hyper-parameter is the
            # file's fault, a missing CUDA build or GPU is not.
            msg = str(e)
            if "cuda" in msg.lower() or "device" in msg.lower():
                raise
            raise ModelFileError(f"{self.path}: {msg}") from e
        self._reader = f  # the GGUFFile (metadata); the tensor arrays keep the mapping alive
        self._tensors = tensors
        self.text_hparams = thp
        self.vision_hparams = vhp
        self.device = device
        self.kv_type = kv_type
        self.n_ctx = int(n_ctx)
        # the context length the model was trained for (None if the file does not say); the
        # command line warns when n_ctx exceeds it
        n_train = field_value(f, K.CONTEXT_LENGTH)
        ok = isinstance(n_train, (int, np.integer)) and not isinstance(n_train, bool) and n_train > 0
        self.n_ctx_train = int(n_train) if ok else None
        n_embd_rows = thp["vocab_size"] + 8  # token_embd rows (HF: vocab_size + 8; <|image|> = vocab_size)
        # Files without the key (Ollama's) use HF's convention: <|image|> = vocab_size (11B: 128256).
        self.image_token_id = _check(HP.check_token_id, field_value(f, K.Q_IMAGE_TOKEN_ID, thp["vocab_size"]),
                                     n_embd_rows, K.Q_IMAGE_TOKEN_ID, path=self.path)
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
                self.processor = Processor(self.tokenizer, ProcessorSettings.from_gguf(f, self.tokenizer))
            self.stop_ids = stop_ids_from_gguf(f, self.tokenizer)
            self.generation_defaults = generation_defaults_from_gguf(f)
            SamplingParams(**self.generation_defaults)  # a NaN temperature in the file fails here, not per call
        except ModelFileError:
            raise
        except (ValueError, TypeError, OverflowError) as e:  # the frontends' checks (out-of-range mllama_q.image.*
            # settings: mllama_q/hparams.py; general.sampling.* values) of what the file says
            raise ModelFileError(f"{self.path}: bad tokenizer / processor / generation metadata ({e})") from e
        self.max_images = HP.MAX_IMAGES_PER_PROMPT
        self._lock = threading.Lock()   # the one sequence (see the class docstring)
        self._holder = None             # thread ident holding _lock (for the same-thread error)
        self.load_time_s = time.perf_counter() - t_load  # reported by generate() as timings["load_s"]

    # -- session ---------------------------------------------------------------
    @property
    def n_past(self) -> int:
        """Tokens evaluated since the last reset()."""
        return self._core.n_past

    @property
    def has_vision(self) -> bool:
        return self._core.has_vision

    # -- the lock (see the class docstring) --------------------------------------
    def _acquire(self) -> None:
        if self._holder == threading.get_ident():
            raise RuntimeError("this thread is still generating with this Model (an unfinished stream?): "
                               "exhaust it or call its close() before the next call")
        self._lock.acquire()
        self._holder = threading.get_ident()

    def _release(self) -> None:
        self._holder = None
        self._lock.release()

    @contextlib.contextmanager
    def _held(self):
        self._acquire()
        try:
            yield _HeldModel(self)
        finally:
            self._release()

    def reset(self) -> None:
        """Forget every evaluated token and image."""
        with self._held() as m:
            m.reset()

    def encode_images(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> None:
        """Run the vision tower on a set of images (MllamaProcessor's arrays, batch 1) and cache
        the cross-attention K/V every later token reads; replaces the previous image set.
        Ids and masks are range-checked by the core (any integer dtype); NaN/inf pixels are refused."""
        with self._held() as m:
            m.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)

    def eval(self, tokens, cross_attention_mask=None) -> np.ndarray:
        """Evaluate `tokens` after the cached ones; returns float32 logits [vocab] of the last token.

        cross_attention_mask: int [n_tokens, n_images, max_tiles] (MllamaProcessor's
        rows for these tokens). None repeats the last row given since the images
        were encoded, as transformers' generate() does for each new token.
        """
        with self._held() as m:
            return m.eval(tokens, cross_attention_mask)

    def forward(self, input_ids, pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None,
                cross_attention_mask=None) -> np.ndarray:
        """Logits float32 [seq, vocab] for one sequence from an empty cache (resets the session).

        Arguments as MllamaProcessor returns them (batch 1; a leading batch axis
        of 1 is accepted). Without pixel_values the cross-attention layers are
        skipped, as in transformers for text-only input.
        """
        toks = self._tokens(input_ids)
        if len(toks) > self.n_ctx:
            raise ValueError(f"prompt of {len(toks)} tokens is longer than the context n_ctx={self.n_ctx}")
        with self._held() as m:
            m.reset()
            if pixel_values is not None:
                if aspect_ratio_ids is None or aspect_ratio_mask is None:
                    raise ValueError("pixel_values needs aspect_ratio_ids and aspect_ratio_mask")
                m.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
            mask = None
            if cross_attention_mask is not None and pixel_values is not None:
                mask = np.ascontiguousarray(cross_attention_mask)
            return self._core.eval(toks, mask, True)

    def generate(self, *args, stream: bool = False, **kwargs):
        """Text generation; see mllama_q.generate.generate. Holds the model for the whole
        generation (a stream: from its first item until it ends or is closed)."""
        from .generate import GenerationStream, generate

        if not stream:
            with self._held() as m:
                return generate(m, *args, **kwargs)
        inner = generate(_HeldModel(self), *args, stream=True, **kwargs)  # builds the prompt now

        def held():
            self._acquire()  # at the first item: a stream never iterated holds nothing
            try:
                for piece in inner:
                    yield piece
                return inner.result
            finally:
                inner.close()
                self._release()

        return GenerationStream(held())

    # -- the operations, for a caller holding the lock ----------------------------
    def _reset(self) -> None:
        self._core.reset()

    def _encode_images(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> None:
        if not self.has_vision:
            raise ValueError("this model was loaded with vision=False (or the file has no vision tower)")
        px = np.asarray(pixel_values)
        if px.ndim >= 5:  # [(1,) n_images, max_tiles, C, H, W]
            _check(HP.check_image_count, int(px.shape[-5]), self.max_images)
        if not self._core.vision_loaded:
            try:
                self._core.load_vision()  # first use: upload the vision weights, build the encoder
            except RuntimeError as e:  # a misshaped vision tensor
                if "tensor" in str(e):
                    raise ModelFileError(f"{self.path}: {e}") from e
                raise
        # ids and masks keep their integer dtype: the core range-checks them before narrowing
        self._core.encode_images(np.ascontiguousarray(px, dtype=np.float32), np.ascontiguousarray(aspect_ratio_ids),
                                 np.ascontiguousarray(aspect_ratio_mask))

    def _eval(self, tokens, cross_attention_mask=None) -> np.ndarray:
        toks = self._tokens(tokens)
        if self.n_past + len(toks) > self.n_ctx:
            raise ValueError(f"{self.n_past} cached + {len(toks)} new tokens exceed the context n_ctx={self.n_ctx}")
        mask = None if cross_attention_mask is None else np.ascontiguousarray(cross_attention_mask)
        return self._core.eval(toks, mask, False)[0]

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
        return (f"Model({self.path!r}, device={self.device!r}, layers={h['n_layer']}, hidden={h['hidden_size']}, "
                f"vision={self.vision_hparams is not None}, n_ctx={self.n_ctx})")


class _HeldModel:
    """The model API that generate() drives (mllama_q/generate.py's docstring), for a caller
    that holds the Model's lock: the same object with the unlocked operations."""

    def __init__(self, model: Model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def reset(self) -> None:
        self._model._reset()

    def encode_images(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> None:
        self._model._encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)

    def eval(self, tokens, cross_attention_mask=None) -> np.ndarray:
        return self._model._eval(tokens, cross_attention_mask)
