"""The converter's one error type: a one-line message naming the file or tensor at fault."""

from __future__ import annotations


class ConvertError(ValueError):
    """Bad input or a failed conversion. `str(e)` is a single line for the user."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # force one line
