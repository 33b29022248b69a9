"""Benchmark: `Model()` load time on the synthetic 11B q4_k_m, warm page cache.

    python bench/load_time.py [--model PATH] [--real-tokenizer] [--runs 5] [--keep] [--workdir DIR]

Each run is a fresh Python process (`import mllama_q.model` done before the clock starts) that
times `Model(path, vision=False)` or `Model(path, vision=True)`: wall time, the process's
peak-RSS growth, and its CPU time (on a shared 2-core machine the CPU time is the figure other jobs do not inflate;
loading is single-threaded). The file is read once before (`cat > /dev/null`) so the page
cache is warm, as the target (< 2 s) asks.

--real-tokenizer measures what a converted checkpoint costs: the synthetic 11B's tokenizer
(128,257 tokens, 127,744 filler merges) is replaced by the real Llama 3.2 Vision tokenizer
(128,257 tokens, 280,147 merges, the converter's own tokenizer metadata written from
tests/real_tokenizer.py, a test helper: needs llama-models + transformers). The file is built
once in --workdir (default: the git-ignored build-bench/): metadata and tensor table written
by gguf-py, then the tensor data copied unchanged from the synthetic file by copy_file_range
(the data section's layout does not depend on the metadata, only its start does). Deleted
after the run unless --keep.

Run it under the bench lock: `flock /work/locks/bench.lock python bench/load_time.py ...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import resource, sys, time
import mllama_q.model
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t, c = time.perf_counter(), time.process_time()
m = mllama_q.model.Model(sys.argv[1], vision=sys.argv[2] == "1")
wall, cpu = time.perf_counter() - t, time.process_time() - c
print(wall, cpu, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
"""


def build_real_tokenizer_file(src: Path, dst: Path) -> Path:
    """src's tensors and non-tokenizer metadata + the real Llama 3.2 Vision tokenizer metadata."""
    import gguf

    sys.path.insert(0, str(ROOT / "tests"))
    from mllama_q.convert.tokenizer import add_tokenizer_metadata

    from real_tokenizer import cached_llama32_vision_tokenizer

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith(("GGUF.", "tokenizer.")) or key in ("general.architecture", "general.alignment"):
            continue
        vt = f.types[0]
        w.add_key_value(key, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    add_tokenizer_metadata(w, cached_llama32_vision_tokenizer())
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w.add_tensor_info(t.name, shape, gguf.np.dtype(gguf.np.float32), int(t.n_bytes), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    w.write_padding(f, f.tell())
    f.flush()
    start = f.tell()
    first = min(int(t.data_offset) for t in r.tensors)
    end = os.path.getsize(src)
    with open(src, "rb") as fi:
        left, pos = end - first, first
        while left:
            n = os.copy_file_range(fi.fileno(), f.fileno(), left, pos, start + (pos - first))
            if n <= 0:
                raise OSError("copy_file_range made no progress")
            pos += n
            left -= n
    w.tensors[0].clear()
    w.close()
    del r
    check = gguf.GGUFReader(str(dst))
    src_rel = {t.name: int(t.data_offset) - first for t in gguf.GGUFReader(str(src)).tensors}
    for t in check.tensors:  # same relative layout: every tensor's bytes are the source's
        if int(t.data_offset) - start != src_rel[t.name]:
            raise RuntimeError(f"tensor {t.name} moved inside the data section")
    return dst


def time_load(path: Path, vision: bool, runs: int) -> list[tuple[float, float, float]]:
    """[(wall s, CPU s, peak RSS growth MiB)] of `runs` fresh processes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = []
    for _ in range(runs):
        p = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), "1" if vision else "0"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        out.append(tuple(float(x) for x in p.stdout.strip().splitlines()[-1].split()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the cached synthetic 11B q4_k_m")
    ap.add_argument("--real-tokenizer", action="store_true", help="measure with the real Llama 3 tokenizer")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the real-tokenizer file for the next run")
    ap.add_argument("--workdir", default=str(ROOT / "build-bench"), help="where the real-tokenizer file goes")
    args = ap.parse_args(argv)
    from mllama_q.cli.synthetic import cached_synthetic

    path = Path(args.model) if args.model else cached_synthetic("11b", "q4_k_m")
    built = None
    if args.real_tokenizer:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        built = Path(args.workdir) / f"load-bench-realtok-{path.stem}.gguf"
        if not built.is_file():
            t = time.perf_counter()
            build_real_tokenizer_file(path, built)
            print(f"built {built} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        path = built
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    print(f"file: {path} ({path.stat().st_size / 1e9:.2f} GB); load average {os.getloadavg()[0]:.2f}")
    try:
        for vision in (False, True):
            ts = time_load(path, vision, args.runs)
            wall, cpu, rss = ([t[i] for t in ts] for i in range(3))
            print(
                f"Model(vision={vision}): wall median {statistics.median(wall):.2f} s, min {min(wall):.2f} s; "
                f"CPU median {statistics.median(cpu):.2f} s, min {min(cpu):.2f} s; peak RSS +{max(rss):.0f} MiB "
                f"(wall/CPU: {', '.join(f'{w:.2f}/{c:.2f}' for w, c, _ in ts)})"
            )
    finally:
        if built is not None and not args.keep:
            built.unlink(missing_ok=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
