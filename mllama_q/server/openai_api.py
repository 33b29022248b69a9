"""OpenAI-compatible routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /v1/models/{model}.

Wire formats follow the OpenAI API reference as the `openai` Python client parses it
(openai-python src/openai/types/chat/chat_completion.py, chat_completion_chunk.py,
completion.py, completion_usage.py, model.py):
- a chat completion `{"id": "chatcmpl-...", "object": "chat.completion", "created", "model",
  "system_fingerprint", "choices": [{"index": 0, "message": {"role": "assistant", "content"},
  "logprobs": null, "finish_reason": "stop" | "length"}], "usage": {"prompt_tokens",
  "completion_tokens", "total_tokens", "prompt_tokens_details": {"cached_tokens"}}}`;
- streaming: server-sent events `data: {chunk}` of object "chat.completion.chunk" (the first
  delta carries the role, the last the finish_reason), then with
  `stream_options.include_usage` one more chunk with `choices: []` and the usage (every
  earlier chunk has `"usage": null`), then `data: [DONE]`;
- /v1/completions: object "text_completion", choices with `text`.

Parameters: max_tokens / max_completion_tokens, temperature [0, 2], top_p [0, 1] (0 = greedy),
seed, stop (string or array), stream, stream_options; top_k, min_p, repetition_penalty as
llama.cpp's and vLLM's servers accept them. Parameters this server cannot honour (n > 1,
logprobs, tools, presence/frequency penalties, JSON response formats, echo, suffix, best_of)
are refused with a 400 naming them rather than silently ignored; unknown fields are ignored.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse

from .engine import GenRequest
from .errors import APIError, bad_request
from .fields import Fields
from .images import ImageLimits, check_image_count, image_from_url
from .transport import (
    JSONTemplate,
    RunStream,
    api_route,
    collect,
    dump_json,
    openai_error,
    read_json,
    render_events,
    start_generation,
)

FINISH_REASON = {"stop_token": "stop", "stop_string": "stop", "length": "length", "context_full": "length"}
MAX_STOP = 16  # OpenAI allows 4; llama.cpp has no limit


def _ctx(request: Request):
    return request.app.state.server


def _check_model(request: Request, f: Fields) -> str:
    srv = _ctx(request)
    name = f.str("model")
    if not name:
        raise bad_request("you must provide a model parameter", param="model")
    if not srv.info.matches(name):
        raise APIError(
            404,
            f"The model `{name}` does not exist: this server serves `{srv.info.name}`",
            param="model",
            code="model_not_found",
        )
    return name


def _sampling(f: Fields) -> dict:
    """generate() keyword arguments from the request's sampling fields (only those given)."""
    out: dict = {}
    t = f.num("temperature", lo=0, hi=2)
    if t is not None:
        out["temperature"] = t
    top_p = f.num("top_p", lo=0, hi=1)
    if top_p is not None:
        if top_p == 0:
            out["temperature"] = 0.0  # only the most likely token survives: greedy
        else:
            out["top_p"] = top_p
    top_k = f.int("top_k", lo=-1)
    if top_k is not None:
        out["top_k"] = max(top_k, 0)  # llama.cpp: <= 0 disables
    min_p = f.num("min_p", lo=0, hi=1)
    if min_p is not None:
        out["min_p"] = min_p
    rp = f.num("repetition_penalty", lo=0)
    if rp is not None:
        if rp <= 0:
            raise bad_request("'repetition_penalty' must be > 0 (1 disables it)", param="repetition_penalty")
        out["repetition_penalty"] = rp
    seed = f.int("seed")
    if seed is not None:
        out["seed"] = seed % (1 << 64)  # OpenAI seeds are signed 64-bit; numpy's RNG wants >= 0
    for key in ("presence_penalty", "frequency_penalty"):
        v = f.num(key, lo=-2, hi=2)
        if v:
            raise bad_request(f"'{key}' is not supported by this server (use repetition_penalty)", param=key)
    n = f.int("n", lo=1)
    if n is not None and n != 1:
        raise bad_request("'n' > 1 is not supported: send separate requests", param="n")
    return out


def _max_tokens(f: Fields) -> int | None:
    mct = f.int("max_completion_tokens", lo=1)
    mt = f.int("max_tokens", lo=1)
    return mct if mct is not None else mt


def _stream_options(f: Fields) -> tuple[bool, bool]:
    stream = bool(f.bool("stream", False))
    so = f.object("stream_options")
    include_usage = bool(so.bool("include_usage", False)) if so is not None else False
    return stream, include_usage and stream


def _messages(f: Fields, limits: ImageLimits) -> tuple[list, list]:
    """OpenAI messages -> (template messages, decoded images in prompt order)."""
    msgs = f.list("messages", required=True)
    if not msgs:
        raise bad_request("'messages' must not be empty", param="messages")
    n_images = sum(
        1
        for m in msgs
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image_url"
    )
    check_image_count(n_images, limits, "messages")
    out, images = [], []
    for i, m in enumerate(msgs):
        mf = Fields(m, f"messages[{i}].")
        role = mf.str("role", required=True)
        if role == "developer":
            role = "system"  # OpenAI's newer name for system instructions
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(
                f"'messages[{i}].role' must be one of system, developer, user, assistant, tool; got {role!r}",
                param=f"messages[{i}].role",
            )
        if mf.list("tool_calls"):
            raise bad_request(
                f"'messages[{i}].tool_calls': tool calls are not supported by this server",
                param=f"messages[{i}].tool_calls",
            )
        content = mf.raw("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(
                f"'messages[{i}].content' must be a string or an array of content parts", param=f"messages[{i}].content"
            )
        items, has_image = [], False
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            pf = Fields(part, where + ".")
            kind = pf.str("type", required=True)
            if kind == "text":
                items.append({"type": "text", "text": pf.str("text", required=True)})
            elif kind == "image_url":
                if role != "user":
                    raise bad_request(f"'{where}': images are only supported in user messages", param=where)
                iu = pf.raw("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu  # {"url": ...}; some clients send the string
                images.append(image_from_url(url, f"{where}.image_url.url", limits))
                items.append({"type": "image"})
                has_image = True
            else:
                raise bad_request(
                    f"'{where}.type' {kind!r} is not supported (text and image_url are)", param=f"{where}.type"
                )
        if has_image:
            out.append({"role": role, "content": items})
        else:  # the template concatenates text parts; a string also suits the system-message path
            out.append({"role": role, "content": "".join(it["text"] for it in items)})
    return out, images


def _unsupported_chat(f: Fields) -> None:
    if f.bool("logprobs"):
        raise bad_request("'logprobs' is not supported by this server", param="logprobs")
    if f.int("top_logprobs"):
        raise bad_request("'top_logprobs' is not supported by this server", param="top_logprobs")
    if f.list("tools") or f.list("functions"):
        raise bad_request("tools (function calling) are not supported by this server", param="tools")
    rf = f.object("response_format")
    if rf is not None and rf.str("type", "text") != "text":
        raise bad_request(
            f"'response_format' {rf.str('type')!r} is not supported (only 'text')", param="response_format"
        )


def _chat_request(body: dict, limits: ImageLimits) -> tuple[GenRequest, bool, bool]:
    f = Fields(body)
    _unsupported_chat(f)
    messages, images = _messages(f, limits)
    stream, include_usage = _stream_options(f)
    req = GenRequest(
        messages=messages,
        images=images,
        max_new_tokens=_max_tokens(f),
        sampling=_sampling(f),
        stop=f.stop("stop", MAX_STOP),
    )
    return req, stream, include_usage


def _usage(result) -> dict:
    cached = getattr(result, "cached_tokens", None)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": int(cached or 0)},
    }


def _sse(obj) -> bytes:
    return b"data: " + dump_json(obj) + b"\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Ids:
    """id / created / model / system_fingerprint shared by every chunk of one response."""

    def __init__(self, prefix: str, obj: str, model: str):
        from mllama_q import __version__

        self.base = {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": f"mllama-q-{__version__}",
        }

    def make(self, **kw) -> dict:
        return {**self.base, **kw}


async def _stream_body(request: Request, run, ids: _Ids, include_usage: bool, chat: bool):
    usage_null = {"usage": None} if include_usage else {}

    def _choice(piece, finish) -> dict:
        if chat:
            return {"index": 0, "delta": piece, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}

    def chunk(piece, finish=None, **kw) -> bytes:
        return _sse(ids.make(choices=[_choice(piece, finish)], **{**usage_null, **kw}))

    def done(result) -> list[bytes]:
        out = [chunk({} if chat else "", FINISH_REASON.get(result.stop_reason, "stop"))]
        if include_usage:
            out.append(_sse(ids.make(choices=[], usage=_usage(result))))
        return out + [b"data: [DONE]\n\n"]

    # the text chunks: chunk({"content": piece}) (chat) or chunk(piece), encoded but for the piece once
    text = JSONTemplate(
        lambda piece: ids.make(choices=[_choice({"content": piece} if chat else piece, None)], **usage_null),
        1,
        b"data: ",
        b"\n\n",
    )
    if chat:
        yield chunk({"role": "assistant", "content": ""})
    async for b in render_events(request, run, text, lambda e: _sse(e.openai_body()), done):
        yield b


async def _complete(request: Request, chat: bool):
    srv = _ctx(request)
    body = await read_json(request, srv.config.max_body_bytes)
    model = _check_model(request, Fields(body))
    srv.engine.require_ready()
    if chat:  # images are checked here: off the event loop
        req, stream, include_usage = await asyncio.to_thread(_chat_request, body, srv.config.image_limits)
    else:
        req, stream, include_usage = _completion_request(body)
    del body  # the request holds what it needs; the parsed body (base64 images) can go while it waits
    run = await start_generation(request, srv.engine, req)
    if chat:
        ids = _Ids("chatcmpl", "chat.completion.chunk" if stream else "chat.completion", model)
    else:
        ids = _Ids("cmpl", "text_completion", model)
    if stream:
        return RunStream(_stream_body(request, run, ids, include_usage, chat), run, "text/event-stream", SSE_HEADERS)
    text, result = await collect(request, run)
    finish = FINISH_REASON.get(result.stop_reason, "stop")
    choice = (
        {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish,
        }
        if chat
        else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    )
    return JSONResponse(ids.make(choices=[choice], usage=_usage(result)))


@api_route(openai_error)
async def chat_completions(request: Request):
    return await _complete(request, chat=True)


def _completion_request(body: dict) -> tuple[GenRequest, bool, bool]:
    f = Fields(body)
    prompt = f.raw("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad_request(
                "'prompt' must be a string (or an array of exactly one string; token arrays "
                "and batches are not supported)",
                param="prompt",
            )
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string", param="prompt")
    if f.bool("echo"):
        raise bad_request("'echo' is not supported by this server", param="echo")
    if f.str("suffix"):
        raise bad_request("'suffix' is not supported by this server", param="suffix")
    if f.int("best_of", lo=1) not in (None, 1):
        raise bad_request("'best_of' > 1 is not supported by this server", param="best_of")
    if f.int("logprobs", lo=0):
        raise bad_request("'logprobs' is not supported by this server", param="logprobs")
    stream, include_usage = _stream_options(f)
    max_new = _max_tokens(f)
    req = GenRequest(
        prompt=prompt,
        max_new_tokens=16 if max_new is None else max_new,  # OpenAI's default: 16
        sampling=_sampling(f),
        stop=f.stop("stop", MAX_STOP),
    )
    return req, stream, include_usage


@api_route(openai_error)
async def completions(request: Request):
    return await _complete(request, chat=False)


def _model_object(info) -> dict:
    return {"id": info.name, "object": "model", "created": int(info.modified), "owned_by": "mllama-q"}


@api_route(openai_error)
async def list_models(request: Request):
    return JSONResponse({"object": "list", "data": [_model_object(_ctx(request).info)]})


@api_route(openai_error)
async def get_model(request: Request):
    info = _ctx(request).info
    name = request.path_params["model"]
    if not info.matches(name):
        raise APIError(
            404,
            f"The model `{name}` does not exist: this server serves `{info.name}`",
            param="model",
            code="model_not_found",
        )
    return JSONResponse(_model_object(info))
