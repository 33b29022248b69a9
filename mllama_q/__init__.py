"""mllama-q: a quantized runtime for Llama 3.2 Vision (mllama)."""
from __future__ import annotations

__version__ = "0.1.0"

from . import _core  # noqa: E402  (compiled extension)


def backends() -> dict:
    """What was built into the extension and what can run now.

    Returns ``{"cpu": {...}, "cuda": {...}}`` where each entry has ``built`` and
    ``usable`` booleans plus details (CPU kernel paths, CUDA device names).
    """
    n_dev = _core.cuda_device_count() if _core.cuda_built() else 0
    return {
        "cpu": {
            "built": True,
            "usable": True,
            "paths": list(_core.cpu_paths()),
            "active_path": _core.cpu_path(),
            "threads": _core.num_threads(),
        },
        "cuda": {
            "built": bool(_core.cuda_built()),
            "usable": n_dev > 0,
            "devices": [_core.cuda_device_name(i) for i in range(n_dev)],
        },
    }


__all__ = ["backends", "__version__"]

from .gguf_file import ModelFileError, ModelFileNotFoundError  # noqa: E402
from .model import Model  # noqa: E402

__all__ += ["Model", "ModelFileError", "ModelFileNotFoundError"]
