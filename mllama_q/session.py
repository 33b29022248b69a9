"""Sessions (one conversation each) and the scheduler that batches them.

    with Model("model.gguf", n_ctx=4096, max_sessions=4) as model:
        with model.session() as chat:
            chat.generate(messages=[...turn 1...], images=[photo])
            chat.generate(messages=[...turns 1-2...], images=[photo])   # prefills turn 2 only

A Session owns one KV-cache slot of the compiled model (n_ctx tokens; the Model allocates
max_sessions of them up front) and, in that slot, the token ids of its cache, the
cross-attention context of each (which images, which tiles it saw) and the images its prompt
shows. A turn whose prompt extends `session.tokens` prefills only the new tokens; one that
diverges keeps the longest common prefix (the cache is truncated, not rebuilt). Images are
known by their pixel content (a hash of the processed pixels, aspect ratio and tile mask):
their cross-attention K/V come from the session, or from a bounded LRU shared by all
sessions (`Model(image_cache=...)`), and are never encoded twice while held.

Batching and reuse do not change a sequence's logits: on the CPU every row's result depends
only on that row and its class -- decode rows (a generating turn's next token) by the per-row
kernels, prompt rows by the prompt kernels, whatever else shares the step
(Backend::matmul_rows, csrc/cpu/attention.h) -- so a turn batched with others, or whose
prompt is chunked differently or starts from a reused prefix, gives the same bits as the
same turn run alone. A reused prefix that holds generated tokens (computed as decode rows)
equals a recomputation of it (as prompt rows) bit for bit at F32; with quantized weights the
two classes sum an element's float terms in different orders (within float32 rounding of
each other). Reuse follows transformers'
semantics: a token that sees no image but has images in its prompt attends to all of them
(modeling_mllama._prepare_cross_attention_mask), so the tokens before a prompt's first image
depend on every image of the prompt, and a turn that adds an image re-prefills the text of
the conversation (the images themselves come from the cache).

Locking story -- the one place where threads meet:

  * One engine thread per Model (`Scheduler._loop`, started with the Model, stopped by
    Model.close()) is the only thread that does generation work on the core: image
    encodes (one vision layer per iteration), prompt prefill in chunks, and ONE batched
    decode step for every generating session (plus the newcomers' prefill chunks) per
    iteration. It alone changes session state.
  * Caller threads (any number, one turn in flight per session) build their request
    themselves (chat template, tokenizer, image preprocessing and hashing), hand it over
    through `Scheduler._inbox`, then only read their own turn's event queue (text pieces,
    progress, the end). Progress callbacks therefore run in the caller's thread.
  * Session.start(sink, ...) (event-driven callers such as the server, which would
    otherwise need one thread per turn just to move each piece along) replaces the
    turn's queue by `sink`: the engine thread itself calls sink(event) for every event,
    outside the lock. A sink must be quick and must not raise (it delays every session's
    next step); its turn is cancelled with the returned handle's cancel().
  * `Scheduler._cv` (a Condition over one lock) guards the inbox, the live turns, each
    turn's `cancelled` and `in_step` flags, and the slot table. It is held for bookkeeping
    only, never while computing.
  * The compiled core serialises its calls with its own mutex (bind_model.cpp) and
    releases the GIL while computing. The low-level Model API (reset / eval /
    encode_images / forward) runs in its caller's thread on a slot of its own and
    interleaves with the engine's steps through that mutex.
  * Cancelling (KeyboardInterrupt in the caller, stream.close(), Session.close/reset)
    sets the turn's flag under the lock and, when the turn has work in the running step,
    calls core.abort(), which is lock-free and stops the step between two layers; the
    engine then puts the session back as it was before the turn and sets the turn's
    `finished` event, which the canceller waits for.
  * Read-only views for other threads (Session.tokens) are immutable tuples that the
    engine swaps in (a reference assignment is atomic in CPython).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np

from .generate import GenerationResult, GenerationStream, Request, TextOut, prepare_request
from .sampling import core_params

# The cross-attention context of a token row, interned to an int per Scheduler: 0 = the
# prompt has no image (cross-attention layers skipped).
_SKIP = 0


def _held_for_caller(session) -> bool:
    """A one-shot call's session still holds its slot for its caller: its stream was not
    dropped (a finished turn's stream may still be unread; a dropped one's slot is freed
    when the engine lets go of the turn)."""
    turn = getattr(session, "_turn", None)
    return not session._abandoned and (turn is None or not turn.cancelled)


def checked_int32(a, name: str, lo: int, hi: int) -> np.ndarray:
    """`a` as int32 after checking it is an integer array with every value in [lo, hi]: a
    caller's int64 2**32 + 5 must be an error, not token 5 (the same rule as the core's
    bindings, which a cached image or a queued turn would otherwise never reach)."""
    arr = np.asarray(a)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise ValueError(f"{name} values must lie in [{lo}, {hi}]")
    return np.ascontiguousarray(arr, dtype=np.int32)


def image_key(pixel_values: np.ndarray, aspect_ratio_id: int, aspect_ratio_mask: np.ndarray) -> bytes:
    """Identity of one processed image: a hash of its pixels [max_tiles, C, H, W] (float32),
    aspect-ratio id and tile mask -- everything the vision tower reads."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(pixel_values, dtype=np.float32).tobytes())
    h.update(np.int64(aspect_ratio_id).tobytes())
    h.update(np.ascontiguousarray(aspect_ratio_mask, dtype=np.int32).tobytes())
    return h.digest()


class ImageCache:
    """Bounded LRU of encoded images (their cross-attention K/V), shared by the sessions.
    Images a session shows stay alive with the session even after they leave the LRU."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._d: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes):
        with self._lock:
            h = self._d.get(key)
            if h is not None:
                self._d.move_to_end(key)
            return h

    def put(self, key: bytes, handle) -> None:
        with self._lock:
            self._d[key] = handle
            self._d.move_to_end(key)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        return len(self._d)

    def nbytes(self) -> int:
        with self._lock:
            return sum(int(h.nbytes) for h in self._d.values())


class _Turn:
    """One generate() call in flight (engine-owned except `events`, `cancelled`, `finished`)."""

    def __init__(self, session: "Session", req: Request, stop_ids: set[int], sink=None):
        p = req.prompt
        self.session = session
        self.req = req
        self.stop_ids = stop_ids
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.post = self.events.put if sink is None else sink  # engine thread: post(event tuple)
        self.finished = threading.Event()
        self.cancelled = False
        self.in_step = False
        self.state = "queued"  # queued -> images -> prefill -> decode -> done
        self.result: GenerationResult | None = None
        model = session._model
        # ids index token_embd (vocab_size + 8 rows; <|image|> = vocab_size)
        self.ids = checked_int32(p.input_ids, "input_ids", 0, int(model.text_hparams["vocab_size"]) + 7)
        self.mask = (
            None
            if p.cross_attention_mask is None
            else checked_int32(p.cross_attention_mask, "cross_attention_mask", 0, 1)
        )
        # images: (pixels [T, C, H, W], aspect-ratio id, tile mask [T]) and their keys, prompt order
        self.images: list[tuple[np.ndarray, int, np.ndarray]] = []
        if p.pixel_values is not None:
            vhp = model.vision_hparams or {}
            ar_ids = checked_int32(p.aspect_ratio_ids, "aspect_ratio_ids", 0, int(vhp.get("max_aspect_ratio_id", 0)))
            ar_mask = checked_int32(p.aspect_ratio_mask, "aspect_ratio_mask", 0, 1)
            for i in range(p.pixel_values.shape[1]):
                self.images.append((p.pixel_values[0, i], int(ar_ids[0, i]), ar_mask[0, i]))
        self.keys = [image_key(*im) for im in self.images]  # in the caller's thread (~10 ms per image)
        self.handles: list[Any] = [None] * len(self.images)
        self.todo: list[int] = []  # images still to encode
        self.job = None
        self.units_done = self.units_total = 0
        self.ctx: np.ndarray | None = None  # int64 [L] context id per prompt row
        self.keep = 0  # prompt tokens reused from the cache
        self.pos = 0  # next prompt row to prefill
        self.touched = False  # the slot was truncated / overwritten
        self.snapshot = None  # the rows the turn overwrites (core.seq_snapshot)
        self.saved = None  # session state before the turn
        self.rng = np.random.default_rng(req.params.seed)
        self.pending_u: float | None = None
        self.last = -1  # token to feed next (decode)
        self.generated: list[int] = []
        self.out: TextOut | None = None
        self.n_decode_steps = 0
        self.t_begin = self.t_images = self.t_first = self.t_decode0 = None
        self.images_cached = 0


class _Shared:
    """What the engine thread and the callers share (under cv): see the module docstring."""

    def __init__(self):
        self.cv = threading.Condition()
        self.inbox: list[_Turn] = []
        self.turns: list[_Turn] = []
        self.stop = False


class Scheduler:
    """The engine of one Model: its thread, the turns in flight, the slots. See the module
    docstring for the locking story."""

    def __init__(self, model, core, n_slots: int, n_batch: int, prefill_chunk: int, image_cache: ImageCache):
        self._model_ref = weakref.ref(model)  # the Model holds the scheduler: no cycle
        self.core = core
        self.n_batch = int(n_batch)
        self.prefill_chunk = int(prefill_chunk)
        self.cache = image_cache
        self.n_ctx = int(core.n_ctx)
        self._sh = _Shared()
        self._free = list(range(n_slots))
        self._holders: dict[int, Any] = {}  # slot -> weakref to the Session, or _LOW_LEVEL
        self._sessions: weakref.WeakSet = weakref.WeakSet()
        self._ctx_ids: dict[tuple, int] = {}
        # The thread holds the scheduler weakly: an idle, unreferenced Model is freed (and its
        # thread ends); turns in flight hold their sessions, and so the model, alive.
        self._thread = threading.Thread(
            target=Scheduler._thread_main, args=(weakref.ref(self), self._sh), name="mllama-q-engine", daemon=True
        )
        self._thread.start()

    def __del__(self):
        sh = getattr(self, "_sh", None)
        if sh is not None:
            with sh.cv:
                sh.stop = True
                sh.cv.notify_all()

    @property
    def model(self):
        return self._model_ref()

    # -- slots (caller threads) ----------------------------------------------------
    def acquire_slot(self, holder, wait_for_temporary: bool = False) -> int:
        """A free slot; one held by the idle low-level API is taken back. With
        wait_for_temporary, waits while temporary sessions (model.generate) hold slots."""
        entry = holder if holder is _LOW_LEVEL else weakref.ref(holder)
        with self._sh.cv:
            while True:
                if self._sh.stop:
                    raise RuntimeError("the model is closed")
                # slots of sessions that were dropped without close()
                for slot, h in list(self._holders.items()):
                    if h is not _LOW_LEVEL and h() is None:
                        del self._holders[slot]
                        self._free.append(slot)
                if self._free:
                    self._free.sort()
                    slot = self._free.pop(0)
                    break
                ll = [s for s, h in self._holders.items() if h is _LOW_LEVEL]
                if ll and self.model._take_back_low_level():
                    slot = ll[0]
                    break
                live = [h() for h in self._holders.values() if h is not _LOW_LEVEL]
                me = threading.get_ident()
                if any(
                    getattr(h, "_temporary", False) and getattr(h, "_owner_thread", None) == me and _held_for_caller(h)
                    for h in live
                ):
                    # Waiting would wait for this very thread: its stream keeps the slot until it
                    # is exhausted or closed, also when every token is already computed.
                    raise RuntimeError(
                        "this thread is still generating with this Model (an unfinished stream?): "
                        "exhaust it or call its close() before the next call"
                    )
                temporary = any(getattr(h, "_temporary", False) for h in live)
                del live  # no strong reference while waiting: a dropped session's weakref must die
                if wait_for_temporary and temporary:
                    self._sh.cv.wait(0.5)
                    continue
                raise RuntimeError(
                    f"all {len(self._holders)} sessions of this model are in use: close one, or load the model "
                    f"with a larger max_sessions (each costs n_ctx x the KV cache of one token)"
                )
            self._holders[slot] = entry
        self._clear_slot(slot)  # outside the lock: it waits for the core's running step
        return slot

    def release_slot(self, slot: int) -> None:
        self._clear_slot(slot)
        with self._sh.cv:
            self._holders.pop(slot, None)
            self._free.append(slot)
            self._free.sort()
            self._sh.cv.notify_all()

    def _clear_slot(self, slot: int) -> None:
        self.core.seq_truncate(slot, 0)
        self.core.seq_set_images(slot, [])

    # -- turns (caller threads) ----------------------------------------------------
    def submit(self, session: "Session", req: Request, sink=None) -> _Turn:
        turn = _Turn(session, req, set(int(i) for i in self.model.stop_ids), sink)
        with self._sh.cv:
            if self._sh.stop:
                raise RuntimeError("the model is closed")
            if session._closed:
                raise RuntimeError("this session is closed")
            if session._turn is not None:
                raise RuntimeError("this session is already generating: finish or close the previous stream first")
            session._turn = turn
            self._sh.inbox.append(turn)
            self._sh.cv.notify_all()
        return turn

    def cancel(self, turn: _Turn, wait: bool = True) -> GenerationResult | None:
        """Stop a turn (it leaves the batch at the next step, or the running step is
        aborted between two layers when it computes the turn's prompt or images). With
        wait, returns once the engine has put the session back and finished the turn."""
        with self._sh.cv:
            if not turn.finished.is_set():
                turn.cancelled = True
                if turn.in_step and turn.state in ("images", "prefill"):
                    self.core.abort()
                self._sh.cv.notify_all()
        if wait:
            while not turn.finished.wait(0.25):
                pass
        return turn.result

    def events(self, turn: _Turn, progress=None):
        """The caller's side of a turn: yields text pieces, calls progress(phase, done, total),
        returns the GenerationResult. Any exception here (KeyboardInterrupt, an exception
        from the progress callback, closing the generator) cancels the turn first."""
        try:
            while True:
                try:
                    ev = turn.events.get(timeout=0.25)  # a timeout keeps Ctrl-C responsive
                except queue.Empty:
                    continue
                kind = ev[0]
                if kind == "piece":
                    yield ev[1]
                elif kind == "progress":
                    if progress is not None:
                        progress(ev[1], ev[2], ev[3])
                elif kind == "done":
                    return ev[1]
                elif kind == "error":
                    raise ev[1]
        except BaseException:
            self.cancel(turn, wait=True)
            raise

    def close(self) -> None:
        with self._sh.cv:
            if self._sh.stop:
                return
            self._sh.stop = True
            for t in self._sh.turns + self._sh.inbox:
                t.cancelled = True
            self.core.abort()
            self._sh.cv.notify_all()
        self._thread.join()

    # -- the engine thread -----------------------------------------------------------
    @staticmethod
    def _thread_main(wref, sh: "_Shared") -> None:
        while True:
            with sh.cv:
                while not sh.stop and not sh.inbox and not sh.turns:
                    sh.cv.wait()
            sched = wref()
            if sched is None:
                return
            if not sched._once():
                return
            del sched  # no strong reference while waiting

    def _once(self) -> bool:
        """One engine iteration; False when the scheduler is stopping (every turn finished)."""
        with self._sh.cv:
            if self._sh.stop:
                turns, self._sh.turns = self._sh.turns + self._sh.inbox, []
                self._sh.inbox = []
            else:
                turns = None
                self._sh.turns.extend(self._sh.inbox)
                self._sh.inbox = []
                cancelled = [t for t in self._sh.turns if t.cancelled]
        if turns is not None:
            for t in turns:
                self._finish(t, "cancelled")
            return False
        for t in cancelled:
            self._finish(t, "cancelled")
        self.core.clear_abort()
        try:
            self._iterate()
        except Exception as e:  # a bug or a device error: fail the live turns, keep serving
            for t in list(self._sh.turns):
                self._fail(t, e)
        return True

    def _iterate(self) -> None:
        for t in [t for t in self._sh.turns if t.state == "queued"]:
            try:
                self._start(t)
            except Exception as e:
                self._fail(t, e)
        img = next((t for t in self._sh.turns if t.state == "images"), None)
        if img is not None:
            self._image_unit(img)
        decode = [t for t in self._sh.turns if t.state == "decode"]
        prefill = [t for t in self._sh.turns if t.state == "prefill"]
        if decode or prefill:
            self._step(decode, prefill)

    def _post(self, t: _Turn, *ev) -> None:
        t.post(ev)

    def _ctx_id(self, key: tuple) -> int:
        i = self._ctx_ids.get(key)
        if i is None:
            i = self._ctx_ids[key] = len(self._ctx_ids) + 1
        return i

    def _contexts(self, t: _Turn) -> np.ndarray:
        """Context id of every prompt row: which tiles of which images (by key) it attends to,
        transformers' rules (see the core's mllama.h), so that two rows with equal ids and
        equal tokens before them have equal keys and values."""
        n = t.ids.size
        if not t.images:
            return np.zeros(n, dtype=np.int64)
        keys = tuple(t.keys)
        if t.mask is None:  # no mask: every vision token visible (HF forward without one)
            return np.full(n, self._ctx_id(("nomask",) + keys), dtype=np.int64)
        bits = (t.mask.astype(np.int64) << np.arange(t.mask.shape[2], dtype=np.int64)).sum(axis=2)  # [n, n_img]
        uniq, inv = np.unique(bits, axis=0, return_inverse=True)
        ids = []
        for row in uniq:
            if not row.any():  # sees no tile: attends to every key of every image (HF)
                ids.append(self._ctx_id(("all",) + keys))
            else:
                ids.append(self._ctx_id(("vis",) + tuple((keys[i], int(b)) for i, b in enumerate(row) if b)))
        return np.asarray(ids, dtype=np.int64)[inv.reshape(-1)]

    def _start(self, t: _Turn) -> None:
        s = t.session
        t.t_begin = time.perf_counter()
        t.ctx = self._contexts(t)
        old_tok, old_ctx = s._tok, s._ctx
        n = min(old_tok.size, t.ids.size)
        diff = np.flatnonzero((old_tok[:n] != t.ids[:n]) | (old_ctx[:n] != t.ctx[:n]))
        lcp = int(diff[0]) if diff.size else n
        t.keep = min(lcp, t.ids.size - 1)  # the last prompt token is always evaluated (its logits)
        t.pos = t.keep
        t.saved = (s._tok, s._ctx, list(s._handles), list(s._keys))
        t.out = TextOut(self.model.tokenizer, t.req.stops)
        # images: the session's own, the shared cache, another session's; else encode
        known = dict(zip(s._keys, s._handles))
        for i, k in enumerate(t.keys):
            h = known.get(k) or self.cache.get(k) or self._find_image(k)
            if h is None:
                t.todo.append(i)
            else:
                t.handles[i] = h
                t.images_cached += 1
                self.cache.put(k, h)
        t.state = "images" if t.todo else "prefill"
        if not t.todo:
            t.t_images = t.t_begin

    def _find_image(self, key: bytes):
        for sess in list(self._sessions):
            for k, h in zip(sess._keys, sess._handles):
                if k == key:
                    return h
        return None

    def _image_unit(self, t: _Turn) -> None:
        i = t.todo[0]
        t.in_step = True
        try:
            if t.job is None:
                if not self.core.vision_loaded:
                    self.model._load_vision()
                px, ar_id, ar_mask = t.images[i]
                t.job = self.core.begin_image(px, ar_id, np.ascontiguousarray(ar_mask, dtype=np.int32))
                if t.units_total == 0:
                    t.units_total = t.job.total * len(t.todo)
            t.job.step()
        except Exception as e:
            t.in_step = False
            self._fail(t, e)
            return
        t.in_step = False
        t.units_done += 1
        self._post(t, "progress", "image_encode", t.units_done, t.units_total)
        if t.job.finished:
            h = t.job.result()
            t.job = None
            self.cache.put(t.keys[i], h)
            t.handles[i] = h
            t.todo.pop(0)
            if not t.todo:
                t.state = "prefill"
                t.t_images = time.perf_counter()

    def _touch(self, t: _Turn) -> None:
        """Before the turn's first prefill chunk: give the slot the turn's images, cut the cache.
        The rows the turn is about to overwrite are saved first, so that cancelling it gives
        the session back exactly as it was."""
        s = t.session
        t.snapshot = self.core.seq_snapshot(s._slot, t.keep)  # no rows when the prompt extends the cache
        if s._keys != t.keys:
            self.core.seq_set_images(s._slot, t.handles)
            s._handles, s._keys = list(t.handles), list(t.keys)
        self.core.seq_truncate(s._slot, t.keep)
        s._set(s._tok[: t.keep], s._ctx[: t.keep])
        t.touched = True

    def _step(self, decode: list[_Turn], prefill: list[_Turn]) -> None:
        core = self.core
        entries, plan = [], []
        for t in decode:
            if t.pending_u is None:
                # the same draws as sampling.Sampler: one random() per non-greedy token
                t.pending_u = 0.0 if t.req.params.greedy else float(t.rng.random())
            entries.append(
                (
                    t.session._slot,
                    np.asarray([t.last], dtype=np.int32),
                    None,
                    0,
                    core_params(t.req.params, t.pending_u),
                    True,  # decode rows: the same kernels as when the turn runs alone (TextDecoder::step)
                )
            )
            plan.append((t, 1))
        budget = self.n_batch - len(decode)
        cap = self.prefill_chunk if decode else self.n_batch
        for t in prefill:
            if budget <= 0:
                break
            n = min(t.ids.size - t.pos, budget, cap)
            last = t.pos + n == t.ids.size
            if last and t.pending_u is None:
                t.pending_u = 0.0 if t.req.params.greedy else float(t.rng.random())
            mask = None if t.mask is None else t.mask[t.pos : t.pos + n]
            entries.append(
                (
                    t.session._slot,
                    t.ids[t.pos : t.pos + n],
                    mask,
                    0,
                    core_params(t.req.params, t.pending_u) if last else None,
                    False,  # prompt rows, even a chunk of one token (the prompt kernels, as alone)
                )
            )
            plan.append((t, n))
            budget -= n
        if not entries:
            return
        with self._sh.cv:
            for t, _ in plan:
                t.in_step = True
            abort_now = any(t.cancelled and t.state == "prefill" for t, _ in plan)
        if abort_now:
            for t, _ in plan:
                t.in_step = False
            return  # the cancelled turn is finished at the top of the loop
        for t, _ in plan:
            if t.state == "prefill" and not t.touched:
                self._touch(t)  # from here on the turn's rows past t.keep are being overwritten
        from . import _core

        try:
            out = core.step(entries)
        except _core.StepAborted:
            for t, _ in plan:
                t.in_step = False
            return  # nothing committed; the cancelled turns finish next iteration, the others retry
        except Exception as e:
            for t, _ in plan:
                t.in_step = False
                self._fail(t, e)
            return
        for t, _ in plan:
            t.in_step = False
        now = time.perf_counter()
        for (t, n), (_, sampled) in zip(plan, out):
            s = t.session
            if t.state == "decode":
                s._set(np.append(s._tok, np.int32(t.last)), np.append(s._ctx, t.ctx[-1]))
                t.pending_u = None
                t.n_decode_steps += 1
                self._sampled(t, int(sampled))
                continue
            rows = slice(t.pos, t.pos + n)
            s._set(np.concatenate([s._tok, t.ids[rows]]), np.concatenate([s._ctx, t.ctx[rows]]))
            t.pos += n
            self._post(t, "progress", "prefill", t.pos - t.keep, t.ids.size - t.keep)
            if t.pos == t.ids.size:
                t.pending_u = None
                t.snapshot = None  # the prompt is in: a later cancel keeps what was generated
                t.t_first = now
                t.t_decode0 = now
                self._sampled(t, int(sampled))

    def _sampled(self, t: _Turn, tok: int) -> None:
        if tok in t.stop_ids:
            self._finish(t, "stop_token")
            return
        t.generated.append(tok)
        piece = t.out.push(tok)
        if piece:
            self._post(t, "piece", piece)
        if t.out.stopped:
            self._finish(t, "stop_string")
        elif len(t.generated) >= t.req.max_new_tokens:
            self._finish(t, "length")
        elif t.session._tok.size >= self.n_ctx:
            self._finish(t, "context_full")
        else:
            t.last = tok
            t.state = "decode"

    def _rollback(self, t: _Turn) -> None:
        """A turn stopped before its first token: the session as before the turn (or, when the
        prompt diverged and its first chunk already overwrote the cache, the prefix it kept)."""
        s = t.session
        t.job = None
        if not t.touched:
            return  # the slot was not changed yet
        # Rows below t.keep (a common prefix) were never written; those from it on were
        # saved (t.snapshot) when the turn had to overwrite some.
        old_tok, old_ctx, old_handles, old_keys = t.saved
        self.core.seq_truncate(s._slot, t.keep)
        self.core.seq_restore(s._slot, t.snapshot)
        s._handles, s._keys = old_handles, old_keys
        s._set(old_tok, old_ctx)
        t.snapshot = None

    def _finish(self, t: _Turn, reason: str) -> None:
        if t.finished.is_set():
            return
        if reason == "cancelled" and t.state in ("queued", "images", "prefill"):
            self._rollback(t)
        now = time.perf_counter()
        out = t.out or TextOut(self.model.tokenizer, t.req.stops)
        piece = out.finish()
        if piece:
            self._post(t, "piece", piece)
        t0 = t.req.t_start
        begin = t.t_begin or now
        images = t.t_images or now
        first = t.t_first or now
        n_prefill = t.ids.size - t.keep
        timings = {
            "image_encode_s": images - begin,
            "prefill_s": first - images,
            "prefill_tokens_per_s": n_prefill / max(first - images, 1e-9),
            "decode_s": now - (t.t_decode0 or now),
            "decode_tokens_per_s": t.n_decode_steps / max(now - t.t_decode0, 1e-9) if t.n_decode_steps else 0.0,
            "time_to_first_token_s": first - t0,
            "total_s": now - t0,
            "prepare_s": t.req.t_ready - t0,
            "queue_s": begin - t.req.t_ready,
        }
        if getattr(self.model, "load_time_s", None) is not None:
            timings["load_s"] = float(self.model.load_time_s)
        t.result = GenerationResult(
            text=out.text,
            tokens=list(t.generated),
            prompt_tokens=int(t.ids.size),
            completion_tokens=len(t.generated),
            stop_reason=reason,
            timings=timings,
            cached_tokens=int(t.keep),
            images_encoded=len(t.images) - t.images_cached,
            images_cached=t.images_cached,
        )
        self._retire(t)
        self._post(t, "done", t.result)
        t.finished.set()

    def _retire(self, t: _Turn) -> None:
        """The turn is over: out of the scheduler's list and its session's, waiters woken."""
        t.state = "done"
        with self._sh.cv:
            if t in self._sh.turns:
                self._sh.turns.remove(t)
            if t.session._turn is t:
                t.session._turn = None
            self._sh.cv.notify_all()

    def _fail(self, t: _Turn, e: BaseException) -> None:
        try:
            self._rollback(t)
        except Exception:
            pass
        self._retire(t)
        self._post(t, "error", e)
        t.finished.set()


class TurnHandle:
    """A turn started with Session.start."""

    def __init__(self, sched: Scheduler, turn: _Turn):
        self._sched, self._turn = sched, turn

    def cancel(self, wait: bool = False) -> GenerationResult | None:
        """Stop the turn: it leaves the batch at the next step (a running prefill or image
        encode is aborted between two layers); its sink then gets ("done", result with
        stop_reason "cancelled") unless it had finished. Never blocks unless `wait`."""
        return self._sched.cancel(self._turn, wait)

    @property
    def finished(self) -> bool:
        return self._turn.finished.is_set()


_LOW_LEVEL = object()  # slot holder: the low-level Model API (reset/eval/encode_images/forward)


class Session:
    """One conversation on a Model: see the module docstring. Create with model.session();
    use as a context manager or call close() (it frees the slot for another session)."""

    def __init__(self, model, _temporary: bool = False):
        self._model = model
        self._sched: Scheduler = model._scheduler
        self._temporary = _temporary
        self._owner_thread = threading.get_ident()  # a one-shot call's thread (acquire_slot's same-thread check)
        self._abandoned = False  # set when a one-shot call's stream is dropped unread
        self._closed = True
        self._turn: _Turn | None = None
        self._tok = np.zeros(0, dtype=np.int32)
        self._ctx = np.zeros(0, dtype=np.int64)
        self._handles: list[Any] = []
        self._keys: list[bytes] = []
        self._slot = self._sched.acquire_slot(self, wait_for_temporary=_temporary)
        self._closed = False
        with self._sched._sh.cv:
            self._sched._sessions.add(self)

    def _set(self, tok: np.ndarray, ctx: np.ndarray) -> None:  # engine thread
        # new arrays, never changed in place: other threads may read the old ones
        self._tok, self._ctx = tok, ctx

    @property
    def tokens(self) -> tuple[int, ...]:
        """The token ids in this session's KV cache (read-only; for choosing a session by prefix)."""
        return tuple(self._tok.tolist())

    @property
    def n_images(self) -> int:
        """Images whose cross-attention K/V this session holds."""
        return len(self._handles)

    def generate(
        self,
        messages: Sequence[Mapping] | None = None,
        prompt: str | None = None,
        images: Sequence | None = None,
        *,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        aspect_ratio_ids=None,
        aspect_ratio_mask=None,
        cross_attention_mask=None,
        max_new_tokens: int = 512,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_strings: Sequence[str] | str | None = None,
        stop: Sequence[str] | str | None = None,
        stream: bool = False,
        add_generation_prompt: bool = True,
        chat_kwargs: Mapping[str, Any] | None = None,
        progress=None,
    ):
        if self._closed:
            raise RuntimeError("this session is closed")
        req = prepare_request(
            self._model,
            messages,
            prompt,
            images,
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            aspect_ratio_ids=aspect_ratio_ids,
            aspect_ratio_mask=aspect_ratio_mask,
            cross_attention_mask=cross_attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop_strings=stop_strings,
            stop=stop,
            add_generation_prompt=add_generation_prompt,
            chat_kwargs=chat_kwargs,
            progress=progress,
        )
        self._wait_rollback()
        turn = self._sched.submit(self, req)
        gen = self._sched.events(turn, progress)
        if stream:
            return GenerationStream(gen, on_close=lambda wait: self._sched.cancel(turn, wait))
        while True:
            try:
                next(gen)
            except StopIteration as done:
                return done.value

    def start(self, sink, messages=None, prompt=None, images=None, **kwargs) -> "TurnHandle":
        """Start a turn without a thread to read it: the same arguments as generate() (except
        stream and progress), but the engine thread calls `sink(event)` for each event, in
        order: ("progress", phase, done, total)*, ("piece", text)*, then ("done",
        GenerationResult) or ("error", exception) once, after the session is free for its next
        turn. `sink` runs on the engine thread: it must be quick and must not raise. Blocking
        like generate() until the request is built (template, tokenizer, images); returns at
        once after that."""
        if "progress" in kwargs:
            raise TypeError("Session.start: progress events go to the sink, not to a progress callback")
        if self._closed:
            raise RuntimeError("this session is closed")
        req = prepare_request(self._model, messages, prompt, images, **kwargs)
        self._wait_rollback()
        return TurnHandle(self._sched, self._sched.submit(self, req, sink))

    def _wait_rollback(self) -> None:
        """A turn cancelled by a second Ctrl-C may still be rolling back: wait for it."""
        t = self._turn
        if t is not None and t.cancelled:
            while not t.finished.wait(0.25):
                pass

    def _stop_turn(self) -> None:
        t = self._turn
        if t is not None:
            self._sched.cancel(t, wait=True)

    def reset(self) -> None:
        """Forget the conversation (tokens and images); the slot stays this session's."""
        if self._closed:
            raise RuntimeError("this session is closed")
        self._stop_turn()
        self._sched._clear_slot(self._slot)
        self._handles, self._keys = [], []
        self._set(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64))

    def close(self) -> None:
        """Stop any generation in flight and give the slot back (its KV cache and images go)."""
        if self._closed:
            return
        self._stop_turn()
        self._closed = True
        with self._sched._sh.cv:
            self._sched._sessions.discard(self)
        self._handles, self._keys = [], []
        self._set(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64))
        if not self._sched._sh.stop:
            self._sched.release_slot(self._slot)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Session(slot={self._slot}, tokens={self._tok.size}, images={len(self._handles)}"
            f"{', closed' if self._closed else ''})"
        )
