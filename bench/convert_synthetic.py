"""Benchmark: convert a synthetic checkpoint with the real Llama-3.2-11B-Vision shapes.

    python bench/convert_synthetic.py WORKDIR [--type q4_k_m] [--keep] [--shards 5]

1. Writes WORKDIR/synthetic-11b/: the published 11B config.json, generation and
   preprocessor configs, the real Llama 3.2 Vision tokenizer when tests/real_tokenizer.py can
   build it (else the tiny test tokenizer), and every weight as random bf16 (N(0, 0.02)) in
   `--shards` safetensors shards + index (~21 GB). Writing is streaming: one reusable 128 MB
   pool of random bf16, so memory stays small. Each shard is fsync'ed and dropped from the
   page cache (posix_fadvise DONTNEED) so the conversion reads it from disk, as a first run would.
2. Converts it with `python -m mllama_q.convert` in a child process; reports wall time, input
   throughput, CPU time and the child's peak RSS (ru_maxrss from wait4).
3. Removes the synthetic checkpoint and the output (unless --keep).

Needs ~35 GB free in WORKDIR (checked first). Targets on the 2-core dev machine:
<= 15 min and <= 4 GiB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The published Llama-3.2-11B-Vision-Instruct configuration (config.json, sizes and conventions).
CONFIG_11B = {
    "architectures": ["MllamaForConditionalGeneration"],
    "image_token_index": 128256,
    "model_type": "mllama",
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "mllama_text_model",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 40,
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
        "torch_dtype": "bfloat16",
    },
    "vision_config": {
        "model_type": "mllama_vision_model",
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_global_layers": 8,
        "attention_heads": 16,
        "hidden_act": "gelu",
        "image_size": 560,
        "patch_size": 14,
        "num_channels": 3,
        "max_num_tiles": 4,
        "norm_eps": 1e-05,
        "intermediate_layers_indices": [3, 7, 15, 23, 30],
        "vision_output_dim": 7680,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        "torch_dtype": "bfloat16",
    },
}
GENERATION = {
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "pad_token_id": 128004,
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.9,
}
PREPROCESSOR = {
    "image_processor_type": "MllamaImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"height": 560, "width": 560},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_pad": True,
    "max_image_tiles": 4,
}

POOL = 64 << 20  # bf16 values in the random pool (128 MB)
PIECE = 16 << 20  # values written per write() call


def hf_tensors(cfg: dict) -> list:
    """[(hub name, shape)] for every tensor of the checkpoint, derived from the converter's plan."""
    from mllama_q.convert.hf import Checkpoint, parse_config
    from mllama_q.convert.plan import build_plan

    text, vision, img = parse_config(cfg, "config.json")
    ck = Checkpoint(
        dir=Path("."), text=text, vision=vision, image_token_id=img, preprocessor={}, generation={}, stop_ids=[]
    )
    seen, out = set(), []
    for o in build_plan(ck):
        if o.src and o.src not in seen:
            seen.add(o.src)
            out.append((o.src, o.shape))
    return out


def write_shard(path: Path, tensors: list, pool: np.ndarray, rng) -> int:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, shape in tensors:
            left = int(np.prod(shape))
            while left:
                n = min(left, PIECE)
                s = int(rng.integers(0, pool.size - n + 1))
                f.write(memoryview(pool[s : s + n]).cast("B"))
                left -= n
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # make the conversion read from disk
    return 8 + len(hb) + off


def write_checkpoint(d: Path, n_shards: int) -> int:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(CONFIG_11B, indent=2))
    (d / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # test helpers
    try:
        from real_tokenizer import write_llama32_vision_tokenizer

        write_llama32_vision_tokenizer(d)
        print("tokenizer: real Llama 3.2 Vision tokenizer (128257 tokens)", file=sys.stderr)
    except Exception as e:  # llama-models / transformers missing: the small test tokenizer does too
        from tiny_models import _save_tokenizer

        _save_tokenizer(d, None, "tokenizer_config")
        print(f"tokenizer: tiny test tokenizer ({e.__class__.__name__}: {e})", file=sys.stderr)

    rng = np.random.default_rng(0)
    pool = np.empty(POOL, np.uint16)
    for i in range(0, POOL, 1 << 22):  # bf16 = top half of float32 N(0, 0.02)
        x = (rng.standard_normal(min(1 << 22, POOL - i), dtype=np.float32) * 0.02).view(np.uint32)
        pool[i : i + x.size] = (x >> 16).astype(np.uint16)
    tensors = hf_tensors(CONFIG_11B)
    total = sum(int(np.prod(s)) * 2 for _, s in tensors)
    shards, cur, acc = [[] for _ in range(n_shards)], 0, 0
    for name, shape in tensors:
        if acc >= (cur + 1) * total / n_shards and cur < n_shards - 1:
            cur += 1
        shards[cur].append((name, shape))
        acc += int(np.prod(shape)) * 2
    weight_map, size = {}, 0
    for i, ts in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        t0 = time.perf_counter()
        size += write_shard(d / fname, ts, pool, rng)
        print(f"wrote {fname}: {len(ts)} tensors in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        weight_map.update({n: fname for n, _ in ts})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the output")
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(a.workdir).free
    if free < 35e9:
        print(f"need ~35 GB free in {a.workdir}, have {free / 1e9:.1f} GB", file=sys.stderr)
        return 1
    ck, out = a.workdir / "synthetic-11b", a.workdir / f"synthetic-11b-{a.type}.gguf"
    try:
        t0 = time.perf_counter()
        size = write_checkpoint(ck, a.shards)
        t_write = time.perf_counter() - t0
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB in {t_write:.1f} s", file=sys.stderr)

        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "mllama_q.convert", str(ck), "-o", str(out), "--type", a.type, "--force"],
            cwd=ROOT,
            env=env,
        )
        _, status, ru = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if child.returncode != 0:
            print(f"conversion failed with exit code {child.returncode}", file=sys.stderr)
            return 1
        import gguf

        r = gguf.GGUFReader(out)  # the file reads back; bytes per storage type
        by_type = {}
        for t in r.tensors:
            by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
        res = {
            "type": a.type,
            "tensors": len(r.tensors),
            "GB_by_type": {k: round(v / 1e9, 3) for k, v in sorted(by_type.items())},
            "loadavg_after": os.getloadavg(),
            "input_GB": round(size / 1e9, 2),
            "output_GB": round(out.stat().st_size / 1e9, 2),
            "wall_s": round(wall, 1),
            "input_GB_per_s": round(size / 1e9 / wall, 3),
            "cpu_user_s": round(ru.ru_utime, 1),
            "cpu_sys_s": round(ru.ru_stime, 1),
            "peak_rss_GiB": round(ru.ru_maxrss * 1024 / 2**30, 3),
            "cpus": os.cpu_count(),
            "checkpoint_write_s": round(t_write, 1),
            "loadavg_before": load_before,
        }
        print(json.dumps(res))
    finally:
        if not a.keep:
            shutil.rmtree(ck, ignore_errors=True)
            if out.exists():
                out.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
