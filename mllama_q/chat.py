"""Chat messages -> prompt text with the checkpoint's jinja2 chat template (no transformers).

Same message format and same rendering environment as transformers' `apply_chat_template`
(transformers/utils/chat_template_utils.py: `_cached_compile_jinja_template`,
`render_jinja_template`): a sandboxed jinja2 environment with trim_blocks + lstrip_blocks and
the loopcontrols extension, a `tojson` filter that does not HTML-escape, and the globals
`raise_exception`, `strftime_now`, `namespace`; the tokenizer's special tokens (bos_token, ...)
are template variables.

Messages: [{"role": "user" | "assistant" | "system" | ..., "content": str | [item, ...]}] where an
item is {"type": "text", "text": "..."} or {"type": "image"} (optionally carrying the image
itself under "image", "path" or "url"; the template only sees that the item is an image).
"""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE_PATH = Path(__file__).parent / "assets" / "llama3_2_vision_chat_template.jinja"


def default_template() -> str:
    """Llama 3.2 Vision Instruct's template, for GGUF files that carry none."""
    return DEFAULT_TEMPLATE_PATH.read_text(encoding="utf-8")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its raise_exception), or failed to render."""


def _raise_exception(message):
    raise ChatTemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace() without underscore attributes (as transformers' sandbox does)."""

    def __init__(*args, **kwargs):  # noqa: N805  (same signature trick as jinja2.utils.Namespace)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} not allowed")


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from None


def _plain(value: Any) -> Any:
    """Only JSON-like data reaches the template; images, arrays, paths become "<TypeName>"
    placeholders (transformers does the same in `_plain_template_data`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalars
    return f"<{type(value).__name__}>"


def validate_messages(messages: Sequence[Mapping]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"message {i} must be a dict with a 'role' (got {m!r})")
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            for item in content:
                if not isinstance(item, Mapping) or item.get("type") not in ("text", "image"):
                    raise ValueError(f"message {i}: content items must be {{'type': 'text'|'image', ...}}, "
                                     f"got {item!r}")
                if item["type"] == "text" and not isinstance(item.get("text"), str):
                    raise ValueError(f"message {i}: a text item needs a 'text' string")
        elif content is not None and not isinstance(content, str) and "tool_calls" not in m:
            raise ValueError(f"message {i}: content must be a string or a list of items")


def render(template: str, messages: Sequence[Mapping], *, add_generation_prompt: bool = False,
           special_tokens: Mapping[str, str] | None = None, tools: Sequence[Mapping] | None = None,
           **kwargs) -> str:
    """Render one conversation. `special_tokens` (bos_token, eos_token, ...) and `kwargs` (e.g.
    date_string) are template variables, as in transformers' apply_chat_template."""
    validate_messages(messages)
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return _compile(template).render(
            messages=_plain(list(messages)), tools=_plain(list(tools)) if tools is not None else None,
            documents=None, add_generation_prompt=add_generation_prompt, **_plain(variables))
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None


def message_images(messages: Sequence[Mapping]) -> list:
    """The images attached to image items ("image", "path" or "url" key), in prompt order.
    Items with no image attached give None."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            for item in content:
                if isinstance(item, Mapping) and item.get("type") == "image":
                    out.append(next((item[k] for k in ("image", "path", "url") if item.get(k) is not None), None))
    return out


class ChatTemplate:
    """A tokenizer's chat template bound to its special tokens."""

    def __init__(self, template: str | None, tokenizer=None):
        self.template = template if template else default_template()
        self.special_tokens: dict[str, str] = {}
        if tokenizer is not None:
            for name in ("bos", "eos", "pad"):
                tid = getattr(tokenizer, f"{name}_id", None)
                if tid is not None:
                    self.special_tokens[f"{name}_token"] = tokenizer.id_to_token(tid)
        _compile(self.template)  # fail early on a broken template

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **kwargs) -> str:
        return render(self.template, messages, add_generation_prompt=add_generation_prompt,
                      special_tokens=self.special_tokens, **kwargs)
