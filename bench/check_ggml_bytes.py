#!/usr/bin/env python3
"""Compare mllama-q's quantizers with live ggml, byte for byte (a check script, not a test).

    python bench/check_ggml_bytes.py [--lib path/to/libggml-base.so] [--rows 10000]
                                     [--throughput] [--exhaustive-f16]

For each type (q8_0, q4_k, q6_k, f16, bf16) it builds `--rows` rows of 256
float32 values: the adversarial rows of tools/make_ggml_golden.py (zeros,
constants, spikes, huge / tiny / subnormal magnitudes, ties, fp16 scale edges,
...) followed by random rows of several families and magnitudes (a different
seed than the committed golden data), quantizes them with ggml's
ggml_quantize_chunk (no importance matrix) and with mllama_q on every
quantizer path this CPU has, and prints how many rows are byte-identical.

--throughput   single-thread MB/s of float32 input, ours (each path) and ggml's
               (ggml_quantize_chunk runs on the calling thread), then ours on all threads
--exhaustive-f16  every one of the 2^32 float32 bit patterns through f16 and
               bf16, ours vs ggml (about a minute)

ggml's library: --lib, $MLLAMA_Q_GGML_LIB, or the llama_cpp package (llama-cpp-python built
from source) importable by this Python (tools/make_ggml_golden.py find_ggml_lib); never a
dependency.
Exit status 1 when any row differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("make_ggml_golden", ROOT / "tools" / "make_ggml_golden.py")
G = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(G)

from mllama_q import _core, quants  # noqa: E402


def check_rows(g: "G.Ggml", n_rows: int, seed: int) -> bool:
    ok = True
    paths = _core.quant_paths()
    for t in G.TYPES:
        n_adv = len(G.make_rows(t, seed, 0)[0])
        x, labels = G.make_rows(t, seed, max(n_rows - n_adv, 0))
        want = g.quantize(x, t)
        for p in paths:
            _core.set_quant_path(p)
            got = quants.quantize(x, t)
            bad = np.nonzero((got != want).any(axis=1))[0]
            ok &= bad.size == 0
            print(
                f"{t:5s} path={p:6s}: {len(x) - bad.size}/{len(x)} rows identical to ggml "
                f"({n_adv} adversarial + {len(x) - n_adv} random)"
            )
            for r in bad[:10]:
                print(f"    differs: row {r} ({labels[r]})")
    _core.set_quant_path("auto")
    return ok


def throughput(g: "G.Ggml") -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1024, 4096)) * 0.02).astype(np.float32)  # 16 MiB, weight-like
    mb = x.nbytes / 1e6
    n_threads = _core.num_threads()
    _core.set_num_threads(1)
    try:
        print(f"single-thread throughput, MB/s of float32 input ({x.shape[0]}x{x.shape[1]}, best of 3):")
        for t in G.TYPES:
            cols = []
            for p in _core.quant_paths():
                _core.set_quant_path(p)
                best = min(_timed(lambda: quants.quantize(x, t)) for _ in range(3))
                cols.append(f"ours[{p}] {mb / best:8.1f}")
            best = min(_timed(lambda: g.quantize(x, t)) for _ in range(3))
            cols.append(f"ggml {mb / best:8.1f}")
            print(f"  {t:5s} " + "   ".join(cols))
        _core.set_num_threads(n_threads)
        _core.set_quant_path("auto")
        print(f"all {n_threads} threads, best path ({_core.quant_path()}), MB/s of float32 input:")
        print(
            "  "
            + "   ".join(
                f"{t} {mb / min(_timed(lambda: quants.quantize(x, t)) for _ in range(3)):.1f}" for t in G.TYPES
            )
        )
    finally:
        _core.set_num_threads(n_threads)
        _core.set_quant_path("auto")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def exhaustive_f16(g: "G.Ggml") -> bool:
    ok = True
    chunk = 1 << 24
    bad = {"f16": 0, "bf16": 0}
    for start in range(0, 1 << 32, chunk):
        x = np.arange(start, start + chunk, dtype=np.uint64).astype(np.uint32).view(np.float32).reshape(-1, 4096)
        for t in bad:
            bad[t] += int(np.count_nonzero(quants.quantize(x, t).view(np.uint16) != g.quantize(x, t).view(np.uint16)))
    for t, n in bad.items():
        print(f"{t}: all 2^32 float32 bit patterns, {n} differ from ggml")
        ok &= n == 0
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", help="path to ggml's libggml-base.so")
    ap.add_argument("--rows", type=int, default=10000, help="rows per type (adversarial + random)")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--exhaustive-f16", action="store_true")
    args = ap.parse_args(argv)
    g = G.Ggml(args.lib)
    print(f"ggml: {g.path}\nquantizer paths: {', '.join(_core.quant_paths())}")
    ok = check_rows(g, args.rows, args.seed)
    if args.exhaustive_f16:
        ok &= exhaustive_f16(g)
    if args.throughput:
        throughput(g)
    print("ALL IDENTICAL" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
