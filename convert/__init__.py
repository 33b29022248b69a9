"""Hugging Face Mllama (Llama 3.2 Vision) checkpoint -> one GGUF file.

    from mllama_q.convert import convert
    convert("Llama-3.2-11B-Vision-Instruct", "model.gguf", "q4_k_m")

or `mllama-q convert HF_DIR -o OUT.gguf --type q4_k_m` / `python -m mllama_q.convert ...`.
The layout (keys, tensor names, transforms, quantization mix) is declared in mllama_q/gguf_keys.py.

This folder is the repository's top-level `convert/`; the wheel installs it as the
subpackage `mllama_q.convert` (pyproject.toml, [tool.scikit-build.wheel.packages]), so
no generic top-level `convert` package lands in site-packages. In a source checkout,
tools/dev_build.sh links mllama_q/convert -> ../convert for the same import path.
Never imports torch or transformers.
"""

from __future__ import annotations

from .errors import ConvertError


def convert(*args, **kwargs):
    """See mllama_q.convert.converter.convert (imported lazily to keep the import cheap)."""
    from .converter import convert as _convert

    return _convert(*args, **kwargs)


__all__ = ["convert", "ConvertError"]
