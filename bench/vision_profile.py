"""Profile one image encode (vision tower + projector + cross-attention K/V) op by op.

    PYTHONPATH=. python bench/vision_profile.py [--model F.gguf] [--path auto|avx2|avxvnni|avx512|amx|scalar]
        [--threads 2] [--tiles 4] [--torch] [--json OUT.json] [--markdown]

Runs Model.encode_images once on a synthetic image with the CPU backend's
per-op profiler on (csrc/common/profile.h; `_core.profile_enable`), then prints
one row per (region, op, detail): calls, seconds, share of the encode, GFLOP/s
(matmul and attention: 2 FLOP per multiply-add) and GB/s (bytes read + written,
nominal). Rows named "attention:..." split the attention time into the K/V
packing and the score / softmax / P·V phases of the fused kernel (the threads'
time in each phase, scaled to the wall time of the row tasks). "other" is the
encode's wall time outside every recorded op (Python, allocation, waits).

--cpu-time: one thread and thread CPU time for everything (the profiler's
'thread_cpu' clock, time.thread_time for the encode and torch), so other
processes on a busy machine do not enter; otherwise wall clock.

--torch also times, in the same run and with the same thread count, torch
float32 GEMM on every matmul shape of the profile (X [M, K] · W [K, N], M = the
rows per call) and torch SDPA on the attention shape, and prints what the whole
encode would take at those rates next to ours: the issue-13 target is an encode
rate >= 1.5x torch's float32 GEMM rate on the same shapes.

Default model: the synthetic 11B q4_k_m (vision tower in Q8_0) from mllama-q's cache
($MLLAMA_Q_CACHE, made on first use). On a shared machine run it alone (a lock) and
record `uptime`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllama_q import _core  # noqa: E402


def default_model() -> str:
    """The synthetic 11B q4_k_m (vision tower Q8_0) in mllama-q's cache, generated on first use."""
    from mllama_q.cli.synthetic import cached_synthetic

    return str(cached_synthetic("11b", "q4_k_m"))


def category(e: dict) -> str:
    """The issue-13 grouping of a profile entry."""
    op, region = e["op"], e["region"]
    if op == "matmul":
        if region == "vision.embed":
            return "patch conv (matmul)"
        if region == "projector":
            return "projector (matmul)"
        if region == "cross_kv":
            return "cross-attn K/V (matmul)"
        return "matmul"
    if op.startswith("attention"):
        return "attention"
    if op == "layer_norm":
        return "layer norm"
    if op == "gelu":
        return "GELU"
    if op in ("add", "add_scaled", "bias"):
        return "embeddings" if region == "vision.embed" else "adds / bias"
    if op == "get_rows":
        return "embeddings"
    if op.startswith("im2col"):
        return "im2col"
    if op.startswith("concat"):
        return "projector (concat)"
    if op in ("copy", "store_rows"):
        return "copies"
    return op


def mm_shape(e: dict, m_cap: int) -> tuple[int, int, int]:
    """(M, K, N) for the torch comparison of a matmul entry (detail "type NxK"): M = all
    rows the entry multiplied, capped at m_cap = one image's positions (6432 for the
    11B), i.e. torch gets the whole [S, K] activation in one call where we take
    chunks (the vision MLP runs 1024 rows at a time): never a smaller, slower GEMM
    for torch than the one we ran."""
    n, k = map(int, e["detail"].split()[1].split("x"))
    return min(m_cap, int(round(e["flop"] / (2.0 * n * k)))), k, n


def torch_rates(entries: list[dict], threads: int, m_cap: int, clock, reps: int = 3) -> dict:
    """GFLOP/s of torch float32 GEMM per matmul shape (mm_shape), best of `reps`."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for e in entries:
        if e["op"] != "matmul" or e["calls"] == 0:
            continue
        key = mm_shape(e, m_cap)
        m, k, n = key
        if key in out:
            continue
        x = torch.randn(m, k)
        w = torch.randn(k, n)
        torch.matmul(x, w)
        best = 1e30
        for _ in range(reps):
            t0 = clock()
            torch.matmul(x, w)
            best = min(best, clock() - t0)
        out[key] = 2.0 * m * n * k / best / 1e9
    return out


def torch_sdpa_rate(nq: int, nk: int, heads: int, hd: int, threads: int, clock) -> float:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    q = torch.randn(1, heads, nq, hd)
    k = torch.randn(1, heads, nk, hd)
    v = torch.randn(1, heads, nk, hd)
    F.scaled_dot_product_attention(q[:, :, :64], k, v)  # warm-up
    t0 = clock()
    F.scaled_dot_product_attention(q, k, v)
    s = clock() - t0
    return 4.0 * nq * nk * hd * heads / s / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF file (default: the cached synthetic 11B q4_k_m, made on first use)")
    ap.add_argument(
        "--path", default="auto", help="CPU kernel path (MLLAMA_Q_CPU_PATH): auto, scalar, avx2, avxvnni, avx512, amx"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiles", type=int, default=4, choices=(1, 2, 3, 4))
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread, every time in thread CPU time (ours and torch's): for a busy machine",
    )
    ap.add_argument("--torch", action="store_true", help="also time torch float32 GEMM / SDPA on the same shapes")
    ap.add_argument(
        "--torch-isa",
        choices=("native", "avx2"),
        default="native",
        help="avx2: restrict torch to AVX2 (MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), "
        "for an AVX2-only machine's comparison on an AVX-512 CPU with --path avx2 / avxvnni",
    )
    ap.add_argument("--json", help="write the raw entries and totals here")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = ap.parse_args()
    if args.torch_isa == "avx2":
        # Read by MKL / ATen / oneDNN when torch is first imported (below, in torch_rates).
        assert "torch" not in sys.modules
        os.environ.update(MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")

    from mllama_q.cli.bench_model import _prompt_inputs, synthetic_image, vision_flops
    from mllama_q.model import Model

    args.model = args.model or default_model()
    if args.cpu_time:
        args.threads = 1
    clock = time.thread_time if args.cpu_time else time.perf_counter
    _core.set_cpu_path(args.path)
    load0 = os.getloadavg()[0]
    model = Model(args.model, n_ctx=512, n_threads=args.threads)
    _core.set_cpu_path(args.path)
    image = synthetic_image(args.tiles, 560)
    _, proc, _ = _prompt_inputs(model, 8, image)
    model._core.load_vision()
    _core.profile_reset()
    _core.profile_enable(True, "thread_cpu" if args.cpu_time else "wall")
    t0 = clock()
    model.encode_images(proc["pixel_values"], proc["aspect_ratio_ids"], proc["aspect_ratio_mask"])
    total = clock() - t0
    _core.profile_enable(False)
    entries = _core.profile_report()
    load1 = os.getloadavg()[0]
    flop_total = vision_flops(model.text_hparams, model.vision_hparams, args.tiles)

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.strip()
    head = (
        f"{Path(args.model).name}, path {_core.cpu_path()}, {_core.num_threads()} threads"
        f"{' (thread CPU time)' if args.cpu_time else ' (wall clock)'}, "
        f"{args.tiles} tiles, commit {commit}{'+dirty' if dirty else ''}, load avg {load0:.2f} -> {load1:.2f}"
    )
    print(head)
    print(f"encode: {total:.2f} s, {flop_total / total / 1e9:.1f} GFLOP/s ({flop_total / 1e12:.2f} TFLOP)")

    rec = sum(e["seconds"] for e in entries if ":" not in e["op"])
    md = args.markdown

    def row(cols, widths):
        if md:
            return "| " + " | ".join(str(c) for c in cols) + " |"
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))

    def rate(v, s):
        return f"{v / s / 1e9:.1f}" if v and s > 0 else "-"

    # Per category
    cats = defaultdict(lambda: [0.0, 0.0, 0.0])
    for e in entries:
        if ":" in e["op"]:
            continue
        c = cats[category(e)]
        c[0] += e["seconds"]
        c[1] += e["flop"] if e["op"] in ("matmul", "attention") else 0
        c[2] += e["bytes"]
    cats["other (outside ops)"] = [max(0.0, total - rec), 0.0, 0.0]
    w1 = [28, 9, 7, 9, 8]
    print()
    print(row(["category", "seconds", "share", "GFLOP/s", "GB/s"], w1))
    if md:
        print("| --- | ---: | ---: | ---: | ---: |")
    for name, (s, f, b) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
        print(row([name, f"{s:.3f}", f"{100 * s / total:.1f}%", rate(f, s), rate(b, s)], w1))
    mm_att = sum(v[0] for k, v in cats.items() if "matmul" in k or k == "attention")
    print(f"\nmatmul + attention: {100 * mm_att / total:.1f}% of the encode")

    # Per op and shape
    w2 = [16, 22, 34, 6, 9, 7, 9, 8]
    print()
    print(row(["region", "op", "detail", "calls", "seconds", "share", "GFLOP/s", "GB/s"], w2))
    if md:
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for e in sorted(entries, key=lambda e: -e["seconds"]):
        if e["seconds"] < 1e-4 * total:
            continue
        print(
            row(
                [
                    e["region"] or "-",
                    e["op"],
                    e["detail"] or "-",
                    e["calls"] or "",
                    f"{e['seconds']:.3f}",
                    f"{100 * e['seconds'] / total:.1f}%",
                    rate(e["flop"], e["seconds"]),
                    rate(e["bytes"], e["seconds"]),
                ],
                w2,
            )
        )

    result = {
        "header": head,
        "encode_s": total,
        "flop": flop_total,
        "entries": entries,
        "loadavg": [load0, load1],
        "path": _core.cpu_path(),
        "threads": _core.num_threads(),
    }
    if args.torch:
        vh = model.vision_hparams
        S = vh["max_num_tiles"] * (((vh["image_size"] // vh["patch_size"]) ** 2 + 1 + 7) // 8 * 8)  # positions
        rates = torch_rates(entries, args.threads, S, clock)
        att = [e for e in entries if e["op"] == "attention" and e["calls"]]
        # the vision attention: S x S over all positions, 16 heads of 80 (from the largest entry)
        big = max(att, key=lambda e: e["flop"]) if att else None
        sdpa = 0.0
        if big:
            hm = re.search(r"heads=(\d+)/\d+ hd=(\d+)", big["detail"])
            heads, hd = int(hm.group(1)), int(hm.group(2))
            sdpa = torch_sdpa_rate(S, S, heads, hd, args.threads, clock)
        t_torch = 0.0
        print()
        w3 = [34, 7, 12, 12, 10]
        print(row(["torch float32 (same run)", "M", "torch GFLOP/s", "ours GFLOP/s", "ours/torch"], w3))
        if md:
            print("| --- | ---: | ---: | ---: | ---: |")
        mm_flop, t_mm_torch = 0.0, 0.0
        for e in entries:
            if e["op"] != "matmul" or not e["calls"]:
                continue
            m, k, n = mm_shape(e, S)
            r = rates[(m, k, n)]
            t_torch += e["flop"] / r / 1e9
            t_mm_torch += e["flop"] / r / 1e9
            mm_flop += e["flop"]
            ours = e["flop"] / e["seconds"] / 1e9
            print(row([f"{e['region']} {e['detail']}", m, f"{r:.1f}", f"{ours:.1f}", f"{ours / r:.2f}x"], w3))
        att_flop = sum(e["flop"] for e in att)
        att_s = sum(e["seconds"] for e in att)
        if sdpa:
            t_torch += att_flop / sdpa / 1e9
            print(
                row(
                    [
                        f"attention (SDPA {S}x{S}, {heads}x{hd})",
                        S,
                        f"{sdpa:.1f}",
                        f"{att_flop / att_s / 1e9:.1f}",
                        f"{att_flop / att_s / 1e9 / sdpa:.2f}x",
                    ],
                    w3,
                )
            )
        gemm_rate = mm_flop / t_mm_torch / 1e9
        enc_rate = flop_total / total / 1e9
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        print(f"\ntorch {torch.__version__}, CPU capability {capability}")
        print(f"\ntorch float32 GEMM rate on the encode's matmul shapes (FLOP-weighted): {gemm_rate:.1f} GFLOP/s")
        print(
            f"our encode rate: {enc_rate:.1f} GFLOP/s = {enc_rate / gemm_rate:.2f}x torch's GEMM rate (target >= 1.5x)"
        )
        print(f"the encode at torch's rates (GEMM per shape + SDPA, ops only): {t_torch:.1f} s vs ours {total:.1f} s")
        result.update(
            torch_gemm_rates={f"{m}x{k}x{n}": r for (m, k, n), r in rates.items()},
            torch_sdpa=sdpa,
            torch_gemm_rate=gemm_rate,
            torch_encode_s=t_torch,
            torch_cpu_capability=capability,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
