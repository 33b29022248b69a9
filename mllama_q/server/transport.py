"""HTTP plumbing shared by the OpenAI and Ollama routes: bounded body reading, running a
request while watching for the client to go away, and the streaming response that frees the
slot when it does."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import traceback
from json.encoder import encode_basestring  # what json.dumps(str, ensure_ascii=False) calls
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .errors import APIError
from .fields import parse_json_object

log = logging.getLogger("mllama_q.server")

STATS_KEY = "mllama_q.stats"  # per-request figures for the access log line (scope entry)


class ClientGone(Exception):
    """The client disconnected before the response started."""


def dump_json(obj) -> bytes:
    """Compact JSON as both APIs send it (UTF-8, no ASCII escaping)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


_HOLE = "\x00mllama-q-hole\x00"


class JSONTemplate:
    """`prefix + dump_json(build(*values)) + suffix` for string `values`, with the constant parts
    encoded once: a streamed chunk differs from the last only in its text (and Ollama's
    timestamp), so only those are encoded per chunk. The bytes are identical to encoding the
    whole object (the holes are found by encoding it with marker strings; the same C string
    encoder fills them); should a marker clash with the object's other content, every call
    encodes the whole object instead."""

    def __init__(self, build: Callable[..., Any], n: int, prefix: bytes = b"", suffix: bytes = b""):
        self._build, self._prefix, self._suffix = build, prefix, suffix
        marks = [f"{_HOLE}{i}{_HOLE}" for i in range(n)]
        text = dump_json(build(*marks)).decode()
        self._parts = None
        if text.count(encode_basestring(_HOLE)[1:-1]) != 2 * n:
            return  # the marker also occurs elsewhere in the object
        parts: list[str] = []
        for m in marks:
            head, sep, text = text.partition(encode_basestring(m))
            if not sep:
                return  # (the holes out of order)
            parts.append(head)
        parts.append(text)
        self._parts = [p.encode() for p in parts]
        self._parts[0] = prefix + self._parts[0]
        self._parts[-1] += suffix

    def __call__(self, *values: str) -> bytes:
        parts = self._parts
        if parts is None:
            return self._prefix + dump_json(self._build(*values)) + self._suffix
        if len(parts) == 2:  # one hole, the common case: no loop
            return parts[0] + encode_basestring(values[0]).encode() + parts[1]
        out = [parts[0]]
        for v, p in zip(values, parts[1:]):
            out.append(encode_basestring(v).encode())
            out.append(p)
        return b"".join(out)


def stats(request: Request) -> dict:
    return request.scope.setdefault(STATS_KEY, {})


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, refusing more than `limit` bytes (413) before reading them
    when Content-Length says so, and while reading otherwise (chunked bodies)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise APIError(400, f"invalid Content-Length header {declared[:40]!r}") from None
        if n > limit:
            raise APIError(
                413,
                f"the request body is {n / 2**20:.1f} MiB, more than the server's "
                f"{limit / 2**20:.1f} MiB limit (--max-body-mb)",
            )
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(
                    413, f"the request body is more than the server's {limit / 2**20:.1f} MiB limit (--max-body-mb)"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    body = b"".join(chunks)
    if len(body) > 1 << 20:  # parsing megabytes (inline images) takes long enough to stall other streams
        return await asyncio.to_thread(parse_json_object, body)
    return parse_json_object(body)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (after the body was read, the ASGI server's receive()
    only answers http.disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, aw: Awaitable):
    """Await `aw`; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watch.cancel()
        raise
    if task in done:
        watch.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:
        pass
    raise ClientGone()


class RunStream(Response):
    """A streaming response bound to a generation run: chunks come from `chunks` (an async
    iterator); a client disconnect, seen by a concurrent receive() or by a failed send, cancels
    the run so its slot is freed at the next step. (Starlette's StreamingResponse only notices
    a disconnect at its next send under ASGI 2.4, which a slow prefill would delay.)"""

    def __init__(self, chunks: AsyncIterator[bytes], run, media_type: str, headers: dict | None = None):
        self.chunks = chunks  # (not `body`: Response.init_headers would take its length)
        self.run = run
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch():
            await _disconnected(receive)
            if not self.run.finished:
                self.run.cancel()
                scope.setdefault(STATS_KEY, {})["disconnected"] = True

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if self.run.cancelled:
                    break
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # uvicorn raises ClientDisconnected (an OSError) on a send to a closed connection
            pass
        finally:
            if not self.run.finished:
                self.run.cancel()
                scope.setdefault(STATS_KEY, {})["disconnected"] = True
            watcher.cancel()
            await self.chunks.aclose()


def api_route(render_error: Callable[[APIError], Response]):
    """Decorator for route handlers: APIError -> its status and body in this API's format; any
    other exception -> 500 with the same format (logged with its traceback); the server keeps
    running either way."""

    def wrap(handler):
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as e:
                stats(request)["error"] = e.message
                return render_error(e)
            except ClientGone:
                stats(request)["disconnected"] = True
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            except Exception as e:
                log.error("unhandled error in %s %s:\n%s", request.method, request.url.path, traceback.format_exc())
                err = APIError(500, f"internal server error: {type(e).__name__}: {e}")
                stats(request)["error"] = err.message
                return render_error(err)

        return run

    return wrap


def openai_error(e: APIError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.openai_body(), status_code=e.status, headers=headers)


def ollama_error(e: APIError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.ollama_body(), status_code=e.status, headers=headers)


def error_for_path(path: str, e: APIError) -> Response:
    return ollama_error(e) if path.startswith("/api/") else openai_error(e)


async def start_generation(request: Request, engine, req):
    """Tokenise and check `req` (a GenRequest) in a worker thread, wait for a slot, start the
    generation and wait until the session accepted it. Returns the Run; a request the session
    rejects raises its APIError here, before any response byte is sent."""
    prepared = await asyncio.to_thread(engine.prepare, req)
    st = stats(request)
    st["prompt"] = len(prepared.ids)
    run = await until_disconnect(request, engine.start(prepared))
    st["slot"] = run.slot.id
    st["reused"] = run.cached_prefix
    try:
        ev = await until_disconnect(request, run.next())
    except ClientGone:
        run.cancel()
        raise
    if ev[0] == "error":
        raise ev[1]
    if ev[0] == "done":  # cancelled before it started
        raise ClientGone()
    return run


async def collect(request: Request, run) -> tuple[str, object]:
    """Run to the end (non-streaming): (text, GenerationResult). A client that disconnects
    meanwhile cancels the run."""

    run.only_end()  # nothing is sent before the end: the pieces need not wake the loop one by one

    async def drain():
        parts = []
        async for ev in run.events():
            if ev[0] == "text":
                parts.append(ev[1])
            elif ev[0] == "error":
                raise ev[1]
            else:
                return "".join(parts), ev[1]

    try:
        text, result = await until_disconnect(request, drain())
    except BaseException:  # client gone, or a failure: the run must not go on without a reader
        run.cancel()
        raise
    if result is None:
        raise ClientGone()
    record_result(request, run, result)
    return text, result


def record_result(request: Request, run, result) -> None:
    st = stats(request)
    t = result.timings
    st.update(
        gen=result.completion_tokens,
        stop=result.stop_reason,
        cached=getattr(result, "cached_tokens", None),
        ttft=t.get("time_to_first_token_s"),
        tps=t.get("decode_tokens_per_s"),
    )


async def render_events(
    request: Request,
    run,
    text: Callable[[str], bytes],
    error: Callable[[APIError], bytes],
    done: Callable[[object], list[bytes]],
) -> AsyncIterator[bytes]:
    """A run's remaining events as response bytes in one API's stream format: `text(piece)` per
    text chunk, `error(APIError)` for a failure (then the stream ends), `done(result)` at the end
    (nothing for a cancelled run: its client is gone)."""
    async for ev in run.events():
        if ev[0] == "text":
            yield text(ev[1])
        elif ev[0] == "error":
            stats(request)["error"] = ev[1].message
            yield error(ev[1])
            return
        else:
            if ev[1] is not None:
                record_result(request, run, ev[1])
                for chunk in done(ev[1]):
                    yield chunk
            return
