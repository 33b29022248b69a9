"""Benchmark: decode attention of the 11B text decoder on the CPU backend.

    PYTHONPATH=. python bench/attn_decode.py [--iters 20] [--threads N] [--path scalar|avx2|avxvnni|avx512|amx]

One query (nq = 1), 32 query heads over 8 KV heads of 128 (Llama 3.2 11B),
F16 K/V as the KV cache holds them: self-attention over nk = 512, 2048, 4096
cached tokens and cross-attention over nk = 6404 image keys (4 tiles x 1601).
For each shape, times the CPU backend's attention() (through
_core.bench_attention: the arrays in place, no Python in the loop) with the
direct flash-decoding path (csrc/cpu/attention.cpp) and with the many-query
flash kernel (csrc/cpu/attention_flash.cpp, MLLAMA_Q_ATTN_DIRECT=0; older
results compared with a conversion + matrix-product path, since removed), and
reports the time per call and the K/V bytes read per second (2 * nk * 8 * 128 * 2 bytes
per call). The machine's read bandwidth (measure_read_bandwidth) is printed
for context.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from mllama_q import _core


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="thread pool size (0: default)")
    ap.add_argument("--path", default="auto", help="CPU kernel path: auto, scalar, avx2, avxvnni, avx512, amx")
    args = ap.parse_args()
    _core.set_cpu_path(args.path)
    if args.threads:
        _core.set_num_threads(args.threads)
    n_head, n_kv, hd = 32, 8, 128
    rng = np.random.default_rng(0)
    print(
        f"cpu path {_core.cpu_path()}, {_core.num_threads()} threads, "
        f"read bandwidth {_core.measure_read_bandwidth(0.5, 3) / 1e9:.1f} GB/s"
    )
    print(f"{'shape':>14} {'KV MB':>7} | {'flash ms':>8} {'GB/s':>8} | {'direct ms':>9} {'GB/s':>8} | speed-up")
    for name, nk in [("self 512", 512), ("self 2048", 2048), ("self 4096", 4096), ("cross 6404", 6404)]:
        q = rng.standard_normal((1, n_head, hd)).astype(np.float32)
        k = (rng.standard_normal((nk, n_kv, hd)) * 0.5).astype(np.float16)
        v = rng.standard_normal((nk, n_kv, hd)).astype(np.float16)
        kv_bytes = k.nbytes + v.nbytes
        times = {}
        for label, flag in [("flash", "0"), ("direct", "1")]:
            os.environ["MLLAMA_Q_ATTN_DIRECT"] = flag
            times[label] = _core.bench_attention(q, k, v, hd**-0.5, args.iters)
        os.environ.pop("MLLAMA_Q_ATTN_DIRECT")
        fl, di = times["flash"], times["direct"]
        print(
            f"{name:>14} {kv_bytes / 1e6:7.1f} | {fl * 1e3:8.3f} {kv_bytes / fl / 1e9:8.1f} | "
            f"{di * 1e3:9.3f} {kv_bytes / di / 1e9:8.1f} | {fl / di:6.1f}x"
        )


if __name__ == "__main__":
    main()
