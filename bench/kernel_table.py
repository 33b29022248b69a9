"""Markdown table from `mllama-q bench kernels [--peer] --json out.json` results, for a dated
summary in bench/results/ (bench/README.md: the raw JSON is not kept).

    python bench/kernel_table.py out.json [more.json ...]

Every number the JSON holds per case is kept: best and median time of ours and of the peer
(llama.cpp), GFLOP/s and weight GB/s of our best time, the peer's weight buffer.
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    lines = [
        f"{d['cpu']}, {d['threads']} thread(s), kernel path {d['path']}, "
        f"measured read bandwidth {d['read_bandwidth_gbs']:.1f} GB/s",
        "",
        "| type | N x K | M | mllama-q ms (median) | GFLOP/s | W GB/s | llama.cpp ms (median) | speedup "
        "| peer W buffer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in d["results"]:
        ours = f"{r['best_ms']:.3f} ({r['median_ms']:.3f})"
        peer = r.get("peer_best_ms")
        if peer:
            theirs = (
                f"{peer:.3f} ({r['peer_median_ms']:.3f}) | {peer / r['best_ms']:.2f}x | {r.get('peer_buffer') or '-'}"
            )
        else:
            theirs = "- | - | -"
        lines.append(
            f"| {r['type']} | {r['n']}x{r['k']} | {r['m']} | {ours} | {r['gflops']:.0f} | "
            f"{r['weight_gbs']:.1f} | {theirs} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(p) for p in sys.argv[1:]))
