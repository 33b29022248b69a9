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

The template comes from the model file, so it is untrusted code. jinja2's sandbox keeps it from
touching Python internals but not from running forever or building a 4 GB string, so on top of
it (see _BoundedEnvironment): every string / list it builds by `*`, `+`, `~`, `%`, joins,
filters and str methods is checked BEFORE it is built against MAX_OUTPUT_CHARS, integer
arithmetic against MAX_INT_BITS, integer arguments of calls and filters (widths, counts)
against MAX_OUTPUT_CHARS, the rendered text against MAX_OUTPUT_CHARS, and the rendering time
against RENDER_TIMEOUT_S (checked in every call, filter and loop iteration: the compiled
template's `for` loops iterate through _bounded_iter). Every failure is a ChatTemplateError,
raised within milliseconds of the limit.
"""

from __future__ import annotations

import dataclasses
import json
import re
import reprlib
import threading
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE_PATH = Path(__file__).parent / "assets" / "llama3_2_vision_chat_template.jinja"

# Limits of one render. A real prompt is at most n_ctx tokens (131072 for Llama 3.2, about
# 0.6 M characters); 4 M characters leave room for any real conversation.
MAX_OUTPUT_CHARS = 4 << 20
MAX_INT_BITS = 1 << 16  # integers a template computes (2**65536 is already absurd)
# Time limit: RENDER_TIMEOUT_S plus RENDER_S_PER_CHAR per character of the conversation (the
# Llama 3.2 template loops over every character of a string content to look for images: about
# 1 us each, so a 250k-character message takes ~0.3 s; short conversations render in ~1 ms).
RENDER_TIMEOUT_S = 2.0
RENDER_S_PER_CHAR = 20e-6
MAX_MESSAGE_DEPTH = 32  # nesting of message data handed to the template


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


class _TemplateTimeout(Exception):
    pass


def _too_big(what: str, n: int):
    raise ChatTemplateError(
        f"chat template refused: {what} would hold {n:,} characters or items (limit {MAX_OUTPUT_CHARS:,})"
    )


def _len(x) -> int:
    return len(x) if isinstance(x, (str, list, tuple)) else 0


def _check_int_args(args, kwargs, what: str) -> None:
    """Widths, counts and repeat factors: an int argument beyond MAX_OUTPUT_CHARS can only
    make an output beyond it (center, ljust, zfill, indent, batch, slice, ...)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_OUTPUT_CHARS:
            _too_big(f"{what}(..., {a}, ...)", abs(a))


_WIDTH = re.compile(r"\d{%d,}" % len(str(MAX_OUTPUT_CHARS)))


def _check_format_string(fmt: str, what: str) -> None:
    """printf / str.format field widths written in the format string itself ('%999999999s')."""
    for m in _WIDTH.finditer(fmt):
        if int(m.group()) > MAX_OUTPUT_CHARS:
            _too_big(f"{what} field width {m.group()}", int(m.group()))


def _check_str_op(name: str, s: str, args, kwargs) -> None:
    """str methods and filters whose output can be much larger than their input."""
    strs = [a for a in (*args, *kwargs.values()) if isinstance(a, str)]
    if name in ("replace", "indent", "wordwrap"):
        # each character (or line) of `s` can turn into the longest string argument
        n = len(s) * (max(map(len, strs), default=0) + 1)
        if n > MAX_OUTPUT_CHARS:
            _too_big(f"{name} on {len(s):,} characters", n)
    elif name == "expandtabs":
        size = next((a for a in (*args, *kwargs.values()) if isinstance(a, int)), 8)
        n = len(s) + s.count("\t") * max(size, 0)
        if n > MAX_OUTPUT_CHARS:
            _too_big("expandtabs", n)
    elif name in ("format", "format_map"):
        _check_format_string(s, name)


def _check_join(sep, items) -> list:
    if not isinstance(items, (list, tuple, str)):
        items = list(items)
    n = sum(_len(x) for x in items) + len(sep) * len(items)
    if n > MAX_OUTPUT_CHARS:
        _too_big("join", n)
    return items


def _bounded_concat(seq) -> str:
    items = list(seq)
    n = sum(_len(x) for x in items)
    if n > MAX_OUTPUT_CHARS:
        _too_big("concatenation", n)
    return "".join(items)


def _bounded_join(orig):
    def join(seq):
        items = list(seq)
        n = sum(_len(x) for x in items)
        if n > MAX_OUTPUT_CHARS:
            _too_big("~ concatenation", n)
        return orig(items)

    return join


def _bounded_filter(name: str, f):
    """A jinja2 filter with the size checks applied to its value and arguments first."""
    # pass_context / pass_eval_context / pass_environment filters get that object first
    first = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0

    def bounded(*args, **kwargs):
        _check_deadline()
        value, rest = (args[first], args[first + 1 :]) if len(args) > first else (None, ())
        _check_int_args(rest, kwargs, name)
        if isinstance(value, str):
            _check_str_op(name, value, rest, kwargs)
            if name == "format":
                _check_format_string(value, "format")
        if name == "join" and value is not None:
            sep = rest[0] if rest and isinstance(rest[0], str) else kwargs.get("d", "")
            _check_join(sep if isinstance(sep, str) else "", value)
        if name == "tojson":
            indent = kwargs.get("indent", rest[1] if len(rest) > 1 else None)
            if isinstance(indent, int) and indent > 64:
                raise ChatTemplateError(f"chat template refused: tojson indent {indent} (limit 64)")
        return f(*args, **kwargs)

    if first:
        bounded.jinja_pass_arg = f.jinja_pass_arg  # keep the marker: jinja2 passes that object
    bounded.__name__ = getattr(f, "__name__", name)
    return bounded


_render_state = threading.local()  # .deadline (time.monotonic) while this thread renders


def _check_deadline() -> None:
    d = getattr(_render_state, "deadline", None)
    if d is not None and time.monotonic() > d:
        raise _TemplateTimeout()


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox plus size checks on everything that can grow (see the module docstring)."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, k in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(k, int):
                    if len(seq) * k > MAX_OUTPUT_CHARS:
                        _too_big("repetition", len(seq) * k)
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise ChatTemplateError(f"chat template refused: integer product beyond {MAX_INT_BITS} bits")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
                if right * left.bit_length() > MAX_INT_BITS:
                    raise ChatTemplateError(f"chat template refused: {left} ** {right} is beyond {MAX_INT_BITS} bits")
        elif operator == "+":
            if _len(left) + _len(right) > MAX_OUTPUT_CHARS:
                _too_big("+", _len(left) + _len(right))
        elif operator == "%" and isinstance(left, str):
            _check_format_string(left, "%")
            args = right if isinstance(right, tuple) else (right,)
            _check_int_args(args, {}, "%")
        return super().call_binop(context, operator, left, right)

    def _generate(self, source, name, filename, defer_init=False):
        """jinja2's Python source for a template, every `for` loop routed through _bounded_iter."""
        code = super()._generate(source, name, filename, defer_init=defer_init)
        return _FOR_LINE.sub(r"\1for \2 in _bounded_iter(\3):", code)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        _check_deadline()
        _check_int_args(args, kwargs, getattr(__obj, "__name__", "call"))
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        name = getattr(target, "__name__", "")
        if isinstance(owner, str):
            _check_str_op(name, owner, args, kwargs)
            if name == "join" and args:
                args = (_check_join(owner, args[0]), *args[1:])
        return ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)


def _bounded_iter(iterable):
    """What every `for` loop of a compiled template iterates through: the deadline is checked
    every 256 items, so loops whose bodies call nothing (nested loops over big lists) stop too."""
    deadline = getattr(_render_state, "deadline", None)
    for i, x in enumerate(iterable):
        if not i & 255 and deadline is not None and time.monotonic() > deadline:
            raise _TemplateTimeout()
        yield x


# `for TARGET in ITERABLE:` as jinja2's code generator writes every loop (one line each;
# template text is emitted as `yield '...'`, so it never matches).
_FOR_LINE = re.compile(r"^(\s*)for ([\w, ()]+) in (.+):$", re.M)


def _text_size(x) -> int:
    """Characters of all strings in plain (already depth-checked) template data."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, dict):
        return sum(_text_size(k) + _text_size(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return sum(_text_size(v) for v in x)
    return 0


def _render_bounded(tmpl: jinja2.Template, variables: dict) -> str:
    """Render with the output, size and time limits; raises ChatTemplateError."""
    limit = RENDER_TIMEOUT_S + RENDER_S_PER_CHAR * _text_size(variables)
    deadline = time.monotonic() + limit
    previous = getattr(_render_state, "deadline", None)
    _render_state.deadline = deadline if previous is None else min(previous, deadline)
    try:
        out, n = [], 0
        for piece in tmpl.generate(**variables):
            n += len(piece)
            if n > MAX_OUTPUT_CHARS:
                _too_big("the rendered prompt", n)
            out.append(piece)
        return "".join(out)
    except _TemplateTimeout:
        raise ChatTemplateError(f"chat template did not finish within {limit:.3g} s") from None
    finally:
        _render_state.deadline = previous


def _lipsum(n=5, html=True, min=20, max=100):  # noqa: A002  (jinja2's signature)
    """jinja2's lipsum global (a Python loop of n paragraphs), capped."""
    if not isinstance(n, int) or not 0 <= n <= 1000 or not isinstance(max, int) or max > 1000:
        raise ChatTemplateError(f"chat template refused: lipsum({n!r}, max={max!r}) (limits 1000)")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
    if len(template) > MAX_OUTPUT_CHARS:
        _too_big("the template source", len(template))
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.concat = _bounded_concat  # {% set x %}...{% endset %} and filter blocks
    env.globals["lipsum"] = _lipsum
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters["tojson"] = _bounded_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        tmpl = env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from None
    except (RecursionError, MemoryError, ValueError, OverflowError) as e:  # pathological sources
        raise ChatTemplateError(f"chat template does not compile: {type(e).__name__}: {e}") from None
    ns = tmpl.root_render_func.__globals__  # this template's own module namespace
    ns["str_join"] = _bounded_join(ns["str_join"])  # the `~` operator
    ns["markup_join"] = _bounded_join(ns["markup_join"])
    ns["_bounded_iter"] = _bounded_iter  # every loop (see _BoundedEnvironment._generate)
    return tmpl


def _plain(value: Any, depth: int = 0) -> Any:
    """Only JSON-like data reaches the template; images, arrays, paths become "<TypeName>"
    placeholders (transformers does the same in `_plain_template_data`). Nesting deeper than
    MAX_MESSAGE_DEPTH is a ValueError (not a RecursionError)."""
    if depth > MAX_MESSAGE_DEPTH:
        raise ValueError(f"message data nested deeper than {MAX_MESSAGE_DEPTH} levels")
    depth += 1
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
        return {_plain(k, depth): _plain(v, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, depth) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, depth) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), depth) for f in dataclasses.fields(value)}
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item(), depth)  # numpy scalars
    return f"<{type(value).__name__}>"


def validate_messages(messages: Sequence[Mapping]) -> None:
    # reprlib: a bounded repr (a deeply nested item must not turn the message into a RecursionError)
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"message {i} must be a dict with a 'role' (got {reprlib.repr(m)})")
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            for item in content:
                if not isinstance(item, Mapping) or item.get("type") not in ("text", "image"):
                    raise ValueError(
                        f"message {i}: content items must be {{'type': 'text'|'image', ...}}, got {reprlib.repr(item)}"
                    )
                if item["type"] == "text" and not isinstance(item.get("text"), str):
                    raise ValueError(f"message {i}: a text item needs a 'text' string")
        elif content is not None and not isinstance(content, str) and "tool_calls" not in m:
            raise ValueError(f"message {i}: content must be a string or a list of items")


def render(
    template: str,
    messages: Sequence[Mapping],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
    tools: Sequence[Mapping] | None = None,
    **kwargs,
) -> str:
    """Render one conversation. `special_tokens` (bos_token, eos_token, ...) and `kwargs` (e.g.
    date_string) are template variables, as in transformers' apply_chat_template."""
    validate_messages(messages)
    variables = {**(special_tokens or {}), **kwargs}
    data = dict(
        messages=_plain(list(messages)),
        tools=_plain(list(tools)) if tools is not None else None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **_plain(variables),
    )
    tmpl = _compile(template)
    try:
        return _render_bounded(tmpl, data)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except Exception as e:  # noqa: BLE001  the template is untrusted code: any error it raises
        # (OverflowError from the sandbox's range limit, RecursionError, TypeError, ...) is its failure
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def message_images(messages: Sequence[Mapping]) -> list:
    """The images attached to image items ("image", "path" or "url" key), in prompt order.
    Items with no image attached give None. Malformed messages are a ValueError."""
    validate_messages(messages)
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
        return render(
            self.template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **kwargs,
        )
