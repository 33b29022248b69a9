"""Hostile or broken inputs outside the GGUF reader (issue 8, deliverable 3): each case is a
regression test for a crash, hang, unbounded allocation or silent garbage found by fuzzing,
and asserts a clear exception (a ValueError subclass naming the argument) instead.

GGUF files themselves are tests/test_bad_gguf.py's; converter inputs are in test_convert.py."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

import mllama_q
from mllama_q import _core, quants


def _run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this process's mllama_q (a crash or a
    hang there must not take the test session with it)."""
    root = str(Path(mllama_q.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=tempfile.gettempdir())


# ------------------------------------------------------------------ _core sizes: checked arithmetic
def test_get_rows_huge_row_count_is_an_overflow_error_not_a_wrapped_size():
    # 2**62 rows of 4 floats: rows * row_bytes wrapped to 0 and matched the empty table, then the
    # kernel read far outside it (garbage or a segfault).
    b = _core.Backend("cpu")
    with pytest.raises(ValueError, match="overflows"):
        b.get_rows(np.zeros(0, np.uint8), "f32", 2**62, 4, np.array([5], np.int32))


def test_get_rows_ids_are_range_checked_before_narrowing():
    b = _core.Backend("cpu")
    table = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(b.get_rows(table, "f32", 4, 4, np.array([2], np.int64)), table[2:3])
    for bad in (np.array([2**32 + 1], np.int64), np.array([-1]), np.array([4])):
        with pytest.raises(ValueError, match="ids values must lie in"):
            b.get_rows(table, "f32", 4, 4, bad)
    with pytest.raises(ValueError, match="integer array"):
        b.get_rows(table, "f32", 4, 4, np.array([1.7]))


def test_dequantize_zero_size_with_huge_extent_returns_at_once():
    # (2**40, 0): zero bytes, so the size check passed, then 2**40 empty row decodes ran (never returned)
    out = quants.dequantize(np.zeros(0, np.uint8), "q8_0", (2**40, 0))
    assert out.shape == (2**40, 0) and out.dtype == np.float32
    assert _core.dequantize(np.zeros(0, np.uint8), "q8_0", 2**40, 0).shape == (2**40, 0)
    assert quants.dequantize(np.zeros(0, np.uint8), "q4_k", (0, 2**20 * 256)).shape == (0, 2**20 * 256)
    # a shape whose element count overflows int64: numpy's product wrapped, here it is exact
    with pytest.raises(ValueError, match="bytes"):
        quants.dequantize(np.zeros(34, np.uint8), "q8_0", (2**32, 2**32, 32))
    with pytest.raises(ValueError, match="overflows"):
        _core.dequantize(np.zeros(0, np.uint8), "f32", 2**62, 2**4)
    assert _core.quantize(np.zeros((2**20, 0), np.float32), "q8_0").shape == (2**20, 0)


def test_matmul_sizes_are_checked():
    x = np.zeros((2, 32), np.float32)
    with pytest.raises(ValueError, match="overflows"):
        _core.matmul(x, np.zeros(0, np.uint8), "q8_0", 2**61, 32)
    with pytest.raises(ValueError, match="overflows"):
        _core.Backend("cpu").matmul(x, np.zeros(0, np.uint8), "f32", 2**62, 32)
    assert _core.matmul(np.zeros((0, 32), np.float32), np.zeros((3, 34), np.uint8), "q8_0", 3, 32).shape == (0, 3)


def test_backend_zero_size_arrays_with_huge_extents():
    b = _core.Backend("cpu")
    q = np.zeros((1, 2**40, 0), np.float32)  # zero bytes, but int(2**40) narrowed to 0 heads
    with pytest.raises(ValueError, match="n_head"):
        b.attention(q, q, q, 1.0)
    with pytest.raises(ValueError, match="n_head"):
        b.rope(np.zeros((1, 2**33, 0), np.float32), np.array([0]), np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="pos values must lie in"):
        b.rope(np.zeros((1, 1, 2), np.float32), np.array([2**31]), np.ones(1, np.float32))
    with pytest.raises(ValueError, match="at least one key"):
        b.attention(np.zeros((1, 1, 2), np.float32), np.zeros((0, 1, 2), np.float32), np.zeros((0, 1, 2), np.float32), 1.0)


# ------------------------------------------------------------------ thread pool
def test_set_num_threads_while_kernels_run_is_safe():
    # Resizing destroyed the pool under kernels running in other threads: a hang (deadlock)
    # or a use-after-free. Now it resizes in place between loops; results stay exact.
    res = _run_child("""
        import threading, numpy as np
        from mllama_q import _core, quants
        rng = np.random.default_rng(0)
        x = rng.standard_normal((64, 1024)).astype(np.float32)
        w = quants.quantize(rng.standard_normal((256, 1024)).astype(np.float32), "q8_0")
        ref = _core.matmul(x, w, "q8_0", 256, 1024)
        b = _core.Backend("cpu")
        stop, bad = False, []
        def work(f):
            while not stop:
                if not np.array_equal(f(), ref):
                    bad.append(1)
        ts = [threading.Thread(target=work, args=(lambda: _core.matmul(x, w, "q8_0", 256, 1024),)),
              threading.Thread(target=work, args=(lambda: b.matmul(x, w, "q8_0", 256, 1024),))]
        for t in ts: t.start()
        for i in range(300):
            _core.set_num_threads(1 + i % 4)
        stop = True
        for t in ts: t.join()
        print("done", len(bad), _core.num_threads())
    """, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["done", "0", "4"]


def test_set_num_threads_bounds():
    n = _core.num_threads()
    with pytest.raises(ValueError, match="1024"):
        _core.set_num_threads(100000)
    assert _core.num_threads() == n
