"""An Ollama one-file blob against mllama-q's own file of the same text weights (developer script).

    python bench/ollama_vs_ours.py OURS.gguf OLLAMA.gguf [--threads 2] [--tiles 4] [--n-gen 16] [--skip-encode]

For each file, alternately: a warm load (the file read once before, so the page cache holds it;
the second load is timed) with the time spent in mllama_q.ollama's detection / transforms
measured apart, one image encode (a random --tiles-tile image), a 32-token prefill and
--n-gen decode steps. Wall AND process CPU time are reported: on a shared machine the CPU time
of a phase is the steadier figure (other processes stretch wall time, not CPU time), so the
ratios are taken on it. Prints one JSON object. Make the Ollama blob with bench/ollama_blob.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def measure(path, args) -> dict:
    import mllama_q
    from mllama_q import ollama

    spent = {"ollama_layout_s": 0.0}
    for name in ("detect_layout", "apply_layout", "frontend"):
        orig = getattr(ollama, name)

        def wrapped(*a, _orig=orig, **k):
            t = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                spent["ollama_layout_s"] += time.perf_counter() - t

        setattr(ollama, name, wrapped)
    warnings.simplefilter("ignore", ollama.OllamaLayoutWarning)
    with open(path, "rb") as f:  # warm the page cache
        while f.read(64 << 20):
            pass
    m, _, _ = _timed(lambda: mllama_q.Model(path, n_threads=args.threads))
    del m
    spent["ollama_layout_s"] = 0.0
    m, load_w, load_c = _timed(lambda: mllama_q.Model(path, n_threads=args.threads))
    r = {
        "file": path,
        "layout": m.layout.describe(),
        "file_gb": os.path.getsize(path) / 1e9,
        "load_s": load_w,
        "load_cpu_s": load_c,
        "ollama_layout_s": spent["ollama_layout_s"],
    }
    rng = np.random.default_rng(0)
    T = m.vision_hparams["image_size"]
    grid = {1: (1, 1), 2: (1, 2), 3: (1, 3), 4: (2, 2)}[args.tiles]
    ratios = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    px = np.zeros((1, 1, 4, 3, T, T), np.float32)
    px[0, 0, : args.tiles] = rng.standard_normal((args.tiles, 3, T, T))
    ar_ids = np.array([[ratios.index(grid) + 1]])
    ar_mask = np.zeros((1, 1, 4), np.int64)
    ar_mask[0, 0, : args.tiles] = 1
    img = m.image_token_id
    toks = np.array([m.tokenizer.bos_id, img] + list(range(1000, 1030)), np.int32)
    xmask = np.zeros((len(toks), 1, 4), np.int64)
    xmask[1:, 0, : args.tiles] = 1
    m.reset()
    if not args.skip_encode:
        _, r["encode_s"], r["encode_cpu_s"] = _timed(lambda: m.encode_images(px, ar_ids, ar_mask))
        _, r["prefill_s"], r["prefill_cpu_s"] = _timed(lambda: m.eval(toks, xmask))
    else:
        _, r["prefill_s"], r["prefill_cpu_s"] = _timed(lambda: m.eval(toks))
    t = int(toks[-1])

    def decode():
        nonlocal t
        for _ in range(args.n_gen):
            t = int(np.argmax(m.eval([t])))

    _, dw, dc = _timed(decode)
    r.update(decode_tok_s=args.n_gen / dw, decode_cpu_s_per_tok=dc / args.n_gen)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ours")
    ap.add_argument("theirs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiles", type=int, default=4, choices=(1, 2, 3, 4))
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--skip-encode", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one file per process: the first file's pages and pools do not favour the second
        print(json.dumps(measure(args.child, args)))
        return 0
    import subprocess

    out = {"loadavg_start": os.getloadavg()[0], "runs": []}
    for path in (args.ours, args.theirs):
        cmd = [
            sys.executable,
            __file__,
            args.ours,
            args.theirs,
            "--child",
            path,
            "--threads",
            str(args.threads),
            "--tiles",
            str(args.tiles),
            "--n-gen",
            str(args.n_gen),
        ] + (["--skip-encode"] if args.skip_encode else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out["runs"].append(json.loads(res.stdout.strip().splitlines()[-1]))
    out["loadavg_end"] = os.getloadavg()[0]
    a, b = out["runs"]
    out["ratios_ollama_over_ours_cpu"] = {
        k: b[k] / a[k] for k in ("encode_cpu_s", "prefill_cpu_s", "decode_cpu_s_per_tok", "load_cpu_s") if k in a
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
