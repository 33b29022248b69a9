"""Fork-server fuzz runner: each case in a child process, crashes and hangs counted, not fatal.

Why a fork server: a case may segfault, abort or never return, so it cannot run in the
runner's own process; starting a fresh interpreter per case (importing numpy, tokenizers and
the compiled core each time) would cost ~0.5 s, too slow for 100,000 cases on 2 cores. The
parent imports the family (and through it the library) ONCE, then forks a child per small
batch of cases; the child inherits everything already imported and costs a few milliseconds.

Protocol (one pipe per child, JSON lines child -> parent):
    ["start", index]                    before each case
    ["done", index, outcome, detail]    outcome: ok | clean | unclean
The parent watches every child with select(): a child that dies while a case is started is a
CRASH of that case (signal or exit status recorded), a case started more than `timeout`
seconds ago is a HANG (the child is killed). The rest of that child's batch goes on in a new
child. Children run with an address-space limit (RLIMIT_AS: what they inherited plus a budget,
default 3 GiB) so an input that makes the library allocate without bound fails as an unclean
MemoryError instead of taking the machine down; their stdout is discarded and their stderr kept for crash reports.
The parent never runs library code itself (no kernel thread pool exists when it forks).
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import importlib
import itertools
import json
import os
import pickle
import resource
import select
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tools.fuzz import FAMILIES

OK, CLEAN, UNCLEAN, CRASH, HANG = "ok", "clean", "unclean", "crash", "hang"
FAILURES = (UNCLEAN, CRASH, HANG)


@dataclass
class Summary:
    family: str
    seed: int
    cases: int = 0
    counts: collections.Counter = field(default_factory=collections.Counter)
    wall_s: float = 0.0
    failures: list = field(default_factory=list)  # (index, outcome, detail) of every failing case
    by_kind: dict = field(default_factory=dict)  # kind -> Counter of outcomes (families with kind_of)
    interrupted: bool = False  # stopped early (Ctrl-C / SIGTERM): the counts so far

    @property
    def failed(self) -> int:
        return sum(self.counts[k] for k in FAILURES)

    def line(self) -> str:
        rate = self.cases / self.wall_s if self.wall_s > 0 else 0.0
        return (
            f"{self.family}: {self.cases} cases in {self.wall_s:.0f} s ({rate:.1f} cases/s): "
            f"{self.counts[OK]} ok, {self.counts[CLEAN]} clean errors, {self.counts[UNCLEAN]} unclean, "
            f"{self.counts[CRASH]} crashes, {self.counts[HANG]} hangs" + (" (interrupted)" if self.interrupted else "")
        )

    def kinds_line(self) -> str:
        return ", ".join(
            f"{k} {sum(c.values())} ({c[OK]} ok, {c[CLEAN]} clean, {c[UNCLEAN]} unclean, "
            f"{c[CRASH]} crash, {c[HANG]} hang)"
            for k, c in sorted(self.by_kind.items())
        )


def outcome_of(exc: BaseException) -> str:
    """A ValueError (ModelFileError and the library's other documented errors) is clean."""
    return CLEAN if isinstance(exc, ValueError) else UNCLEAN


def _prepare(mod) -> None:
    """The family's prepare() in a forked child (the parent must not start library threads
    before it forks the case children); its failure stops the run."""
    if not callable(getattr(mod, "prepare", None)):
        return
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            mod.prepare()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{mod.__name__}.prepare() failed (status {status})")


def load_family(name: str):
    if name not in FAMILIES:
        raise SystemExit(f"unknown fuzz family {name!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(f"tools.fuzz.{name}")


# --------------------------------------------------------------------------- child
def _address_space_bytes() -> int:
    """This process's virtual address space now (VmSize: /proc/self/statm's first field, pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _child(mod, batch, wfd: int, mem_bytes: int, stderr_path: str) -> None:
    """Runs in the forked child; never returns."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
        if mem_bytes:
            # The budget is for what the case maps, on top of the address space inherited from the
            # parent: a parent that imported a CUDA build of torch (a test run's worker) already
            # maps several GiB of libraries, and an absolute limit below that made every mapping
            # in the child fail ("failed to map segment", hangs) before any case ran.
            limit = _address_space_bytes() + mem_bytes
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        err = open(stderr_path, "w")  # noqa: SIM115 - lives until os._exit
        os.dup2(err.fileno(), 2)
        faulthandler.enable(file=err, all_threads=True)  # a crash leaves its Python stack in the report
        out = os.fdopen(wfd, "w", buffering=1)
        for index, case in batch:
            out.write(json.dumps(["start", index]) + "\n")
            out.flush()
            outcome, detail = OK, ""
            try:
                mod.run(case)
            except BaseException as e:  # noqa: BLE001 - everything is an outcome here
                outcome = outcome_of(e)
                detail = traceback.format_exc()[-4000:] if outcome == UNCLEAN else f"{type(e).__name__}: {str(e)[:300]}"
            out.write(json.dumps(["done", index, outcome, detail]) + "\n")
            out.flush()
    finally:
        os._exit(0)


# --------------------------------------------------------------------------- parent
@dataclass
class _Worker:
    pid: int
    fd: int
    batch: list
    stderr_path: str
    buf: bytes = b""
    done: set = field(default_factory=set)
    cur: int | None = None
    t_start: float = 0.0
    killed: bool = False


def _describe(case) -> str:
    d = getattr(case, "describe", None)
    return d() if callable(d) else repr(case)[:500]


def _save(out_dir: Path, family: str, seed: int, index: int, outcome: str, detail: str, case, mod) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{family}-{seed}-{index}-{outcome}"
    with open(stem.with_suffix(".pkl"), "wb") as f:
        pickle.dump(
            {"family": family, "seed": seed, "index": index, "outcome": outcome, "detail": detail, "case": case}, f
        )
    stem.with_suffix(".txt").write_text(
        f"{family} seed {seed} case {index}: {outcome}\n{_describe(case)}\n\n{detail}\n"
    )
    mat = getattr(case, "materialize", None)
    if callable(mat):
        stem.with_suffix(getattr(mod, "FILE_SUFFIX", ".bin")).write_bytes(mat())


def fuzz(
    family: str,
    seed: int = 0,
    n: int = 1000,
    *,
    jobs: int = 2,
    timeout: float = 20.0,
    batch: int = 32,
    out_dir=None,
    mem_mb: int = 3072,
    progress: bool = True,
    only=None,
) -> Summary:
    """Run n cases of `family` (cases `only` if given: an iterable of indices); returns the Summary."""
    mod = load_family(family)
    summary = Summary(family, seed)
    kind_of = getattr(mod, "kind_of", None)
    _prepare(mod)
    only = None if only is None else set(int(i) for i in only)
    cases = ((i, c) for i, c in enumerate(mod.generate(seed, n)) if only is None or i in only)
    by_index: dict[int, object] = {}  # cases of running batches, for saving failures
    retry: collections.deque = collections.deque()
    workers: dict[int, _Worker] = {}
    tmp = Path(tempfile.mkdtemp(prefix=f"mllama-q-fuzz-{family}-"))
    out = Path(out_dir) if out_dir else None
    mem_bytes = int(mem_mb) << 20 if mem_mb else 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool across forks
    t0 = last = time.monotonic()

    def record(index: int, outcome: str, detail: str) -> None:
        summary.cases += 1
        summary.counts[outcome] += 1
        case = by_index.pop(index, None)
        if kind_of is not None and case is not None:
            summary.by_kind.setdefault(kind_of(case), collections.Counter())[outcome] += 1
        if outcome in FAILURES:
            summary.failures.append((index, outcome, detail))
            if out is not None:
                _save(out, family, seed, index, outcome, detail, case, mod)

    def start(b) -> None:
        r, w = os.pipe()
        stderr_path = str(tmp / f"stderr-{len(workers)}-{b[0][0]}")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(mod, b, w, mem_bytes, stderr_path)
        os.close(w)
        workers[r] = _Worker(pid, r, b, stderr_path)

    def finish(wk: _Worker) -> None:
        os.close(wk.fd)
        del workers[wk.fd]
        _, status = os.waitpid(wk.pid, 0)
        if wk.cur is not None and not wk.killed:
            if os.WIFSIGNALED(status):
                why = f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
            else:
                why = f"child exited with status {os.waitstatus_to_exitcode(status)} inside the case"
            try:
                tail = Path(wk.stderr_path).read_text(errors="replace")[-2000:]
            except OSError:
                tail = ""
            record(wk.cur, CRASH, why + ("\n--- stderr ---\n" + tail if tail else ""))
        rest = [(i, c) for i, c in wk.batch if i not in wk.done and i != wk.cur]
        if rest:
            retry.appendleft(rest)
        try:
            os.unlink(wk.stderr_path)
        except OSError:
            pass

    def next_batch():
        if retry:
            return retry.popleft()
        b = list(itertools.islice(cases, batch))
        for i, c in b:
            by_index[i] = c
        return b

    try:
        while True:
            while len(workers) < jobs:
                b = next_batch()
                if not b:
                    break
                start(b)
            if not workers:
                break
            ready, _, _ = select.select(list(workers), [], [], 0.25)
            now = time.monotonic()
            for fd in ready:
                wk = workers[fd]
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    finish(wk)
                    continue
                wk.buf += chunk
                *lines, wk.buf = wk.buf.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if msg[0] == "start":
                        wk.cur, wk.t_start = msg[1], now
                    else:
                        _, index, outcome, detail = msg
                        wk.done.add(index)
                        wk.cur = None
                        record(index, outcome, detail)
            for wk in list(workers.values()):
                if wk.cur is not None and not wk.killed and now - wk.t_start > timeout:
                    wk.killed = True
                    os.kill(wk.pid, signal.SIGKILL)
                    record(wk.cur, HANG, f"no result after {timeout:.0f} s")
                    wk.done.add(wk.cur)
            if progress and now - last > 5:
                last = now
                summary.wall_s = now - t0
                print("  " + summary.line(), file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (main): stop, keep what was counted
        summary.interrupted = True
    finally:
        for wk in list(workers.values()):
            try:
                os.kill(wk.pid, signal.SIGKILL)
                os.waitpid(wk.pid, 0)
            except OSError:
                pass
            os.close(wk.fd)
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    summary.wall_s = time.monotonic() - t0
    return summary


def replay(path) -> int:
    """Run one saved case in this process (no fork), printing its traceback."""
    with open(path, "rb") as f:
        saved = pickle.load(f)
    mod = load_family(saved["family"])
    print(
        f"{saved['family']} seed {saved['seed']} case {saved['index']} (saved as {saved['outcome']}):\n"
        f"{_describe(saved['case'])}"
    )
    try:
        mod.run(saved["case"])
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc()
        print(f"outcome: {outcome_of(e)}")
        return 0 if outcome_of(e) == CLEAN else 1
    print("outcome: ok")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.fuzz", description="Fuzz mllama-q (tools/fuzz/__init__.py).")
    ap.add_argument("--family", action="append", choices=FAMILIES, help="family to run (repeatable; default all)")
    ap.add_argument("-n", "--cases", type=int, default=1000, help="cases per family (1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="children at once (cores)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a case is a hang (20)")
    ap.add_argument("--batch", type=int, default=32, help="cases per child process (32)")
    ap.add_argument("--mem-mb", type=int, default=3072, help="per-child address-space budget, MiB (0 = no limit)")
    ap.add_argument("--out", default="fuzz-failures", help="directory for failing cases (fuzz-failures)")
    ap.add_argument("--only", default=None, help="comma-separated case indices to run")
    ap.add_argument("--replay", default=None, help="a saved .pkl case: run it in this process")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    # Stoppable with Ctrl-C and SIGTERM even when started in the background (where the shell
    # leaves SIGINT ignored): the children are killed and the counts so far printed.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.replay:
        return replay(args.replay)
    only = [int(x) for x in args.only.split(",")] if args.only else None
    summaries = []
    for fam in args.family or FAMILIES:
        s = fuzz(
            fam,
            args.seed,
            args.cases,
            jobs=args.jobs,
            timeout=args.timeout,
            batch=args.batch,
            out_dir=args.out,
            mem_mb=args.mem_mb,
            progress=not args.quiet,
            only=only,
        )
        summaries.append(s)
        print(s.line(), flush=True)
        if s.by_kind:
            print("  by kind: " + s.kinds_line(), flush=True)
        for index, outcome, detail in s.failures[:20]:
            print(f"  case {index}: {outcome}: {detail.strip().splitlines()[-1] if detail.strip() else ''}")
        if s.failures:
            print(f"  failing cases saved under {args.out}/ (replay: python -m tools.fuzz --replay FILE.pkl)")
        if s.interrupted:
            return 130
    return 1 if any(s.failed for s in summaries) else 0
