"""Self-check (`mllama-q demo` until the runtime exists): quantize a random
matrix with every weight format, multiply with the CPU kernels, compare with
a float64 numpy reference and print a small throughput table. Takes a few
seconds; exit code 0 when every available format checks out.

    python -m mllama_q.cli.selfcheck [--threads N] [--path auto|scalar|avx2|avxvnni|avx512|amx]

Checks per format (W: N x K random normal, X: M x K random normal):
  * kernel vs float64 dequantize(W) @ X.T: only the on-the-fly 8-bit
    quantization of X (Q8_K / Q8_0, as ggml) separates them, so the error must
    stay below 3% of the output scale (typically ~0.5%; float formats: 1e-5);
  * the round-trip error of the format itself (W vs dequantize(quantize(W)))
    is printed for information.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

FORMATS = ["f32", "f16", "bf16", "q8_0", "q6_k", "q4_k"]


def _check_one(fmt, rng, n, k, m):
    from mllama_q import _core, quants

    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    t0 = time.perf_counter()
    wq = quants.quantize(w, fmt)
    t_quant = time.perf_counter() - t0
    wd = quants.dequantize(wq, fmt, (n, k)).astype(np.float64)
    y = _core.matmul(x, wq, fmt, n, k)
    ref = x.astype(np.float64) @ wd.T
    scale = np.abs(ref).max()
    err = float(np.abs(y - ref).max() / scale)
    roundtrip = float(np.sqrt(np.mean((wd - w) ** 2)) / np.sqrt(np.mean(w.astype(np.float64) ** 2)))
    limit = 1e-5 if fmt in ("f32", "f16", "bf16") else 3e-2
    # throughput: decode-like (M = 1) and batch (M = 64) on this matrix
    x1 = x[:1].copy()
    t1 = min(_core.bench_matmul(x1, wq, fmt, n, k, 20))
    x64 = rng.standard_normal((64, k)).astype(np.float32)
    t64 = min(_core.bench_matmul(x64, wq, fmt, n, k, 3))
    return {
        "fmt": fmt,
        "ok": err < limit,
        "err": err,
        "limit": limit,
        "roundtrip": roundtrip,
        "quant_s": t_quant,
        "m1_ms": t1 * 1e3,
        "m1_gbs": wq.nbytes / t1 / 1e9,
        "m64_gflops": 2 * 64 * n * k / t64 / 1e9,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mllama-q demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--path", default="auto", help="kernel path: auto, scalar, avx2, avxvnni, avx512, amx")
    ap.add_argument("--n", type=int, default=1024, help="rows of W")
    ap.add_argument("--k", type=int, default=4096, help="columns of W (a multiple of 256)")
    args = ap.parse_args(argv)

    import mllama_q
    from mllama_q import _core

    if args.threads > 0:
        _core.set_num_threads(args.threads)
    _core.set_cpu_path(args.path)
    be = mllama_q.backends()
    print(f"mllama-q {mllama_q.__version__} self-check")
    print(
        f"CPU kernels: path {be['cpu']['active_path']} (available: {', '.join(be['cpu']['paths'])}), "
        f"{be['cpu']['threads']} threads; CUDA built: {be['cuda']['built']}, usable: {be['cuda']['usable']}"
    )
    print(
        f"W: {args.n} x {args.k} random normal, X: 8 x {args.k}; error = max|Y - Y_ref| / max|Y_ref|, "
        "Y_ref = float64 dequantize(W) @ X.T"
    )
    print(
        f"{'format':<6} {'matmul err':>10} {'limit':>7} {'W round-trip':>12} {'quantize s':>10} "
        f"{'M=1 ms':>8} {'W GB/s':>7} {'M=64 GFLOP/s':>12}  result"
    )
    rng = np.random.default_rng(0)
    failed, missing = [], []
    for fmt in FORMATS:
        try:
            r = _check_one(fmt, rng, args.n, args.k, 8)
        except RuntimeError as e:  # a quantizer not built into this version of the core
            if "not implemented" not in str(e):
                raise
            missing.append(fmt)
            print(
                f"{fmt:<6} {'-':>10} {'-':>7} {'-':>12} {'-':>10} {'-':>8} {'-':>7} {'-':>12}  "
                f"SKIPPED: quantizer not available ({e})"
            )
            continue
        status = "ok" if r["ok"] else "FAIL"
        if not r["ok"]:
            failed.append(fmt)
        print(
            f"{fmt:<6} {r['err']:>10.2e} {r['limit']:>7.0e} {r['roundtrip']:>12.2e} {r['quant_s']:>10.3f} "
            f"{r['m1_ms']:>8.3f} {r['m1_gbs']:>7.1f} {r['m64_gflops']:>12.1f}  {status}"
        )
    if failed:
        print(f"self-check FAILED for: {', '.join(failed)}")
        return 1
    if missing:
        print(f"self-check passed for the available formats; missing quantizers: {', '.join(missing)}")
        return 0
    print("self-check passed for all formats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
