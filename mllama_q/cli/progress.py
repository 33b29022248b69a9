"""Terminal progress for long phases: one status line on stderr, only when stderr is a terminal.

    p = Progress("encoding image")            # nothing shows during the first `delay` seconds
    for i in range(n):
        ...
        p.update(i + 1, n)                    # "encoding image  12/40  30%  4 s"
    p.done("image encoded in 9.8 s")          # clears the line, then prints the message

    with Progress("loading model.gguf", ticker=True):   # no counts: the elapsed time ticks
        model = Model(path)

When the stream is not a terminal (a pipe, a log file, a test's capture) nothing at all is
written, so `--json` output, logs and redirected answers stay clean. Phases shorter than
`delay` (2 s) never show: the line is for waits a user would otherwise think are hangs
(on the CPU one image takes about a minute).

`PhaseProgress` adapts the core's per-phase callback, `generate(..., progress=fn(phase,
done, total))` (CONTRACTS.md B), to one Progress per phase.

This is the only module that draws progress for the `mllama-q` commands (CONTRACTS.md C);
the runtime library never imports it.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time

DELAY_S = 2.0  # phases shorter than this show nothing
MIN_INTERVAL_S = 0.1  # at most ten redraws a second
TICK_S = 0.5  # redraw period of a ticker (phases without counts)

# Labels for the phases the core reports (generate's progress callback).
PHASE_LABELS = {"image_encode": "encoding image", "prefill": "reading the prompt", "load": "loading"}


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _fmt_elapsed(s: float) -> str:
    return f"{s:.0f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"


class Progress:
    """A status line `label  done/total  pct%  elapsed` redrawn in place on `stream` (stderr).

    Args:
      label: what is happening ("loading model.gguf").
      stream: where to draw (default sys.stderr, looked up when created).
      delay: seconds before anything is drawn (short phases stay silent).
      ticker: redraw the elapsed time from a background thread while no counts arrive
        (for phases that report nothing until they end, such as a model load).
    """

    def __init__(self, label: str, *, stream=None, delay: float = DELAY_S, ticker: bool = False):
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.enabled = _is_terminal(self.stream)
        self.delay = delay
        self.t0 = time.perf_counter()
        self._done_count: int | None = None
        self._total: int | None = None
        self._last_draw = -1.0
        self._width = 0  # characters of the line now on screen (0: nothing drawn)
        self._finished = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if self.enabled and delay <= 0:
            self._draw(self.t0)  # an immediate status (the model load): shown before the wait
            self._last_draw = -1.0  # the first update() still draws
        if self.enabled and ticker:
            self._thread = threading.Thread(target=self._tick, name="mllama-q-progress", daemon=True)
            self._thread.start()

    # -- public ------------------------------------------------------------------------------
    def update(self, done: int, total: int | None = None) -> None:
        """`done` of `total` units finished (total None: unknown)."""
        if not self.enabled or self._finished:
            return
        with self._lock:
            self._done_count, self._total = int(done), (None if total is None else int(total))
            now = time.perf_counter()
            final = total is not None and done >= total
            if now - self._last_draw >= MIN_INTERVAL_S or final:
                self._draw(now)

    def done(self, message: str | None = None) -> None:
        """End the phase: clear the line; on a terminal, print `message` (if any) on its own line.
        Safe to call more than once (later calls do nothing)."""
        if self._finished:
            return
        self._finished = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if not self.enabled:
            return
        with self._lock:
            self._clear()
            if message:
                self.stream.write(message + "\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.done()

    # -- drawing -----------------------------------------------------------------------------
    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                if not self._finished:
                    self._draw(time.perf_counter())

    def _text(self, now: float) -> str:
        parts = [self.label]
        if self._done_count is not None:
            if self._total:
                parts.append(f"{self._done_count}/{self._total}  {100 * self._done_count // self._total:3d}%")
            else:
                parts.append(str(self._done_count))
        parts.append(_fmt_elapsed(now - self.t0))
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        if now - self.t0 < self.delay:
            return
        cols = shutil.get_terminal_size((80, 24)).columns
        text = self._text(now)[: max(cols - 1, 10)]
        pad = " " * max(self._width - len(text), 0)  # wipe the rest of a longer previous line
        self.stream.write("\r" + text + pad)
        self.stream.flush()
        self._width = len(text)
        self._last_draw = now

    def _clear(self) -> None:
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0


class PhaseProgress:
    """A callable `fn(phase, done, total)` for the core's progress callback: one Progress per
    phase ("image_encode", "prefill", ...), the previous one ended when a new phase starts.
    Call `close()` (or use it as a context manager) before writing output to the terminal."""

    def __init__(self, *, stream=None, delay: float = DELAY_S, labels: dict | None = None):
        self.stream = stream
        self.delay = delay
        self.labels = {**PHASE_LABELS, **(labels or {})}
        self.phase: str | None = None
        self._p: Progress | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.close()
            self.phase = phase
            self._p = Progress(self.labels.get(phase, phase.replace("_", " ")), stream=self.stream, delay=self.delay)
        self._p.update(done, total)

    def close(self) -> None:
        if self._p is not None:
            self._p.done()
            self._p = None
        self.phase = None

    def __enter__(self) -> "PhaseProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
