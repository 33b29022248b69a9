"""Benchmarks: `mllama-q bench kernels ...` (this file) and model speed
(`mllama-q bench <anything else>`, delegated to mllama_q.cli.bench_model).

    python -m mllama_q.cli.bench kernels [--threads N] [--types q4_k,q6_k] [--shapes 4096x4096]
                                     [--m 1,512] [--quick] [--json out.json] [--peer]

For every weight type and 11B shape (N x K, rows x columns of W) it times
Y = X · Wᵀ for M = 1 (decode) and M = 512 (prefill) and prints the time,
GFLOP/s (2·M·N·K per call) and the effective weight-read rate (bytes of W per
second), beside the machine's read bandwidth measured by the extension
(all threads summing a large buffer, best of several passes).

Weights are random VALID blocks (random quant bytes, fixed normal fp16
scales): the kernels' speed does not depend on the values, and no time or
memory goes into quantizing 500M values. Times are the best (and median) of
several calls made from C++ (no Python in the timed loop).

--peer also runs llama.cpp's ggml_mul_mat on the same cases through
bench/run_ggml_peer.sh (needs ggml headers and libraries; see that script) and
prints the ratio. It is a comparison tool only, never a dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

SHAPES_11B = ["4096x4096", "1024x4096", "14336x4096", "4096x14336", "128256x4096"]
ALL_TYPES = ["q4_k", "q6_k", "q8_0", "f16", "bf16", "f32"]
# --peer's runner, in the source tree's bench/ (developer scripts; not part of the wheel)
PEER_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "run_ggml_peer.sh"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def random_weights(rng: np.random.Generator, wtype: str, n: int, k: int) -> np.ndarray:
    """[n, row_bytes] uint8 of valid `wtype` rows: random bytes, scale fields set to 1e-3."""
    from mllama_q import quants

    info = quants.type_info()[wtype]
    row = quants.row_bytes(wtype, k)
    if wtype in ("f32", "f16", "bf16"):
        f = rng.standard_normal(n * k, dtype=np.float32)
        if wtype == "f32":
            return f.view(np.uint8).reshape(n, row)
        if wtype == "f16":
            return f.astype(np.float16).view(np.uint8).reshape(n, row)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n, row)
    ts = info["type_size"]
    raw = np.frombuffer(rng.bytes(n * row), dtype=np.uint8).reshape(-1, ts).copy()
    d = np.frombuffer(np.float16(1e-3).tobytes(), dtype=np.uint8)
    if wtype == "q6_k":
        raw[:, ts - 2 :] = d  # d is the last field
    else:
        raw[:, 0:2] = d  # q8_0: d; q4_k: d then dmin
        if wtype == "q4_k":
            raw[:, 2:4] = d
    return raw.reshape(n, row)


def _parse_shapes(s: str):
    out = []
    for item in s.split(","):
        try:
            n, k = item.lower().split("x")
            out.append((int(n), int(k)))
        except ValueError:
            raise SystemExit(f"bad shape {item!r}: expected NxK, e.g. 4096x14336") from None
    return out


def run_peer(args, types, shapes, ms):
    """Run bench/run_ggml_peer.sh; returns {(type, n, k, m): (best_ms, median_ms, buffer)} or None."""
    script = PEER_SCRIPT
    if not script.exists():
        print(f"--peer: {script} not found (it lives in the source tree, not the installed package)")
        return None
    cmd = [
        str(script),
        "--threads",
        str(args.threads),
        "--types",
        ",".join(types),
        "--shapes",
        ",".join(f"{n}x{k}" for n, k in shapes),
        "--m",
        ",".join(map(str, ms)),
        "--iters-m1",
        str(args.iters_m1),
        "--iters-big",
        str(args.iters_big),
    ]
    if args.cpu_time:
        cmd.append("--cpu-time")
    env = dict(os.environ)
    if args.peer_lib:
        env["GGML_LIB"] = args.peer_lib
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if not getattr(run_peer, "_announced", False):
        run_peer._announced = True
        print(f"llama.cpp peer: {' '.join(cmd)}" + (f" (GGML_LIB={args.peer_lib})" if args.peer_lib else ""))
        for line in res.stderr.splitlines():
            if line.startswith("ggml peer"):
                print("  " + line)
    for line in res.stderr.splitlines():
        if line.startswith("WARNING"):
            print("  peer " + line)
    if res.returncode != 0:
        print(f"--peer failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
        return None
    out = {}
    for line in res.stdout.splitlines():
        p = line.split()
        if len(p) >= 6:
            out[(p[0], int(p[1]), int(p[2]), int(p[3]))] = (float(p[4]), float(p[5]), p[6] if len(p) > 6 else "")
    return out


def bench_kernels(argv) -> int:
    ap = argparse.ArgumentParser(prog="mllama-q bench kernels", description="CPU matmul kernel benchmark")
    ap.add_argument("--threads", type=int, default=0, help="threads (default: all available CPUs)")
    ap.add_argument("--types", default=",".join(ALL_TYPES), help="comma list of weight types")
    ap.add_argument("--shapes", default=",".join(SHAPES_11B), help="comma list of NxK weight shapes")
    ap.add_argument("--m", default="1,512", help="comma list of X row counts M")
    ap.add_argument("--quick", action="store_true", help="two small shapes, fewer repetitions")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument(
        "--max-weight-gib",
        type=float,
        default=0.5,
        help="skip F32 weights larger than this (default 0.5: F32 only on the smaller shapes)",
    )
    ap.add_argument("--iters-m1", type=int, default=50)
    ap.add_argument("--iters-big", type=int, default=3)
    ap.add_argument("--bw-gib", type=float, default=1.0, help="buffer size of the bandwidth probe")
    ap.add_argument("--path", default="auto", help="force a kernel path (auto, scalar, avx2, avxvnni, avx512, amx)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU time instead of wall time (use with --threads 1 on a busy machine)",
    )
    ap.add_argument("--peer", action="store_true", help="also time llama.cpp (bench/run_ggml_peer.sh)")
    ap.add_argument("--peer-lib", default="", help="directory of the ggml libraries for --peer")
    args = ap.parse_args(argv)

    from mllama_q import _core

    if args.quick:
        args.shapes = "4096x4096,1024x4096" if args.shapes == ",".join(SHAPES_11B) else args.shapes
        args.iters_m1, args.iters_big = min(args.iters_m1, 20), min(args.iters_big, 2)
        args.bw_gib = min(args.bw_gib, 0.25)
    if args.threads > 0:
        _core.set_num_threads(args.threads)
    args.threads = _core.num_threads()
    _core.set_cpu_path(args.path)
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    for t in types:
        if t not in ALL_TYPES:
            raise SystemExit(f"unknown type {t!r}; expected some of {','.join(ALL_TYPES)}")
    shapes = _parse_shapes(args.shapes)
    ms = [int(m) for m in args.m.split(",")]

    bw = _core.measure_read_bandwidth(args.bw_gib, 5)
    print(f"CPU: {_cpu_name()}  threads: {args.threads}  kernel path: {_core.cpu_path()}")
    print(f"measured memory read bandwidth: {bw / 1e9:.1f} GB/s ({args.bw_gib:g} GiB buffer, all threads, best of 5)")
    if args.cpu_time:
        print("timing: process CPU time per call (not wall time)")
    print(
        "weights: random valid blocks; time = best of "
        f"{args.iters_m1} (M=1) / {args.iters_big} (M>1) calls, median in brackets"
    )
    print("GB/s = bytes of W / time (above the DRAM figure means W was partly in the 32 MiB L3)")

    # The peer runs type by type just before ours, so both see similar machine load.
    peer = {} if args.peer else None

    hdr = f"{'type':<5} {'N x K':>13} {'M':>4} {'ms':>9} {'(median)':>10} {'GFLOP/s':>8} {'W GB/s':>7} {'%BW':>5}"
    if peer is not None:
        hdr += f" {'llama.cpp ms':>12} {'speedup':>7}"
    print(hdr)
    results = []
    rng = np.random.default_rng(0)
    for t in types:
        if peer is not None:
            peer_shapes = [(n, k) for n, k in shapes if not (t == "f32" and n * k * 4 > args.max_weight_gib * 2**30)]
            got = run_peer(args, [t], peer_shapes, ms) if peer_shapes else {}
            peer.update(got or {})
        for n, k in shapes:
            wbytes = n * k * {"f32": 4, "f16": 2, "bf16": 2}.get(t, 0)
            if t == "f32" and wbytes > args.max_weight_gib * 2**30:
                print(
                    f"{t:<5} {f'{n}x{k}':>13}    - skipped: {wbytes / 2**30:.1f} GiB of F32 weights "
                    f"(> --max-weight-gib {args.max_weight_gib:g})"
                )
                continue
            w = random_weights(rng, t, n, k)
            for m in ms:
                x = rng.standard_normal((m, k), dtype=np.float32)
                iters = args.iters_m1 if m == 1 else args.iters_big
                _core.bench_matmul(x, w, t, n, k, 1)  # warm-up (page faults, caches)
                times = _core.bench_matmul(x, w, t, n, k, iters, args.cpu_time)
                best, med = min(times), statistics.median(times)
                rec = {
                    "type": t,
                    "n": n,
                    "k": k,
                    "m": m,
                    "best_ms": best * 1e3,
                    "median_ms": med * 1e3,
                    "gflops": 2.0 * m * n * k / best / 1e9,
                    "weight_gbs": w.nbytes / best / 1e9,
                    "weight_bytes": int(w.nbytes),
                }
                line = (
                    f"{t:<5} {f'{n}x{k}':>13} {m:>4} {best * 1e3:>9.3f} {f'({med * 1e3:.3f})':>10} "
                    f"{rec['gflops']:>8.1f} {rec['weight_gbs']:>7.1f} {100 * w.nbytes / best / bw:>4.0f}%"
                )
                if peer is not None:
                    p = peer.get((t, n, k, m))
                    if p:
                        rec["peer_best_ms"], rec["peer_median_ms"], rec["peer_buffer"] = p
                        line += f" {p[0]:>12.3f} {p[0] / (best * 1e3):>6.2f}x"
                print(line, flush=True)
                results.append(rec)
            del w
    if args.json:
        out = {
            "cpu": _cpu_name(),
            "threads": args.threads,
            "path": _core.cpu_path(),
            "read_bandwidth_gbs": bw / 1e9,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "kernels":
        return bench_kernels(argv[1:])
    # everything else, --help included, is the model benchmark (its help names 'bench kernels')
    from mllama_q.cli import bench_model

    return int(bench_model.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
