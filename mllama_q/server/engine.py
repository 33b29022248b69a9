"""The serving engine: one loaded model, `parallel` slots (sessions), a FIFO queue, and the
hand-over of each request's events from the model's engine thread to the event loop.

Threads and locking
-------------------
- The event loop thread owns the `SlotPool` (which slots are idle, the FIFO of waiting
  requests); nothing else touches it. Other threads hand a slot back with
  `loop.call_soon_threadsafe(pool.release, slot)`.
- Each request gets a short-lived setup thread that builds its turn (image decoding, chat
  template, tokenizer: blocking work) and starts it with `session.start(run.on_event, ...)`,
  then ends. From then on the model's engine thread (the sessions scheduler, which batches
  the running sessions into one forward pass per step) calls `Run.on_event` itself for every
  event: no thread per request sits between the scheduler and the event loop, so a token
  costs one cross-thread hand-over, not two.
- `Run._lock` guards the run's event deque, its waiter future, its started flag and its
  turn handle; it is held for a few list operations only and never while calling out (the
  scheduler calls `on_event` outside its own lock, so the two locks never nest). The engine
  thread wakes the loop (`call_soon_threadsafe`, one self-pipe write) only when the loop
  waits for that run's next event, so pieces that queue while the loop is busy cost nothing
  extra and go out merged.
- Cancelling (client gone) happens on the event loop: `Run.cancel` sets a flag (pieces are no
  longer queued) and cancels the turn without waiting (`TurnHandle.cancel`: the sequence
  leaves the batch at its next step, a running prefill or image encode is aborted between two
  layers); the scheduler then ends the turn and the slot is released. A cancel that comes
  while the setup thread is still building the turn is seen by it when it hands the turn
  over.

Slot choice (llama.cpp tools/server/server-context.cpp `get_available_slot`): among idle
slots, the one whose cached tokens share the longest common prefix with the new prompt, if that
prefix is more than `similarity` (llama.cpp's --slot-prompt-similarity, 0.1) of the prompt;
otherwise the least recently used idle slot (never-used slots first). Open WebUI resends the
whole conversation and every image each turn, so a follow-up lands on the slot that holds its
history. Token ids alone cannot tell two images apart (each is one `<|image|>` id), so the
prefix also stops at the first image whose content digest differs.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import numpy as np

from .errors import APIError
from .images import RequestImage

log = logging.getLogger("mllama_q.server")


@dataclass
class GenRequest:
    """One generation, API-neutral (the OpenAI and Ollama routes both build this)."""

    messages: list | None = None  # chat messages; image items are {"type": "image"}
    prompt: str | None = None  # or a raw prompt (no template)
    images: list[RequestImage] = field(default_factory=list)  # in prompt order
    max_new_tokens: int | None = None  # None: until a stop or the context is full
    sampling: dict = field(default_factory=dict)  # generate() kwargs: temperature, top_k, top_p, min_p,
    #                                                repetition_penalty, seed (only those given)
    stop: list[str] | None = None
    n_ctx: int | None = None  # a smaller context for this request (Ollama num_ctx)


@dataclass
class Prepared:
    request: GenRequest
    ids: list[int]  # prompt token ids (image tokens included), for slot choice
    n_ctx: int  # the context this request may fill
    max_new_tokens: int  # capped so prompt + answer fit n_ctx


class Slot:
    def __init__(self, slot_id: int, session):
        self.id = slot_id
        self.session = session
        self.digests: list[str] = []  # image digests of the slot's last prompt, in order
        self.last_used = -1.0
        self.requests = 0
        self.busy = False
        self.last: dict = {}  # outcome of the last request: stop reason, tokens generated

    def status(self) -> dict:
        """GET /slots entry (llama.cpp's server has the same endpoint)."""
        return {
            "id": self.id,
            "busy": self.busy,
            "n_tokens": len(self.tokens),
            "n_images": len(self.digests),
            "requests": self.requests,
            "last": self.last,
        }

    @property
    def tokens(self):
        """Token ids in the slot's KV cache (the session's `tokens`, read-only)."""
        return self.session.tokens


def common_prefix(
    cached: Any, cached_digests: list[str], ids: list[int], digests: list[str], image_token_id: int
) -> int:
    """Length of the common prefix of a slot's tokens and a prompt, stopping at the first image
    token whose image differs (by digest)."""
    a = np.asarray(cached, dtype=np.int64)
    b = np.asarray(ids, dtype=np.int64)
    n = min(a.size, b.size)
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    p = int(diff[0]) if diff.size else n
    for k, pos in enumerate(np.flatnonzero(b[:p] == image_token_id)):
        if k >= len(cached_digests) or k >= len(digests) or cached_digests[k] != digests[k]:
            return int(pos)
    return p


class SlotPool:
    """Idle slots and a FIFO of waiting requests. Event-loop thread only."""

    def __init__(self, slots: list[Slot], image_token_id: int, max_queue: int, similarity: float = 0.1):
        self.slots = slots
        self._idle: set[int] = {s.id for s in slots}
        self._waiters: collections.deque = collections.deque()  # (future, ids, digests)
        self.image_token_id = image_token_id
        self.max_queue = max_queue
        self.similarity = similarity

    @property
    def n_busy(self) -> int:
        return len(self.slots) - len(self._idle)

    @property
    def n_waiting(self) -> int:
        return len(self._waiters)

    def choose(self, ids: list[int], digests: list[str]) -> tuple[Slot, int]:
        """(slot, common prefix length) for a prompt among the idle slots."""
        best, best_lcp, best_sim = None, 0, 0.0
        for i in sorted(self._idle):
            s = self.slots[i]
            tokens = s.tokens
            if len(tokens) == 0:
                continue
            lcp = common_prefix(tokens, s.digests, ids, digests, self.image_token_id)
            sim = lcp / max(len(ids), 1)
            if sim > best_sim and sim > self.similarity:
                best, best_lcp, best_sim = s, lcp, sim
        if best is None:  # least recently used; never-used slots have last_used -1
            best = min((self.slots[i] for i in self._idle), key=lambda s: (s.last_used, s.id))
            best_lcp = 0
        return best, best_lcp

    def _take(self, ids, digests) -> tuple[Slot, int]:
        slot, lcp = self.choose(ids, digests)
        self._idle.discard(slot.id)
        slot.busy = True
        return slot, lcp

    async def acquire(self, ids: list[int], digests: list[str]) -> tuple[Slot, int]:
        if self._idle and not self._waiters:
            return self._take(ids, digests)
        if len(self._waiters) >= self.max_queue:
            raise APIError(
                503,
                f"server busy: {self.n_busy} requests running and {len(self._waiters)} queued "
                f"(the limit, --max-queue); try again later",
                type="server_busy",
            )
        fut = asyncio.get_running_loop().create_future()
        entry = (fut, ids, digests)
        self._waiters.append(entry)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # a slot was handed over as we were cancelled
                self.release(fut.result()[0], used=False)
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
            raise

    def release(self, slot: Slot, used: bool = True) -> None:
        if used:
            slot.last_used = time.monotonic()
        slot.busy = False
        self._idle.add(slot.id)
        while self._waiters and self._idle:
            fut, ids, digests = self._waiters.popleft()
            if not fut.done():
                fut.set_result(self._take(ids, digests))


class _Cancelled(BaseException):
    """Raised in the setup thread when the run was cancelled before its turn was submitted (a
    BaseException so no `except Exception` in between swallows it)."""


class Run:
    """One generation in flight. Events, in order: ("start",) once the session accepted the
    request, ("text", str)*, then ("done", GenerationResult | None) or ("error", APIError).

    Events are appended to a deque (by the setup thread, or by the model's engine thread
    through `on_event`); the loop is woken only when it is waiting for one (one
    `call_soon_threadsafe`, i.e. one self-pipe write, per wake-up instead of per token) and
    then takes everything queued at once. See the module docstring for the locking."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        slot: Slot,
        prepared: Prepared,
        cached_prefix: int,
        on_end: Callable[["Run", str, Any], None] | None = None,
        stream_interval: float = 0.0,
    ):
        self._loop = loop
        self._interval = stream_interval  # seconds: the shortest time between two streamed chunks
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future | None = None
        self._cancel = threading.Event()
        self._started = False  # ("start",) queued
        self._turn = None  # the session's TurnHandle once the turn is submitted
        self._on_end = on_end  # called once with (run, stop, result) in the thread that ends the run
        self._wake_on_text = True  # False: a reader that wants only the end (non-streaming)
        self.n_pieces = 0
        self.slot = slot
        self.prepared = prepared
        self.cached_prefix = cached_prefix  # prefix shared with the slot's cache when it was chosen
        self.t_start = time.perf_counter()  # generation started (slot acquired)
        self.finished = False

    # -- setup thread / engine thread side
    def post(self, event: tuple, from_turn: bool = False) -> None:
        """Queue an event. ("start",) goes first exactly once: the turn's own events (from_turn,
        engine thread) can come before the setup thread queues it, and imply it."""
        with self._lock:
            if (from_turn or event[0] == "start") and not self._started:
                self._started = True
                self._items.append(("start",))
            if event[0] != "start":
                self._items.append(event)
            if event[0] == "text" and not self._wake_on_text:
                return
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            try:
                self._loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

    def attach(self, turn) -> None:
        """The setup thread hands over the started turn (a TurnHandle); a cancel that came
        while it was being built cancels it now."""
        with self._lock:
            self._turn = turn
        if self._cancel.is_set():
            turn.cancel()

    def on_event(self, ev: tuple) -> None:
        """The session's sink (Session.start): runs on the model's engine thread."""
        kind = ev[0]
        if kind == "piece":
            if ev[1] and not self._cancel.is_set():
                self.n_pieces += 1
                self.post(("text", ev[1]), from_turn=True)
        elif kind == "done":
            result = None if self._cancel.is_set() else ev[1]
            self.end(("done", result), "cancelled" if result is None else result.stop_reason, result, True)
        elif kind == "error":
            self.end(("error", api_error(ev[1], self.slot.id)), "error", None, True)
        # ("progress", ...): nothing to send; a cancel reaches the turn directly

    def end(self, event: tuple, stop: str, result, from_turn: bool = False) -> None:
        """The last event, after the slot's bookkeeping (on_end)."""
        if self._on_end is not None:
            self._on_end(self, stop, result)
        self.post(event, from_turn)

    def check(self, *_args) -> None:
        """Raise _Cancelled when the run was cancelled (the setup thread checks it)."""
        if self._cancel.is_set():
            raise _Cancelled()

    # -- event loop side
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        with self._lock:
            self._cancel.set()
            turn = self._turn
        if turn is not None:
            turn.cancel()  # never blocks: the sequence leaves the batch at the next step

    def only_end(self) -> None:
        """The reader wants only the final event (a non-streaming response): text pieces still
        queue, but no longer wake the loop one by one."""
        with self._lock:
            self._wake_on_text = False

    async def _take(self) -> list:
        """Every queued event (at least one), waiting if there is none."""
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    return items
                fut = self._waiter = self._loop.create_future()
            await fut

    async def next(self) -> tuple:
        with self._lock:
            ev = self._items.popleft() if self._items else None
        if ev is None:
            items = await self._take()
            ev = items[0]
            with self._lock:
                self._items.extendleft(reversed(items[1:]))
        if ev[0] in ("done", "error"):
            self.finished = True
        return ev

    async def events(self) -> AsyncIterator[tuple]:
        """The remaining events; text pieces queued together are merged into one (a client that
        reads slower than the model generates gets fewer, longer chunks).

        Chunks go out at most every `stream_interval` seconds: after a text chunk, the loop
        sleeps out the rest of the interval before it looks again, and what queued meanwhile
        goes out as one chunk. Each chunk costs the server ~50-100 us of CPU (loop wake-up, h11,
        the loopback send; bench/results/2026-12-03-epyc-zen5-2c-serve.md 1c) on the cores the
        model computes on, and the client as much again to parse it; a model faster than one
        token per interval would otherwise pay that per token. The first chunk is never delayed
        (the time to first token is unchanged) and a model slower than the interval (any real
        checkpoint on a CPU) still gets one chunk per token."""
        last = None  # loop time of the previous text chunk
        while True:
            if last is not None and self._interval > 0:
                wait = last + self._interval - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # a timer on the loop: no cross-thread wake-up
            items = await self._take()
            text = [ev[1] for ev in items if ev[0] == "text"]
            if text:
                last = self._loop.time()
                yield ("text", "".join(text))
            for ev in items:
                if ev[0] in ("done", "error"):
                    self.finished = True
                    yield ev
                    return
                if ev[0] != "text":
                    yield ev


def api_error(e: BaseException, slot_id: int) -> APIError:
    """A failure while generating as the HTTP error a client gets."""
    if isinstance(e, ValueError):  # the request's content (e.g. an image the processor rejects)
        return APIError(400, str(e))
    if isinstance(e, MemoryError):
        return APIError(503, "out of memory while generating; try a shorter request")
    log.error("generation failed (slot %d)", slot_id, exc_info=e)
    return APIError(500, f"generation failed: {type(e).__name__}: {e}")


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def load_model(path, *, device: str = "cpu", n_ctx: int = 4096, parallel: int = 1, n_threads=None, **model_kw):
    """Model(path, ...) with one session per slot. `path`: a file or an Ollama model name;
    model_kw: Model's other options (projector=, ollama_converter=)."""
    from mllama_q.model import Model

    kw: dict = dict(device=device, n_ctx=n_ctx, n_threads=n_threads, max_sessions=parallel, **model_kw)
    try:
        return Model(path, **kw)
    except ValueError as e:
        if "vision=False" not in str(e):
            raise
        log.warning("%s; serving it as a text-only model (images are refused)", e)
        return Model(path, vision=False, **kw)  # a text-only file (or a two-file text blob without its projector)


class Engine:
    """Owns the model (loaded in the background: /health answers 503 until it is ready), its
    slots and the queue."""

    def __init__(
        self,
        load: Callable[[], Any] | None = None,
        *,
        model=None,
        parallel: int = 1,
        max_queue: int = 64,
        similarity: float = 0.1,
        stream_interval: float = 0.0,
    ):
        if (load is None) == (model is None):
            raise ValueError("give exactly one of load= or model=")
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self._load = load
        self.parallel = parallel
        self.max_queue = max_queue
        self.similarity = similarity
        if not 0 <= stream_interval <= 1:
            raise ValueError(f"stream_interval must be in 0..1 seconds, got {stream_interval}")
        self.stream_interval = stream_interval  # Run.events: shortest time between streamed chunks
        self.model = None
        self.pool: SlotPool | None = None
        self.state = "loading"
        self.error: str | None = None
        self.load_s: float | None = None
        if model is not None:
            self._ready(model)

    # -- loading
    def load(self) -> None:
        """Load the model (blocking; the app runs it in a thread at startup)."""
        t0 = time.perf_counter()
        try:
            model = self._load()
            self.load_s = time.perf_counter() - t0
            self._ready(model)
        except Exception as e:  # reported by /health and the CLI; never a traceback for a bad file
            self.state = "failed"
            self.error = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
            raise

    def _ready(self, model) -> None:
        if getattr(model, "processor", None) is None:
            raise ValueError("the model file has no tokenizer metadata: it cannot serve text")
        n_sessions = int(getattr(model, "max_sessions", 1))
        if n_sessions < self.parallel:
            raise ValueError(
                f"{self.parallel} slots need a model loaded with max_sessions >= {self.parallel}, not {n_sessions}"
            )
        self.model = model
        # One session per slot: its KV cache and images stay between the slot's requests, and
        # the model's scheduler batches the slots' decode steps (mllama_q/session.py).
        sessions = [model.session() for _ in range(self.parallel)]
        slots = [Slot(i, s) for i, s in enumerate(sessions)]
        self.pool = SlotPool(slots, model.processor.settings.image_token_id, self.max_queue, self.similarity)
        self.state = "ready"

    def require_ready(self) -> None:
        if self.state == "loading":
            raise APIError(
                503,
                "the model is still loading; try again shortly (GET /health says when it is ready)",
                type="unavailable_error",
            )
        if self.state != "ready":
            raise APIError(503, f"the model failed to load: {self.error}", type="unavailable_error")

    @property
    def n_ctx(self) -> int:
        return int(self.model.n_ctx)

    @property
    def has_vision(self) -> bool:
        return bool(getattr(self.model, "has_vision", False))

    # -- requests
    def prepare(self, req: GenRequest) -> Prepared:
        """Tokenise the prompt (no image processing) and check it fits. Blocking: call in a thread."""
        from mllama_q.generate import prompt_text
        from mllama_q.sampling import check_value

        self.require_ready()
        req = self._with_default_system(req)
        for name, value in req.sampling.items():  # the library's ranges (each API checked its own first)
            try:
                check_value(name, value)
            except ValueError as e:
                raise APIError(400, str(e), param=name) from None
        model = self.model
        if req.images and not self.has_vision:
            raise APIError(400, "this model has no vision tower: images are not supported", param="images")
        try:
            text, add_special = prompt_text(model, messages=req.messages, prompt=req.prompt)
        except ValueError as e:  # the chat template refused the conversation, or bad messages
            raise APIError(400, str(e), param="messages" if req.messages is not None else "prompt") from None
        token = model.processor.settings.image_token
        if text.count(token) != len(req.images):
            raise APIError(
                400,
                f"the prompt has {text.count(token)} {token} token(s) but {len(req.images)} image(s) were given",
                param="prompt" if req.prompt is not None else "messages",
            )
        ids = model.processor(text=text, add_special_tokens=add_special)["input_ids"][0].tolist()
        n_ctx = self.n_ctx if req.n_ctx is None else min(req.n_ctx, self.n_ctx)
        if len(ids) >= n_ctx:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens but the context holds {n_ctx} "
                f"({'--n-ctx' if n_ctx == self.n_ctx else 'num_ctx'}), and at least one more "
                "is needed to answer: shorten the conversation",
                code="context_length_exceeded",
                param="messages" if req.messages is not None else "prompt",
            )
        room = n_ctx - len(ids)
        max_new = room if req.max_new_tokens is None else min(req.max_new_tokens, room)
        return Prepared(request=req, ids=ids, n_ctx=n_ctx, max_new_tokens=max_new)

    def _with_default_system(self, req: GenRequest) -> GenRequest:
        """The model's system message (an Ollama manifest's system layer) opens every conversation
        that does not open with its own, as in Ollama (server/routes.go ChatHandler, and
        GenerateHandler's req.System-else-m.System, at 9db4bdbad^). Raw prompts get none."""
        system = (getattr(self.model, "store_defaults", None) or {}).get("system")
        first = req.messages[0] if req.messages else None
        if not system or first is None or (isinstance(first, dict) and first.get("role") == "system"):
            return req
        return dataclasses.replace(req, messages=[{"role": "system", "content": system}, *req.messages])

    async def start(self, prepared: Prepared) -> Run:
        """Wait for a slot (FIFO), start the request's setup thread. Cancelling the caller while it
        waits leaves the queue."""
        self.require_ready()
        digests = [im.digest for im in prepared.request.images]
        slot, lcp = await self.pool.acquire(prepared.ids, digests)
        run = Run(
            asyncio.get_running_loop(), slot, prepared, lcp, on_end=self._ended, stream_interval=self.stream_interval
        )
        try:
            threading.Thread(target=self._setup, args=(run,), name=f"mllama-q-slot{slot.id}", daemon=True).start()
        except BaseException:
            self.pool.release(slot, used=False)
            raise
        return run

    def _setup(self, run: Run) -> None:
        """Setup thread: build the turn and hand it to the session; the model's engine thread
        delivers its events to run.on_event from then on."""
        slot, prep = run.slot, run.prepared
        req = prep.request
        try:
            kw: dict = dict(max_new_tokens=prep.max_new_tokens, stop=req.stop, **req.sampling)
            if req.messages is not None:
                kw["messages"] = req.messages
            else:
                kw["prompt"] = req.prompt
            if req.images:
                kw["images"] = [im.open() for im in req.images]  # decoded only now: queued requests hold bytes
            run.check()
            turn = slot.session.start(run.on_event, **kw)
        except (_Cancelled, KeyboardInterrupt):
            run.end(("done", None), "cancelled", None)
            return
        except Exception as e:
            run.end(("error", api_error(e, slot.id)), "error", None)
            return
        run.attach(turn)
        run.post(("start",))

    def _ended(self, run: Run, stop: str, result) -> None:
        """A run's last event (engine or setup thread): the slot's record, then the slot goes back
        to the pool on the event loop."""
        slot, prep = run.slot, run.prepared
        slot.requests += 1
        # generated: the result's count, or for a cancelled run the text pieces sent (about one per token)
        slot.last = {
            "stop": stop,
            "generated": result.completion_tokens if result is not None else run.n_pieces,
            "max_new_tokens": prep.max_new_tokens,
        }
        slot.digests = [im.digest for im in prep.request.images]
        try:
            run._loop.call_soon_threadsafe(self.pool.release, slot)
        except RuntimeError:  # event loop closed: shutting down
            pass
