"""mllama-q: a quantized runtime for Llama 3.2 Vision (mllama).

    from mllama_q import Model
    with Model("llama-3.2-11b-vision-q4_k_m.gguf") as model:
        print(model.generate(messages=[...], images=[...]).text)

Package layout: the runtime (model, gguf_file, gguf_keys, processor, tokenizer, chat,
generate, sampling, quants; the compiled core `_core`) is the library. The converter is
`mllama_q.convert`; the command line and developer tools (demo, bench, self-check,
synthetic models) are `mllama_q.cli`, which the runtime never imports.

`import mllama_q` is cheap: the names below are imported on first use (PEP 562).
"""

from __future__ import annotations

__version__ = "0.1.0"

# name -> (module, attribute); resolved lazily by __getattr__
_LAZY = {
    "Model": ("mllama_q.model", "Model"),
    "ModelFileError": ("mllama_q.gguf_file", "ModelFileError"),
    "ModelFileNotFoundError": ("mllama_q.gguf_file", "ModelFileNotFoundError"),
}

__all__ = ["backends", "__version__", *_LAZY]


# False until bench/RESULTS.md holds results measured on a GPU: the CUDA backend compiles, but
# none of its kernels has run on a device yet (README.md, "CUDA status").
_CUDA_VERIFIED = False


def backends() -> dict:
    """What was built into the extension and what can run now.

    Returns ``{"cpu": {...}, "cuda": {...}}`` where each entry has ``built``, ``usable`` and
    ``verified`` booleans plus details (CPU kernel paths, CUDA device names) and a one-line
    ``status``. The CUDA backend is built but not yet verified on a GPU (``verified`` False).
    """
    from . import _core

    built = bool(_core.cuda_built())
    n_dev = _core.cuda_device_count() if built else 0
    if not built:
        cuda_status = "not built (no nvcc at build time)"
    elif _CUDA_VERIFIED:
        cuda_status = "built and verified on a GPU (bench/RESULTS.md)"
    else:
        cuda_status = (
            "built but NOT YET VERIFIED on a GPU: no kernel has run on a device; "
            "correctness and speed unknown until bench/RESULTS.md holds measured results"
        )
    return {
        "cpu": {
            "built": True,
            "usable": True,
            "verified": True,
            "status": "built and tested (tests/ on every kernel path)",
            "paths": list(_core.cpu_paths()),
            "active_path": _core.cpu_path(),
            "threads": _core.num_threads(),
        },
        "cuda": {
            "built": built,
            "usable": n_dev > 0,
            "verified": built and _CUDA_VERIFIED,
            "status": cuda_status,
            "devices": [_core.cuda_device_name(i) for i in range(n_dev)],
        },
    }


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # next access skips __getattr__
        return value
    raise AttributeError(f"module 'mllama_q' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
