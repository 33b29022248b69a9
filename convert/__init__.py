"""Hugging Face Mllama (Llama 3.2 Vision) checkpoint -> one GGUF file.

    from convert import convert
    convert("Llama-3.2-11B-Vision-Instruct", "model.gguf", "q4_k_m")

or `mllama-q convert HF_DIR -o OUT.gguf --type q4_k_m` / `python -m convert ...`.
The layout (keys, tensor names, transforms) is declared in mllama_q/gguf_keys.py.
Never imports torch or transformers.
"""
from __future__ import annotations

from .errors import ConvertError


def convert(*args, **kwargs):
    """See convert.converter.convert (imported lazily to keep `import convert` cheap)."""
    from .converter import convert as _convert

    return _convert(*args, **kwargs)


__all__ = ["convert", "ConvertError"]
