"""Benchmark: many-query attention of the 11B vision tower on the CPU backend.

    PYTHONPATH=. python bench/attn_vision.py [--iters 1] [--threads N] [--full]
        [--path auto|scalar|avx2|avxvnni|avx512|amx]

16 heads of 80 (no GQA), F32 K/V as the vision encoder has them. Shapes:
nq = 512 and (with --full) nq = 6432 queries against nk = 6432 keys (one
4-tile image: 4 x 1608 patches). Times the CPU backend's attention() through
_core.bench_attention (arrays in place): the fused flash kernel
(csrc/cpu/attention_flash.cpp), in GFLOP/s counting 4 * nq * nk * hd * heads
FLOP. (bench/results/attn_vision.txt also has the former two-matrix-product
path, since removed.)
"""

from __future__ import annotations

import argparse

import numpy as np

from mllama_q import _core


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="thread pool size (0: default)")
    ap.add_argument("--path", default="auto", help="CPU kernel path: auto, scalar, avx2, avxvnni, avx512, amx")
    ap.add_argument("--full", action="store_true", help="also nq = 6432")
    args = ap.parse_args()
    _core.set_cpu_path(args.path)
    if args.threads:
        _core.set_num_threads(args.threads)
    heads, hd, nk = 16, 80, 6432
    rng = np.random.default_rng(0)
    print(f"cpu path {_core.cpu_path()}, {_core.num_threads()} threads")
    print(f"{'nq x nk':>12} | {'s':>8} {'GFLOP/s':>8}")
    for nq in [512] + ([6432] if args.full else []):
        q = rng.standard_normal((nq, heads, hd)).astype(np.float32)
        k = rng.standard_normal((nk, heads, hd)).astype(np.float32)
        v = rng.standard_normal((nk, heads, hd)).astype(np.float32)
        flop = 4.0 * nq * nk * hd * heads
        t = _core.bench_attention(q, k, v, hd**-0.5, args.iters)
        print(f"{nq:>5} x {nk:<5} | {t:8.3f} {flop / t / 1e9:8.1f}")


if __name__ == "__main__":
    main()
