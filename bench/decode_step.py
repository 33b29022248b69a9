"""Decoder step timings (developer script; run under the bench lock, record `uptime`).

    PYTHONPATH=. python bench/decode_step.py steps  [--model F.gguf] [--sessions 1,4] [--iters 10] [--rounds 2]
    PYTHONPATH=. python bench/decode_step.py routes [--iters 5]

steps   median wall time of one batched decode step (`core.step`, one token for each of N
        sequences, greedy sampling on the device side) for each N, alternated `--rounds`
        times; no scheduler or streaming around it (what `mllama-q bench --sessions` adds
        to it is the Python side). Default model: the cached synthetic 11B q4_k_m. Prints the
        build's decode prefetch distance (`_core.w_prefetch_bytes()`): a sweep builds the core
        with -DCMAKE_CXX_FLAGS=-DMQ_WPF=<bytes> into separate trees and runs this in each.
routes  the two matmul routes of a decoder step (csrc/cpu/matmul.h Route) on the 11B's
        shapes with random weights: a 64-row prompt chunk plus d decode rows as one panel
        call (the old regime) against panel + tiles (each row by its class), and d >= 16
        decode rows on the tiles against the panel.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _steps(args) -> None:
    from mllama_q import Model, _core
    from mllama_q.cli.synthetic import cached_synthetic

    path = args.model or str(cached_synthetic("11b", "q4_k_m"))
    sizes = [int(s) for s in args.sessions.split(",")]
    m = Model(path, n_ctx=512, max_sessions=max(sizes), vision=False)
    core = m._core
    rng = np.random.default_rng(0)
    for s in range(max(sizes)):
        core.step([(s, rng.integers(1, 1000, 16).astype(np.int32), None, 0, None, False)])
    greedy = (0.0, 0, 1.0, 0.0, 1.0, 0.0)
    res: dict[int, list[float]] = {}
    for _ in range(args.rounds):
        for n in sizes:
            ts = []
            for _ in range(args.iters):
                e = [(s, np.int32([int(rng.integers(1, 1000))]), None, 0, greedy, True) for s in range(n)]
                t0 = time.perf_counter()
                core.step(e)
                ts.append(time.perf_counter() - t0)
            res.setdefault(n, []).append(float(np.median(ts)) * 1e3)
    load = os.getloadavg()[0]
    print(f"{path}: cpu path {_core.cpu_path()}, decode prefetch {_core.w_prefetch_bytes()} B, load {load:.2f}")
    for n in sizes:
        print(f"  {n} sequence(s): step " + ", ".join(f"{t:.1f}" for t in res[n]) + " ms (median per round)")
    m.close()


def _routes(args) -> None:
    from test_matmul import random_quant_weights

    from mllama_q import _core

    rng = np.random.default_rng(0)

    def t(w, wt, n, k, m, route):
        x = rng.standard_normal((m, k)).astype(np.float32)
        return min(_core.bench_matmul(x, w, wt, n, k, args.iters, route=route)) * 1e3

    print(f"cpu path {_core.cpu_path()}, ms per call (best of {args.iters})")
    for wt, n, k in [("q4_k", 14336, 4096), ("q4_k", 4096, 4096), ("q6_k", 4096, 14336)]:
        w = random_quant_weights(rng, wt, n, k)
        for d in (1, 3, 8):
            one, split = t(w, wt, n, k, 64 + d, "auto"), t(w, wt, n, k, 64, "panel") + t(w, wt, n, k, d, "tiles")
            what = f"{wt} {n}x{k} 64 prompt + {d} decode rows"
            print(f"  {what}: one panel {one:.1f}, panel + tiles {split:.1f} ({split / one:.2f}x)")
        for d in (16, 32):
            tiles, panel = t(w, wt, n, k, d, "tiles"), t(w, wt, n, k, d, "panel")
            print(f"  {wt} {n}x{k} {d} decode rows: tiles {tiles:.1f}, panel {panel:.1f} ({tiles / panel:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["steps", "routes"])
    p.add_argument("--model", help="GGUF file (steps; default: the cached synthetic 11B q4_k_m)")
    p.add_argument("--sessions", default="1,4", help="sequences per step, comma-separated (steps)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="times the sizes are alternated (steps)")
    args = p.parse_args()
    _steps(args) if args.mode == "steps" else _routes(args)


if __name__ == "__main__":
    main()
