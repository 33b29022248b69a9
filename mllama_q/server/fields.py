"""Reading untrusted JSON request bodies: parse once, then typed accessors that name the field.

Every accessor treats a missing key and JSON `null` alike (the reference APIs do: OpenAI's
optional fields are nullable, Go's encoding/json leaves a null field at its zero value) and
raises `APIError(400)` naming the field (OpenAI's `param`) for a value of the wrong type or out
of range. Unknown keys are never looked at, so they are ignored as both reference APIs ignore
them.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from .errors import APIError, bad_request


def parse_json_object(body: bytes) -> dict:
    """The request body as a JSON object. Rejects: an empty body, invalid UTF-8 or JSON, NaN /
    Infinity (not JSON), nesting too deep for the parser, anything but an object at the top."""
    if not body or not body.strip():
        raise bad_request("missing request body: send a JSON object")

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        obj = json.loads(body, parse_constant=no_constants)
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not UTF-8 text: {e}") from None
    except RecursionError:
        raise bad_request("invalid JSON in the request body: nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, NaN/Infinity, integers with too many digits
        raise bad_request(f"invalid JSON in the request body: {e}") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


class Fields:
    """Typed access to one JSON object; `where` prefixes field names in messages
    (e.g. "messages[2]." or "options.")."""

    def __init__(self, obj: Mapping, where: str = ""):
        if not isinstance(obj, Mapping):
            raise bad_request(f"{where.rstrip('.') or 'the body'} must be a JSON object, got {_json_type(obj)}")
        self.obj = obj
        self.where = where

    def _name(self, key: str) -> str:
        return f"{self.where}{key}"

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def raw(self, key: str) -> Any:
        return self.obj.get(key)

    def _fail(self, key: str, what: str, value: Any) -> APIError:
        shown = json.dumps(value)[:80] if not isinstance(value, (dict, list)) else _json_type(value)
        return bad_request(f"'{self._name(key)}' must be {what}, got {shown}", param=self._name(key))

    def str(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        v = self.obj.get(key)
        if v is None:
            if required:
                raise bad_request(f"'{self._name(key)}' is required", param=self._name(key))
            return default
        if not isinstance(v, str):
            raise self._fail(key, "a string", v)
        return v

    def bool(self, key: str, default: bool | None = None) -> bool | None:
        v = self.obj.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self._fail(key, "a boolean", v)
        return v

    def int(
        self,
        key: str,
        default: int | None = None,
        *,
        lo: int | None = None,
        hi: int | None = None,
        truncate: bool = False,
    ) -> int | None:
        """An integer; an integral float (5.0) is accepted, and with `truncate` any finite float
        is cut toward zero (Ollama: api/types.go Options.FromMap does int64(float64))."""
        v = self.obj.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._fail(key, "an integer", v)
        if isinstance(v, float):
            if not math.isfinite(v) or (not truncate and not v.is_integer()):
                raise self._fail(key, "an integer", v)
            if abs(v) >= 2.0**63:
                raise self._fail(key, "an integer within 64 bits", v)
            v = int(v)
        _check_range(self._name(key), v, lo, hi)
        return v

    def num(
        self, key: str, default: float | None = None, *, lo: float | None = None, hi: float | None = None
    ) -> float | None:
        v = self.obj.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._fail(key, "a number", v)
        _check_range(self._name(key), v, lo, hi)
        return float(v)

    def list(self, key: str, *, required: bool = False, max_len: int | None = None) -> list | None:
        v = self.obj.get(key)
        if v is None:
            if required:
                raise bad_request(f"'{self._name(key)}' is required", param=self._name(key))
            return None
        if not isinstance(v, list):
            raise self._fail(key, "an array", v)
        self._check_len(key, v, max_len)
        return v

    def _check_len(self, key: str, items: list, max_len: int | None) -> None:
        if max_len is not None and len(items) > max_len:
            raise bad_request(
                f"'{self._name(key)}' has {len(items)} entries, at most {max_len} are allowed", param=self._name(key)
            )

    def object(self, key: str) -> "Fields | None":
        v = self.obj.get(key)
        if v is None:
            return None
        if not isinstance(v, Mapping):
            raise self._fail(key, "an object", v)
        return Fields(v, f"{self._name(key)}.")

    def stop(self, key: str, max_len: int | None = None) -> list[str] | None:
        """A stop string or an array of them (OpenAI: up to 4); empty strings are dropped."""
        v = self.obj.get(key)
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise self._fail(key, "a string or an array of strings", v)
        self._check_len(key, items, max_len)
        return [s for s in items if s] or None


def _check_range(name: str, v, lo, hi) -> None:
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if lo is not None and hi is not None:
            rng = f"between {lo} and {hi}"
        elif lo is not None:
            rng = f">= {lo}"
        else:
            rng = f"<= {hi}"
        raise bad_request(f"'{name}' must be {rng}, got {v}", param=name)
