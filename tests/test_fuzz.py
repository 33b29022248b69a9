"""Bounded fuzz run in the default test suite: a few thousand mutated GGUF files (tools/fuzz,
family `gguf`, fixed seed), each loaded in a forked child by the bare reader and by Model():
no crash, no hang, no exception other than ModelFileError. The long run is
`python -m tools.fuzz -n 100000` (see tools/fuzz/__init__.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")  # the seeds are written with gguf-py / the synthetic generator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # for `tools` only: the installed mllama_q stays first

from tools.fuzz import runner  # noqa: E402

N_CASES = 3000
SEED = 20260311


def test_gguf_mutants_fail_cleanly(tmp_path):
    s = runner.fuzz("gguf", seed=SEED, n=N_CASES, jobs=2, timeout=20, out_dir=tmp_path / "failures",
                    progress=False)
    detail = "\n".join(f"case {i}: {kind}: {d[-600:]}" for i, kind, d in s.failures[:5])
    assert s.cases == N_CASES
    assert (s.counts[runner.CRASH], s.counts[runner.HANG], s.counts[runner.UNCLEAN]) == (0, 0, 0), \
        s.line() + "\n" + detail
    # Not vacuous: the mutations must both break files (clean refusals) and leave loadable ones
    # (which then run a forward pass).
    assert s.counts[runner.CLEAN] > N_CASES // 3 and s.counts[runner.OK] > N_CASES // 10, s.line()


def test_runner_counts_crashes_hangs_and_unclean(tmp_path, monkeypatch):
    """The runner itself: a segfault, a hang and a stray exception in a case are counted as
    such (and saved), and the cases after them in the same child still run."""
    import types

    fam = types.ModuleType("tools.fuzz.selftest")

    def generate(seed, n):
        yield from ["ok", "value", "segv", "ok", "hang", "key", "ok"][:n]

    def run(case):
        import ctypes
        import time

        if case == "value":
            raise ValueError("clean")
        if case == "key":
            raise KeyError("unclean")
        if case == "segv":
            ctypes.string_at(0)
        if case == "hang":
            time.sleep(60)

    fam.generate, fam.run = generate, run
    monkeypatch.setitem(sys.modules, "tools.fuzz.selftest", fam)
    monkeypatch.setattr(runner, "FAMILIES", runner.FAMILIES + ("selftest",))
    s = runner.fuzz("selftest", n=7, jobs=1, timeout=2, batch=7, out_dir=tmp_path, progress=False)
    assert (s.counts[runner.OK], s.counts[runner.CLEAN], s.counts[runner.CRASH], s.counts[runner.HANG],
            s.counts[runner.UNCLEAN]) == (3, 1, 1, 1, 1), s.line()
    outcomes = {i: kind for i, kind, _ in s.failures}
    assert outcomes == {2: runner.CRASH, 4: runner.HANG, 5: runner.UNCLEAN}
    assert "SIGSEGV" in dict((i, d) for i, _, d in s.failures)[2]
    assert sorted(p.name for p in tmp_path.glob("*.pkl")) == [
        "selftest-0-2-crash.pkl", "selftest-0-4-hang.pkl", "selftest-0-5-unclean.pkl"]
