"""Vision encode CPU time with F16 vs Q8_0 vision weights, on the 11B vision widths with 4 local + 1
global layers and a tiny text model: the per-layer cost ratio of the full tower (developer script;
writes two synthetic GGUFs, ~0.6 GB, into DIR).

    PYTHONPATH=. python bench/vision_f16_vs_q8.py DIR            # MLLAMA_Q_CPU_PATH=avx2 for that path
"""

import json
import os
import sys
import time

import numpy as np

from mllama_q.cli.synthetic import SynthConfig, write_synthetic_gguf

DIR = sys.argv[1]
cfg = SynthConfig(
    "vision-small",
    vocab_size=1024,
    hidden=4096,
    intermediate=512,
    n_layer=2,
    cross_layers=[1],
    n_head=32,
    n_head_kv=8,
    v_layers=4,
    v_global_layers=1,
    v_intermediate_indices=[1, 2, 3],
)
out = {}
for vt in ("f16", "q8_0"):
    p = os.path.join(DIR, f"vision-small-{vt}.gguf")
    if not os.path.exists(p):
        write_synthetic_gguf(p, cfg, "q4_k_m", vision_type=vt, progress=False)
import mllama_q  # noqa: E402

path = os.environ.get("MLLAMA_Q_CPU_PATH", "best")
for _rep in range(2):
    for vt in ("f16", "q8_0"):
        m = mllama_q.Model(os.path.join(DIR, f"vision-small-{vt}.gguf"), n_threads=2)
        T = 560
        px = np.random.default_rng(0).standard_normal((1, 1, 4, 3, T, T)).astype(np.float32)
        m.encode_images(px * 0, np.array([[6]]), np.ones((1, 1, 4), np.int64))  # warm-up (uploads)
        w, c = time.perf_counter(), time.process_time()
        m.encode_images(px, np.array([[6]]), np.ones((1, 1, 4), np.int64))
        out.setdefault(vt, []).append((time.perf_counter() - w, time.process_time() - c))
        del m
print(json.dumps({"cpu_path": path, "loadavg": os.getloadavg()[0], "encode_wall_cpu": out}))
