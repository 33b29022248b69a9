"""Type stub of the compiled core `mllama_q._core` (pybind11; csrc/bindings/).

Kept in sync with the bindings by tests/test_core_stub.py, which compares every name and every
parameter name here with the built module. Arrays are numpy arrays; "GGUF bytes" are the raw
blocks of a tensor as stored in the file (uint8 [rows, row_bytes] or any C-contiguous view).
Type names are the lower-case ggml names of type_info(): f32, f16, bf16, q8_0, q4_k, q6_k
(q8_k: activations only).
"""

from typing import Any

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]

# ---- block formats (bind_formats.cpp) --------------------------------------------------------

def type_info() -> dict[str, dict[str, int | bool]]:
    """Block formats compiled into the extension: {name: {ggml_type, block_size, type_size, weight}}."""

def cuda_built() -> bool:
    """True when the CUDA backend was compiled in."""

def cuda_device_count() -> int:
    """Usable CUDA devices now (0 without a driver or GPU, or without CUDA in the build)."""

def cuda_device_name(device: int = 0) -> str:
    """Name of CUDA device `device` (RuntimeError without CUDA)."""

# ---- the GGUF reader (bind_gguf.cpp; csrc/gguf/) ----------------------------------------------
# mllama_q.gguf_file.open_gguf wraps these into GGUFFile; malformed bytes raise
# mllama_q.gguf_file.ModelFileError naming the file, the entry and the byte offset.

def gguf_open(path: str) -> GGUFReader:
    """Map and parse a GGUF file (every count, length, offset and dimension bounds-checked)."""

def ggml_type_layouts() -> dict[int, tuple[str, int, int]]:
    """{ggml type id: (name, block size, bytes per block)} for every type a GGUF may carry."""

class GGUFReader:
    """A parsed, memory-mapped GGUF file. Arrays it returns are read-only views of one buffer
    over the mapping, which stays mapped while any of them lives (close() is always safe)."""

    @property
    def path(self) -> str:
        """The file's path."""
    @property
    def version(self) -> int:
        """GGUF version (2 or 3)."""
    @property
    def alignment(self) -> int:
        """general.alignment (32 when absent)."""
    @property
    def data_offset(self) -> int:
        """Byte offset of the tensor data section."""
    @property
    def size(self) -> int:
        """File size in bytes."""
    @property
    def buffer(self) -> npt.NDArray[np.uint8]:
        """Read-only uint8 [size] over the whole mapped file."""
    def keys(self) -> list[str]:
        """Metadata keys in file order."""
    def kv_type(self, i: int) -> str:
        """Type of metadata entry i: 'uint32', 'string', 'array[string]', 'array[array[int32]]', ..."""
    def kv_offset(self, i: int) -> int:
        """Byte offset of metadata entry i (its key's length field)."""
    def kv_value(self, i: int) -> Any:
        """int / float / bool / str; a read-only numpy view (numeric arrays); a GGUFStringArray
        (string arrays); a list (nested arrays)."""
    def tensors(self) -> list[tuple[str, int, tuple[int, ...], int, int, int, int]]:
        """(name, ggml_type, ne in GGUF order, absolute offset, nbytes, n_elements, table entry offset)."""
    def close(self) -> None:
        """Drop this reader's reference to the mapping."""

class GGUFStringArray:
    """A metadata array of strings, decoded one element at a time (len, [i], slices, iteration)."""

    def tolist(self) -> list[str]:
        """Every string as a Python list."""
    def raw(self, i: int) -> bytes:
        """The undecoded bytes of element i."""
    def json_list(self) -> str:
        """JSON list of the strings."""
    def json_vocab(self) -> str:
        """JSON object {string: index} (ModelFileError on a repeated string)."""
    def json_merges(self) -> str:
        """JSON list of [left, right] pairs, each element split at its first space."""

# ---- quantizers (bind_quants.cpp; csrc/quants/, bit-exact with ggml) ------------------------

def quantize(x: np.ndarray, type: str) -> npt.NDArray[np.uint8]:
    """Quantize float32 [rows, cols] to GGUF blocks: uint8 [rows, row_bytes]."""

def dequantize(data: np.ndarray, type: str, rows: int, cols: int) -> _F32:
    """Dequantize GGUF blocks (any dtype, C-contiguous bytes) to float32 [rows, cols]."""

def quant_path() -> str:
    """Instruction set of the Q4_K/Q6_K quantizer searches (scalar|avx2)."""

def set_quant_path(name: str) -> None:
    """Force the quantizer path: auto|scalar|avx2|avxvnni|avx512|amx (ValueError if unsupported). Same bytes
    on every path."""

def quant_paths() -> list[str]:
    """Quantizer paths this CPU can run."""

# ---- CPU kernels and the thread pool (bind_cpu.cpp; csrc/cpu/) ------------------------------

def matmul(x: np.ndarray, w: np.ndarray, wtype: str, n: int, k: int, route: str = "auto") -> _F32:
    """Y[M, N] = X[M, K] · Wᵀ on the CPU, with W given as GGUF bytes of N rows of K values.
    route: "auto" (the panel GEMM from 16 rows where the type has one), "tiles" (the per-row
    kernels) or "panel" for any M (csrc/cpu/matmul.h Route)."""

def bench_matmul(
    x: np.ndarray, w: np.ndarray, wtype: str, n: int, k: int, iters: int, cpu_time: bool = False, route: str = "auto"
) -> list[float]:
    """Time `iters` calls of matmul (no Python in the loop); returns seconds per call (wall
    clock, or process CPU time with cpu_time=True)."""

def bench_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, iters: int = 10) -> float:
    """Time `iters` calls of the CPU backend's attention on the given arrays (no copies);
    seconds per call."""

def measure_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth (bytes/s): all pool threads sum a `gib` GiB buffer; best of `repeats`."""

def quantize_q8_0_path(x: np.ndarray, path: str) -> npt.NDArray[np.uint8]:
    """Q8_0 activation bytes as the kernels of `path` make them (test hook)."""

def quantize_q8_K_path(x: np.ndarray, path: str) -> npt.NDArray[np.uint8]:
    """Q8_K activation bytes as the kernels of `path` make them (test hook)."""

def sample_probs(
    logits: npt.ArrayLike, history: npt.ArrayLike, params: tuple[float, int, float, float, float, float]
) -> _F32:
    """The CPU sampler's distribution f32 [V] for one logits row (csrc/cpu/sampling.h); params
    (temperature, top_k, top_p, min_p, repetition_penalty, u)."""

def cpu_features() -> dict[str, bool]:
    """Instruction-set extensions of this CPU: avx2, fma, f16c, avx512f/bw/vl/dq/vnni/bf16, avxvnni, amx (AMX-TILE +
    AMX-INT8 usable: the OS saves the tile state and granted it to this process), amx_bf16 (AMX-BF16 as well),
    amd (CPUID vendor AuthenticAMD or HygonGenuine)."""

def w_prefetch_bytes() -> int:
    """How far ahead (bytes) the decode tiles prefetch the weights into L2: 8192 on AMD (Zen),
    2048 elsewhere (csrc/cpu/matmul.cpp default_w_prefetch)."""

def amx_attention(hd: int) -> bool:
    """True when the amx path's flash attention runs head size hd on AMX-BF16 tiles on this CPU and build
    (csrc/cpu/attention_flash_amx.cpp); otherwise the amx path takes the AVX-512 kernel."""

def avxvnni_evex_build() -> bool:
    """True only in the developer check build (CMake MLLAMA_Q_AVXVNNI_EVEX, csrc/README.md): the
    avxvnni path built EVEX-encoded, so AVX-512 VNNI CPUs run it."""

def profile_enable(on: bool = True, clock: str = "wall") -> None:
    """Turn the per-op profiler on or off (also MLLAMA_Q_PROFILE=1 at start). clock: 'wall', or
    'thread_cpu' (the calling thread's CPU time: immune to other processes, the whole op cost
    only with one thread)."""

def profile_enabled() -> bool:
    """Whether the per-op profiler is on."""

def profile_reset() -> None:
    """Clear the profiler's entries."""

def profile_report() -> list[dict]:
    """Profiler entries: list of {region, op, detail, calls, seconds, flop, bytes} (ops named 'x:y' are
    phases of op x, already inside its time)."""

def cpu_path() -> str:
    """The kernel path in use: scalar, avx2, avxvnni, avx512 or amx (MLLAMA_Q_CPU_PATH or the best supported)."""

def set_cpu_path(name: str) -> None:
    """Force a kernel path: 'auto', 'scalar', 'avx2', 'avxvnni', 'avx512' or 'amx' (ValueError if unsupported)."""

def cpu_paths() -> list[str]:
    """Kernel paths this CPU can run."""

def num_threads() -> int:
    """Threads of the global pool (MLLAMA_Q_NUM_THREADS, else the CPUs available to the process)."""

def set_num_threads(n: int) -> None:
    """Resize the global thread pool (n <= 0: one per available CPU; at most 1024). Safe while
    other threads run kernels: it waits for the parallel loop in progress, if any, and every later
    loop (also of a forward pass already running) uses n threads."""

# ---- backends (bind_backend.cpp; csrc/backend/backend.h) ------------------------------------

class Backend:
    """Test binding over one compute backend ('cpu' or 'cuda'). Every call copies its inputs
    into backend memory, runs the op, synchronises and copies the result back."""

    def __init__(self, name: str = "cpu", device: int = 0) -> None: ...
    @property
    def name(self) -> str:
        """'cpu', or 'cuda:N (device name)'."""
    def matmul(self, x: np.ndarray, w: np.ndarray, wtype: str, n: int, k: int, bias: np.ndarray | None = None) -> _F32:
        """x float32 [M, K] · Wᵀ (+ bias [N]) with W as GGUF bytes of N rows of K values -> [M, N]."""
    def get_rows(self, table: np.ndarray, type: str, rows: int, cols: int, ids: npt.ArrayLike) -> _F32:
        """Rows `ids` (any integer dtype, every id checked in [0, rows) before narrowing to int32;
        ValueError otherwise) of a [rows, cols] table in GGUF bytes, as float32 [len(ids), cols]."""
    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> _F32:
        """x [rows, cols] / rms(x) * w, per row."""
    def layer_norm(self, x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> _F32:
        """(x - mean) / sqrt(var + eps) * w + b, per row."""
    def elementwise(self, op: str, a: np.ndarray, b: np.ndarray | None = None, s: float = 0.0) -> _F32:
        """op: 'add' (a + b), 'add_scaled' (a + s b), 'silu_mul' (silu(a) b) or 'gelu' (erf gelu of a)."""
    def rope(self, x: np.ndarray, pos: npt.ArrayLike, inv_freq: np.ndarray) -> _F32:
        """Interleaved-pair RoPE of x [n_tok, n_head, hd] at positions pos [n_tok] (integers in
        [0, 2**31))."""
    def attention(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        scale: float,
        mask: np.ndarray | None = None,
        causal: bool = False,
        q_offset: int = 0,
    ) -> _F32:
        """softmax(scale q·kᵀ + mask) v with GQA: q [nq, n_head, hd], k/v [nk, n_kv, hd] (float16 or
        float32), mask [nq, nk] additive; causal: key j visible iff j <= i + q_offset. A row with
        nothing visible is zeros."""
    def store_rows_f16(self, src: np.ndarray) -> npt.NDArray[np.uint16]:
        """float32 rows stored as IEEE half bits (the KV cache format)."""
    def attention_segments(
        self, q: np.ndarray, segments: list[tuple[int, int, np.ndarray, np.ndarray, int, bool]], scale: float
    ) -> _F32:
        """Backend::attention_segments: q [nq, n_head, hd]; each segment (q_row, n_q, k, v, q_offset,
        causal) attends its rows to its own k/v [n_k, n_kv, hd] (float32 or float16, the same for all).
        Rows no segment covers are returned as q. Batch-invariant on the CPU."""
    def sample(
        self,
        logits: np.ndarray,
        histories: list[npt.ArrayLike],
        params: list[tuple[float, int, float, float, float, float]],
    ) -> npt.NDArray[np.int32]:
        """Backend::sample: one id per logits row [n, V], with that row's token history (int32) and
        (temperature, top_k, top_p, min_p, repetition_penalty, u) (transformers' rules, draw u)."""

# ---- the model (bind_model.cpp; csrc/model/) -------------------------------------------------

class StepAborted(RuntimeError):
    """MllamaModel.step was stopped by abort() between two layers; nothing was committed."""

class ImageKV:
    """Cross-attention K/V of one encoded image (shared by the sequences that show it)."""

    @property
    def n_tiles(self) -> int: ...
    @property
    def n_patches(self) -> int: ...
    @property
    def nbytes(self) -> int:
        """Backend bytes of its K/V (every cross-attention layer)."""

class ImageJob:
    """An image being encoded; step() runs one unit (embeddings, one vision layer, the projector,
    the cross-attention K/V)."""

    def step(self) -> bool:
        """Run the next unit; False when the image is done."""
    @property
    def done(self) -> int: ...
    @property
    def total(self) -> int: ...
    @property
    def finished(self) -> bool: ...
    def result(self) -> ImageKV: ...

class SeqSnapshot:
    """A saved sequence slot state (MllamaModel.seq_snapshot)."""

    @property
    def nbytes(self) -> int: ...

# (slot, tokens int32 [n], HF cross_attention_mask rows int32 [n, n_img, max_tiles] | None,
#  logits 0 (none) | 1 (last row) | 2 (every row),
#  sample (temperature, top_k, top_p, min_p, repetition_penalty, u) | None)
_Sample = tuple[float, int, float, float, float, float]
# (slot, tokens, mask, logits 0|1|2, sample | None[, decode: bool]): decode rows (a generating
# sequence's next token) take the per-row kernels, prompt rows the prompt ones, whatever shares
# the step, so a sequence's logits do not depend on its batch. Without the flag: decode rows
# when the entry has one token (Model.eval's next token), else prompt rows.
_StepEntry = (
    tuple[int, np.ndarray, np.ndarray | None, int, _Sample | None]
    | tuple[int, np.ndarray, np.ndarray | None, int, _Sample | None, bool]
)

class MllamaModel:
    """The compiled mllama model. Built by mllama_q.Model from a GGUF file:
    MllamaModel(tensors, text_hparams, vision_hparams, device, n_ctx, kv_type, n_seq)
      tensors: {name: (array, ggml_type, shape)} (mapped GGUF data, not copied)
      n_seq: sequence slots, each with an n_ctx-token KV cache (csrc/model/mllama.h)."""

    def __init__(
        self,
        tensors: dict[str, tuple[np.ndarray, int, tuple[int, ...]]],
        text_hparams: dict[str, Any],
        vision_hparams: dict[str, Any] | None = None,
        device: str = "cpu",
        n_ctx: int = 4096,
        kv_type: str = "f16",
        n_seq: int = 1,
    ) -> None: ...
    def begin_image(self, pixel_values: np.ndarray, aspect_ratio_id: int, aspect_ratio_mask: npt.ArrayLike) -> ImageJob:
        """Start encoding one image: pixel_values f32 [max_tiles, C, H, W], its aspect-ratio id,
        aspect_ratio_mask [max_tiles]."""
    def image_from_states(self, states: np.ndarray) -> ImageKV:
        """Cross-attention K/V from ready projector outputs f32 [n_tiles, n_patches, hidden]."""
    def seq_len(self, slot: int) -> int:
        """Tokens in the slot's KV cache."""
    def seq_truncate(self, slot: int, n: int) -> None:
        """Keep the slot's first n tokens (n <= seq_len)."""
    def seq_set_images(self, slot: int, images: list[ImageKV]) -> None:
        """The images the slot's prompt shows, in prompt order (the mask rows' image axis)."""
    def seq_n_images(self, slot: int) -> int: ...
    def seq_snapshot(self, slot: int, first: int) -> SeqSnapshot:
        """Save the slot's state from token `first` on (cache rows, images, length)."""
    def seq_restore(self, slot: int, snapshot: SeqSnapshot) -> None: ...
    def step(self, entries: list[_StepEntry]) -> list[tuple[_F32 | None, int]]:
        """ONE forward pass over every entry (distinct slots): the tokens are appended to the
        slots' caches; returns (logits [n, V] / [V] / None, sampled id or -1) per entry. Raises
        StepAborted after abort()."""
    def abort(self) -> None:
        """Stop the running step between two layers (any thread, no lock)."""
    def clear_abort(self) -> None: ...
    def load_vision(self) -> None:
        """Upload the vision weights and build the encoder now."""
    @property
    def n_ctx(self) -> int:
        """KV cache length of one slot, in tokens."""
    @property
    def n_seq(self) -> int:
        """Sequence slots."""
    @property
    def kv_bytes_per_seq(self) -> int:
        """Self-attention KV cache bytes of one slot (every layer, K and V)."""
    @property
    def image_bytes(self) -> int:
        """Cross-attention K/V bytes of one image (max_tiles tiles; 0 without vision)."""
    @property
    def has_vision(self) -> bool:
        """vision_hparams were given."""
    @property
    def vision_loaded(self) -> bool:
        """The vision weights were uploaded and the encoder built (first image)."""
    @property
    def device(self) -> str:
        """The backend's name ('cpu', 'cuda:N (...)')."""

class VisionEncoder:
    """Mllama vision tower + projector (test binding over one backend)."""

    def __init__(
        self,
        tensors: dict[str, tuple[np.ndarray, int, tuple[int, ...]]],
        hparams: dict[str, Any],
        device: str = "cpu",
        device_id: int = 0,
    ) -> None: ...
    def encode(
        self, pixel_values: np.ndarray, aspect_ratio_ids: npt.ArrayLike, aspect_ratio_mask: npt.ArrayLike
    ) -> _F32:
        """pixel_values float32 [n_img, max_tiles, C, H, W] -> projector outputs
        [n_img, max_tiles, n_patches, out_dim]."""
    @property
    def num_patches(self) -> int:
        """Positions per tile: (image_size / patch_size)^2 + 1 (the class token)."""
