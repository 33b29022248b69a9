"""Ollama-compatible routes: POST /api/chat, POST /api/generate, GET /api/tags, POST /api/show,
GET /api/ps, GET|HEAD /api/version, GET|HEAD /.

Wire formats from ollama/ollama (docs/api.md; api/types.go ChatRequest, GenerateRequest,
Message, Options, ChatResponse, GenerateResponse, Metrics, ListResponse, ShowResponse,
ProcessResponse; server/routes.go handlers) at commit fb30760996871fa9460115c753afd2c60d4ab0f7:
- streaming is the default; chunks are NDJSON lines (Content-Type application/x-ndjson)
  `{"model", "created_at", "message": {"role": "assistant", "content": piece}, "done": false}`
  (/api/generate: `"response": piece`); the last has `"done": true`, `done_reason` ("stop" |
  "length", llm/server.go DoneReason), and the Metrics: total_duration, load_duration,
  prompt_eval_count, prompt_eval_duration, eval_count, eval_duration, in nanoseconds, omitted
  when zero (Go `omitempty`). `"stream": false` returns that last object with the whole text.
- errors are `{"error": "..."}` with the status (model not found: 404 "model 'x' not found";
  a bad body: 400); a failure mid-stream is one `{"error": ...}` line.
- options map as api/types.go Options.FromMap reads them: integers may arrive as JSON floats
  (truncated), a value of the wrong type is a 400 naming the option, unknown options are
  ignored. num_predict (< 0 or 0: until the context is full), temperature, top_k, top_p,
  min_p, repeat_penalty (HF repetition_penalty semantics: every token seen so far is
  penalised, where llama.cpp looks at the last repeat_last_n), seed (< 0: random), stop,
  num_ctx (a smaller context for this request; the server's --n-ctx is the most).
- an empty conversation / prompt answers the "load" (or, with keep_alive 0, "unload")
  response without generating; the model stays loaded whatever keep_alive says.
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .engine import GenRequest
from .errors import APIError, bad_request
from .fields import Fields
from .images import ImageLimits, check_image_count, image_from_base64
from .info import rfc3339
from .transport import (
    JSONTemplate,
    RunStream,
    api_route,
    collect,
    dump_json,
    ollama_error,
    read_json,
    render_events,
    start_generation,
)

# The Ollama API level answered by /api/version: the last release that served mllama
# (v0.30.0 removed it). Clients gate features on this number.
OLLAMA_API_VERSION = "0.29.0"

DONE_REASON = {"stop_token": "stop", "stop_string": "stop", "length": "length", "context_full": "length"}
NDJSON = "application/x-ndjson"
# Go's MaxInt64 nanoseconds: what Ollama's expires_at is for a model kept loaded forever.
_FOREVER_S = (2**63 - 1) / 1e9


def _ctx(request: Request):
    return request.app.state.server


def _check_model(request: Request, f: Fields, key: str = "model") -> str:
    srv = _ctx(request)
    name = f.str(key) or (f.str("name") if key == "model" else None)
    if not name:
        raise bad_request("model is required", param="model")
    if not srv.info.matches(name):
        raise APIError(404, f"model '{name}' not found", param="model")
    return name


def _options(f: Fields) -> tuple[dict, list[str] | None, int | None, int | None]:
    """(generate() sampling kwargs, stop strings, max_new_tokens, num_ctx) from `options`."""
    o = f.object("options")
    if o is None:
        return {}, None, None, None
    out: dict = {}
    t = o.num("temperature")
    if t is not None:
        if t < 0:
            raise bad_request('option "temperature" must be >= 0 (0 is greedy)', param="options.temperature")
        out["temperature"] = t
    top_k = o.int("top_k", truncate=True)
    if top_k is not None:
        out["top_k"] = max(top_k, 0)  # llama.cpp: <= 0 disables top-k
    top_p = o.num("top_p")
    if top_p is not None:
        if not 0 <= top_p <= 1:
            raise bad_request(f'option "top_p" must be between 0 and 1, got {top_p}', param="options.top_p")
        if top_p == 0:
            out["temperature"] = 0.0  # only the most likely token survives: greedy
        elif top_p < 1:
            out["top_p"] = top_p
        else:
            out["top_p"] = 1.0
    min_p = o.num("min_p")
    if min_p is not None:
        if not 0 <= min_p <= 1:
            raise bad_request(f'option "min_p" must be between 0 and 1, got {min_p}', param="options.min_p")
        out["min_p"] = min_p
    rp = o.num("repeat_penalty")
    if rp is not None:
        if rp <= 0:
            raise bad_request(
                f'option "repeat_penalty" must be > 0 (1 disables it), got {rp}', param="options.repeat_penalty"
            )
        out["repetition_penalty"] = rp
    seed = o.int("seed", truncate=True)
    if seed is not None and seed >= 0:
        out["seed"] = seed
    num_predict = o.int("num_predict", truncate=True)
    max_new = num_predict if num_predict is not None and num_predict > 0 else None
    num_ctx = o.int("num_ctx", truncate=True)
    if num_ctx is not None and num_ctx < 1:
        raise bad_request(f'option "num_ctx" must be >= 1, got {num_ctx}', param="options.num_ctx")
    return out, o.stop("stop"), max_new, num_ctx


def _unsupported(f: Fields, model: str) -> None:
    fmt = f.raw("format")
    if fmt not in (None, ""):
        raise bad_request("'format' (JSON mode / structured outputs) is not supported by this server", param="format")
    think = f.raw("think")
    if think is True or (isinstance(think, str) and think):
        raise bad_request(f'"{model}" does not support thinking', param="think")
    if f.bool("logprobs"):
        raise bad_request("'logprobs' is not supported by this server", param="logprobs")


def _keep_alive_zero(f: Fields) -> bool:
    v = f.raw("keep_alive")
    return v == 0 or (isinstance(v, str) and v.strip() in ("0", "0s", "0m", "0h"))


def _images(raw, where: str, limits: ImageLimits) -> list:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad_request(f"'{where}' must be an array of base64 strings", param=where)
    return [image_from_base64(s, f"{where}[{k}]", limits) for k, s in enumerate(raw)]


def _count_images(items) -> int:
    return sum(len(x.get("images") or []) for x in items if isinstance(x, dict) and isinstance(x.get("images"), list))


def _chat_request(body: dict, model: str, limits: ImageLimits) -> GenRequest:
    f = Fields(body)
    msgs = f.list("messages") or []
    if f.list("tools"):
        raise bad_request(f'"{model}" does not support tools', param="tools")
    check_image_count(_count_images(msgs), limits, "messages")
    out, images = [], []
    for i, m in enumerate(msgs):
        mf = Fields(m, f"messages[{i}].")
        role = (mf.str("role") or "").lower()  # api/types.go Message.UnmarshalJSON lowercases the role
        if not role:
            raise bad_request(f"'messages[{i}].role' is required", param=f"messages[{i}].role")
        content = mf.str("content", "")
        if mf.list("tool_calls"):
            raise bad_request(f'"{model}" does not support tools', param=f"messages[{i}].tool_calls")
        imgs = _images(mf.raw("images"), f"messages[{i}].images", limits)
        if imgs:
            if role != "user":
                raise bad_request(
                    f"'messages[{i}].images': images are only supported in user messages", param=f"messages[{i}].images"
                )
            images += imgs
            out.append({"role": role, "content": [{"type": "image"}] * len(imgs) + [{"type": "text", "text": content}]})
        else:
            out.append({"role": role, "content": content})
    sampling, stop, max_new, num_ctx = _options(f)
    return GenRequest(messages=out, images=images, max_new_tokens=max_new, sampling=sampling, stop=stop, n_ctx=num_ctx)


def _generate_request(body: dict, model: str, limits: ImageLimits, image_token: str) -> GenRequest:
    f = Fields(body)
    prompt = f.str("prompt", "")
    system = f.str("system")
    raw = bool(f.bool("raw", False))
    if f.str("suffix"):
        raise bad_request(f'"{model}" does not support insert', param="suffix")
    if f.str("template"):
        raise bad_request(
            "'template' is not supported: Ollama's Go templates do not apply; the model file's chat template is used",
            param="template",
        )
    if f.list("context"):
        raise bad_request("'context' is not supported: send the conversation with /api/chat", param="context")
    if raw and system:
        raise bad_request("raw mode does not support template, system, or context", param="raw")
    raw_images = f.raw("images")
    check_image_count(len(raw_images) if isinstance(raw_images, list) else 0, limits, "images")
    images = _images(raw_images, "images", limits)
    sampling, stop, max_new, num_ctx = _options(f)
    common = dict(images=images, max_new_tokens=max_new, sampling=sampling, stop=stop, n_ctx=num_ctx)
    if raw:
        if images and image_token not in prompt:
            prompt = image_token * len(images) + prompt  # images first, as the chat template places them
        return GenRequest(prompt=prompt, **common)
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}] if images else prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return GenRequest(messages=messages, **common)


def _metrics(result, run, t_request: float) -> dict:
    """Ollama's Metrics (nanoseconds; zero values omitted as Go's omitempty does)."""
    t = result.timings
    now = time.perf_counter()
    m = {
        "total_duration": int((now - t_request) * 1e9),
        "load_duration": int((run.t_start - t_request) * 1e9),  # waiting for a slot + preparing the request
        "prompt_eval_count": int(result.prompt_tokens),
        "prompt_eval_duration": int((t.get("image_encode_s", 0.0) + t.get("prefill_s", 0.0)) * 1e9),
        "eval_count": int(result.completion_tokens),
        "eval_duration": int(t.get("decode_s", 0.0) * 1e9),
    }
    return {k: v for k, v in m.items() if v}


def _line(obj) -> bytes:
    return dump_json(obj) + b"\n"


async def _ndjson(request: Request, run, model: str, chat: bool, t_request: float):
    def chunk(piece: str, created_at: str | None = None, **extra) -> dict:
        body = {"model": model, "created_at": rfc3339() if created_at is None else created_at}
        if chat:
            body["message"] = {"role": "assistant", "content": piece}
        else:
            body["response"] = piece
        body["done"] = False
        body.update(extra)
        return body

    def done(result) -> list[bytes]:
        return [
            _line(
                chunk(
                    "",
                    done=True,
                    done_reason=DONE_REASON.get(result.stop_reason, "stop"),
                    **_metrics(result, run, t_request),
                )
            )
        ]

    # the text chunks: _line(chunk(piece)) with its time, encoded but for those two once
    line = JSONTemplate(lambda created_at, piece: chunk(piece, created_at), 2, suffix=b"\n")
    async for b in render_events(
        request, run, lambda piece: line(rfc3339(), piece), lambda e: _line(e.ollama_body()), done
    ):
        yield b


def _load_response(model: str, chat: bool, unload: bool) -> JSONResponse:
    body = {"model": model, "created_at": rfc3339()}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    body.update(done=True, done_reason="unload" if unload else "load")
    return JSONResponse(body)


async def _generate(request: Request, chat: bool):
    t_request = time.perf_counter()
    srv = _ctx(request)
    body = await read_json(request, srv.config.max_body_bytes)
    f = Fields(body)
    model = _check_model(request, f)
    _unsupported(f, model)
    stream = f.bool("stream", True)
    empty = not (f.list("messages") if chat else (f.str("prompt") or f.list("images")))
    if empty:  # Ollama loads (or unloads) the model and answers without generating
        _options(f)  # still a 400 for bad options
        srv.engine.require_ready()
        return _load_response(model, chat, _keep_alive_zero(f))
    srv.engine.require_ready()
    limits = srv.config.image_limits
    if chat:
        req = await asyncio.to_thread(_chat_request, body, model, limits)
    else:
        token = srv.engine.model.processor.settings.image_token
        req = await asyncio.to_thread(_generate_request, body, model, limits, token)
    del body, f  # the request holds what it needs; the parsed body (base64 images) can go while it waits
    run = await start_generation(request, srv.engine, req)
    if stream:
        return RunStream(_ndjson(request, run, model, chat, t_request), run, NDJSON)
    text, result = await collect(request, run)
    out = {"model": model, "created_at": rfc3339()}
    if chat:
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["response"] = text
    out.update(done=True, done_reason=DONE_REASON.get(result.stop_reason, "stop"), **_metrics(result, run, t_request))
    return JSONResponse(out)


@api_route(ollama_error)
async def chat(request: Request):
    return await _generate(request, chat=True)


@api_route(ollama_error)
async def generate(request: Request):
    return await _generate(request, chat=False)


def _tag(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _listing(info) -> dict:
    return {
        "name": _tag(info.name),
        "model": _tag(info.name),
        "modified_at": rfc3339(info.modified, local=True),
        "size": info.size,
        "digest": info.digest,
        "details": info.details,
    }


@api_route(ollama_error)
async def tags(request: Request):
    srv = _ctx(request)
    return JSONResponse({"models": [_listing(srv.info)] if srv.engine.state == "ready" else []})


@api_route(ollama_error)
async def ps(request: Request):
    srv = _ctx(request)
    if srv.engine.state != "ready":
        return JSONResponse({"models": []})
    entry = _listing(srv.info)
    del entry["modified_at"]
    on_gpu = str(getattr(srv.engine.model, "device", "cpu")).startswith("cuda")
    entry.update(
        expires_at=rfc3339(time.time() + _FOREVER_S),
        size_vram=srv.info.size if on_gpu else 0,
        context_length=srv.engine.n_ctx,
    )
    return JSONResponse({"models": [entry]})


def _parameters(model, n_ctx: int) -> str:
    """Ollama's "parameters" text: one `name value` line per default, names padded to 30."""
    d = getattr(model, "generation_defaults", {}) or {}
    rows = [("temperature", d.get("temperature")), ("top_p", d.get("top_p"))]
    if d.get("top_k"):
        rows.append(("top_k", d["top_k"]))
    rows.append(("num_ctx", n_ctx))
    tok = model.tokenizer
    for i in getattr(model, "stop_ids", []):
        rows.append(("stop", json.dumps(tok.id_to_token(i)) if tok is not None else i))
    for text in d.get("stop") or ():  # stop strings (an Ollama manifest's params layer)
        rows.append(("stop", json.dumps(text)))
    return "\n".join(f"{k:<30} {v}" for k, v in rows if v is not None)


@api_route(ollama_error)
async def show(request: Request):
    srv = _ctx(request)
    body = await read_json(request, srv.config.max_body_bytes)
    f = Fields(body)
    _check_model(request, f)
    srv.engine.require_ready()
    model = srv.engine.model
    template = (model.tokenizer.chat_template if model.tokenizer is not None else None) or ""
    params = _parameters(model, srv.engine.n_ctx)
    system = srv.info.system
    modelfile = (
        f"# Modelfile generated by mllama-q\n# FROM {srv.info.path}\nFROM {srv.info.path}\n"
        + (f'SYSTEM """{system}"""\n' if system else "")
        + "".join(f"PARAMETER {line.split(None, 1)[0]} {line.split(None, 1)[1]}\n" for line in params.splitlines())
    )
    return JSONResponse(
        {
            "modelfile": modelfile,
            "parameters": params,
            "template": template,
            **({"system": system} if system else {}),
            "details": srv.info.details,
            "model_info": srv.info.model_info(bool(f.bool("verbose"))),
            "capabilities": srv.info.capabilities,
            "modified_at": rfc3339(srv.info.modified, local=True),
        }
    )


@api_route(ollama_error)
async def version(request: Request):
    from mllama_q import __version__

    return JSONResponse({"version": OLLAMA_API_VERSION, "mllama_q": __version__})


async def root(request: Request) -> Response:
    from mllama_q import __version__

    return PlainTextResponse(f"Ollama is running (mllama-q {__version__}, Ollama-compatible API)")
