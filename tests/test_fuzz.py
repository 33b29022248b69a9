"""Bounded fuzz run in the default test suite (tools/fuzz, fixed seeds, each case in a forked
child): a few thousand mutated GGUF files (family `gguf`), each loaded by the bare reader and
by Model(), and several hundred odd images, bad sampling / generate parameters, bad token /
mask / pixel arrays, bad quants and backend arguments, hostile chat templates and mutated
converter configs (family `inputs`): no crash, no hang, no exception other than a ValueError
(ModelFileError, ImageError, ...). The long run is `python -m tools.fuzz -n 100000` (see
tools/fuzz/__init__.py)."""

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


def bounded_run(family: str, seed: int, n: int, tmp_path):
    """n cases of `family` on 2 children: every one ran, none crashed, hung or failed uncleanly."""
    s = runner.fuzz(family, seed=seed, n=n, jobs=2, timeout=20, out_dir=tmp_path / "failures", progress=False)
    detail = "\n".join(f"case {i}: {kind}: {d[-600:]}" for i, kind, d in s.failures[:5])
    assert s.cases == n
    assert (s.counts[runner.CRASH], s.counts[runner.HANG], s.counts[runner.UNCLEAN]) == (0, 0, 0), (
        s.line() + "\n" + detail
    )
    return s


def test_gguf_mutants_fail_cleanly(tmp_path):
    s = bounded_run("gguf", SEED, N_CASES, tmp_path)
    # Not vacuous: the mutations must both break files (clean refusals) and leave loadable ones
    # (which then run a forward pass).
    assert s.counts[runner.CLEAN] > N_CASES // 3 and s.counts[runner.OK] > N_CASES // 10, s.line()


N_INPUTS = 1500
SEED_INPUTS = 8


def test_inputs_fail_cleanly(tmp_path):
    pytest.importorskip("torch")  # the config cases build their tiny checkpoint with transformers
    from tools.fuzz import inputs

    s = bounded_run("inputs", SEED_INPUTS, N_INPUTS, tmp_path)
    assert set(s.by_kind) == set(inputs.KINDS), s.kinds_line()  # every kind ran
    # both outcomes are exercised: the cases are not all trivially refused, nor all harmless
    assert s.counts[runner.OK] > N_INPUTS // 10 and s.counts[runner.CLEAN] > N_INPUTS // 3, s.line()


def test_inputs_cases_are_deterministic():
    from tools.fuzz import inputs

    assert list(inputs.generate(3, 50)) == list(inputs.generate(3, 50))
    assert list(inputs.generate(3, 50)) != list(inputs.generate(4, 50))


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
    assert (
        s.counts[runner.OK],
        s.counts[runner.CLEAN],
        s.counts[runner.CRASH],
        s.counts[runner.HANG],
        s.counts[runner.UNCLEAN],
    ) == (3, 1, 1, 1, 1), s.line()
    outcomes = {i: kind for i, kind, _ in s.failures}
    assert outcomes == {2: runner.CRASH, 4: runner.HANG, 5: runner.UNCLEAN}
    assert "SIGSEGV" in dict((i, d) for i, _, d in s.failures)[2]
    assert sorted(p.name for p in tmp_path.glob("*.pkl")) == [
        "selftest-0-2-crash.pkl",
        "selftest-0-4-hang.pkl",
        "selftest-0-5-unclean.pkl",
    ]
