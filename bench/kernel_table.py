"""Markdown table from `python -m mllama_q.bench kernels --peer --json out.json` results.

    python bench/kernel_table.py out.json [more.json ...]
"""
from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    d = json.load(open(path))
    lines = [
        f"`{path}`: {d['cpu']}, {d['threads']} thread(s), path {d['path']}, "
        f"measured read bandwidth {d['read_bandwidth_gbs']:.1f} GB/s",
        "",
        "| type | N x K | M | mllama-q ms | GFLOP/s | W GB/s | llama.cpp ms | speedup |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in d["results"]:
        peer = r.get("peer_best_ms")
        lines.append(
            f"| {r['type']} | {r['n']}x{r['k']} | {r['m']} | {r['best_ms']:.3f} | {r['gflops']:.0f} | "
            f"{r['weight_gbs']:.1f} | {peer:.3f} | {peer / r['best_ms']:.2f}x |" if peer else
            f"| {r['type']} | {r['n']}x{r['k']} | {r['m']} | {r['best_ms']:.3f} | {r['gflops']:.0f} | "
            f"{r['weight_gbs']:.1f} | - | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(p) for p in sys.argv[1:]))
