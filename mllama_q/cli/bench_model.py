"""`mllama-q bench`: model speed (load, image encode, prefill, decode, memory).

    mllama-q bench -m MODEL.gguf | --synthetic 11b|90b|tiny [--type q4_k_m] [--device cpu|cuda[:N]]
                   [--threads N] [--n-prompt 32] [--n-gen 32] [--image PATH | --tiles 4]
                   [--n-ctx 4096] [--cache-dir DIR] [--json]

What is measured (one sequence, greedy):
  load            Model(path) construction (GGUF parse + weight upload/mapping)
  image encode    model.encode_images on one image (a --tiles-tile synthetic image by default)
  prefill         model.eval on the n_prompt prompt tokens (<|image|> + text), incl. cross-attn
  ttft            image encode + prefill + picking the first token, and nothing else (the FLOP
                  count and the KV size come from the hyper-parameters read at load; before
                  2026-12-03 the FLOP count re-opened the GGUF inside this interval, ~15 s with
                  a real tokenizer: see bench/results/2026-11-22-epyc-zen5-2c.md)
  decode          n_gen single-token model.eval calls
  weight-read bandwidth during decode = bytes of the tensors ONE decode step reads / time per
                  token. Counted from the GGUF: every tensor except the vision tower and
                  projector (run once per image), the cross-attention K/V projections (run once
                  per image; their outputs are cached) and token_embd, of which one row is read.
  memory bandwidth  the machine's measured read bandwidth (the extension's
                  measure_read_bandwidth probe, else a numpy multi-threaded sum), for the ratio.
  peak RSS        resource.getrusage max RSS (file-backed mmap pages that were touched count),
                  beside the GGUF size and the KV cache size; peak VRAM for --device cuda.

Sessions and batching (instead of the single-sequence run above):
  --sessions 1,2,4,8   for each N: N sessions in N threads, one text prompt each (--n-prompt
                  tokens), --n-gen tokens each, greedy, all batched by the model's scheduler.
                  Aggregate decode tok/s = tokens streamed by all sessions while every one of
                  them is decoding / the length of that window; and the speed-up over N = 1.
  --chat          a two-turn chat about one image (--tiles, or --image): turn 1 asks about the
                  image, turn 2 is a --follow-up-token question; reports each turn's time to
                  first token (turn 2 prefills only its new tokens and reuses the image's
                  cross-attention K/V), the tokens reused, and their ratio.
  Both report the KV-cache bytes of one session, the cross-attention K/V bytes of one image and
  peak RSS against file size + caches.

The synthetic model (`--synthetic`) is written once into the cache directory
($MLLAMA_Q_CACHE or ~/.cache/mllama-q, or --cache-dir) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mllama_q import gguf_keys as K
from mllama_q.cli.args import check_device, check_min, lower, warn_context
from mllama_q.cli.progress import Progress

TILE_GRIDS = {1: (1, 1), 2: (1, 2), 3: (1, 3), 4: (2, 2)}  # tiles -> (rows, cols) of the canvas


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mllama-q bench",
        description="Benchmark a model (load, image encode, prefill, decode, memory).",
        epilog="'mllama-q bench kernels --help' lists the options of the matmul kernel benchmark.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="GGUF file")
    src.add_argument(
        "--synthetic",
        type=lower,
        choices=("tiny", "11b", "90b"),
        help="generate (once, cached) a synthetic model with real shapes and random weights",
    )
    p.add_argument(
        "--type",
        type=lower,
        default="q4_k_m",
        choices=K.FTYPES,
        help="--synthetic: weight type mix, as mllama-q convert --type (default q4_k_m)",
    )
    p.add_argument("--cache-dir", help="--synthetic: where the generated file is kept")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context length in tokens (4096)")
    p.add_argument("--n-prompt", type=int, default=32, help="prompt tokens, <|image|> included (32)")
    p.add_argument("--n-gen", type=int, default=32, help="decoded tokens (32)")
    img = p.add_mutually_exclusive_group()
    img.add_argument("--image", help="image file (default: a synthetic image of --tiles tiles)")
    img.add_argument(
        "--tiles",
        type=int,
        default=4,
        choices=(0, 1, 2, 3, 4),
        help="tiles of the synthetic image; 0 = text-only prompt (4)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--sessions",
        default=None,
        metavar="N,N,...",
        help="aggregate decode speed of N concurrent sessions, for each N (e.g. 1,2,4,8)",
    )
    mode.add_argument(
        "--chat", action="store_true", help="time to first token of turn 1 and turn 2 of a chat about one image"
    )
    p.add_argument("--follow-up", type=int, default=20, help="--chat: tokens of the second question (20)")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the memory bandwidth probe")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def _check_args(p: argparse.ArgumentParser, args) -> None:
    """Every option before the model file is generated or loaded (argparse error, exit 2)."""
    check_device(p, args.device)
    check_min(p, "--threads", args.threads, 1)
    check_min(p, "--n-prompt", args.n_prompt, 2)
    check_min(p, "--n-gen", args.n_gen, 0)
    if args.sessions is not None:
        try:
            args.sessions = [int(x) for x in args.sessions.split(",") if x.strip()]
        except ValueError:
            p.error(f"--sessions must be a comma-separated list of integers, got {args.sessions!r}")
        if not args.sessions or min(args.sessions) < 1 or max(args.sessions) > 64:
            p.error("--sessions values must be in 1 .. 64")
    check_min(p, "--follow-up", args.follow_up, 1)
    if args.n_ctx < args.n_prompt + args.n_gen:
        p.error(f"--n-ctx must be >= --n-prompt + --n-gen = {args.n_prompt + args.n_gen}, got {args.n_ctx}")
    if args.image is not None and not Path(args.image).is_file():
        p.error(f"--image {args.image}: no such file")
    if args.model is not None and not Path(args.model).is_file():
        p.error(f"--model {args.model}: no such file")


# ---------------------------------------------------------------------------
# Machine measurements
# ---------------------------------------------------------------------------
def measure_read_bandwidth(n_threads: int | None = None, gib: float = 1.0) -> tuple[float, str]:
    """(bytes/s, method). Prefers the extension's probe (kernels helper), else numpy."""
    try:
        from mllama_q import _core

        probe = getattr(_core, "measure_read_bandwidth", None)
    except ImportError:
        probe = None
    if probe is not None:
        return float(probe(gib, 5)), "_core.measure_read_bandwidth"
    # numpy: each thread sums its slice of a float32 buffer (numpy releases the GIL in the
    # reduction loop, so the threads run in parallel). Best of 5.
    n_threads = n_threads or os.cpu_count() or 1
    buf = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    parts = np.array_split(buf, n_threads)
    best = 0.0
    with ThreadPoolExecutor(n_threads) as ex:
        for _ in range(5):
            t0 = time.perf_counter()
            list(ex.map(np.sum, parts))
            best = max(best, buf.nbytes / (time.perf_counter() - t0))
    return best, f"numpy sum, {n_threads} threads"


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def decode_weight_bytes(path) -> dict:
    """Bytes of the GGUF tensors one decode step reads, and the file's totals (see module doc)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    total = step = vision = xkv = 0
    for t in reader.tensors:
        nb = int(t.n_bytes)
        total += nb
        name = t.name
        if name.startswith(K.VISION_PREFIXES):
            vision += nb
        elif ".cross_attn_k_proj." in name or ".cross_attn_v_proj." in name:
            xkv += nb
        elif name == "token_embd.weight":
            rows = int(t.shape[-1])  # gguf ne order: ne[1] = rows
            step += nb // rows
        else:
            step += nb
    return {
        "decode_bytes_per_token": step,
        "tensor_bytes": total,
        "vision_bytes": vision,
        "cross_kv_proj_bytes": xkv,
        "file_bytes": os.path.getsize(path),
    }


def synthetic_image(tiles: int, tile_size: int, seed: int = 0):
    """A smooth random RGB PIL image whose best canvas is `tiles` tiles (TILE_GRIDS)."""
    from PIL import Image

    rows, cols = TILE_GRIDS[tiles]
    h, w = rows * tile_size, cols * tile_size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = [127 + 120 * np.sin(xx / (17 + 9 * c) + rng.uniform(0, 6)) * np.cos(yy / (23 + 5 * c)) for c in range(3)]
    return Image.fromarray(np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------
def kv_cache_bytes(thp: dict, vhp: dict | None, n_ctx: int, n_images: int, elem_bytes: int = 2) -> int:
    """Bytes of the self-attention KV cache for n_ctx tokens plus the cached cross-attention
    K/V of `n_images` images of max_tiles tiles, at `elem_bytes` per value (Model's default
    kv_type is f16). From the loaded model's hyper-parameters (Model.text_hparams /
    vision_hparams, read from the GGUF at load: the file is not opened again)."""
    n_layer, n_kv, hd = thp["n_layer"], thp["n_kv_head"], thp["head_dim"]
    n_cross = len(thp["cross_attention_layers"])
    self_kv = (n_layer - n_cross) * 2 * n_ctx * n_kv * hd * elem_bytes
    cross_kv = 0
    if n_images and vhp is not None:
        patches = (vhp["image_size"] // vhp["patch_size"]) ** 2 + 1
        cross_kv = n_cross * 2 * n_images * vhp["max_num_tiles"] * patches * n_kv * hd * elem_bytes
    return self_kv + cross_kv


def _prompt_inputs(model, n_prompt: int, image):
    """input_ids [n_prompt] int32 starting with BOS (+ <|image|>), and the processor outputs."""
    text = ("<|image|>" if image is not None else "") + "Describe this picture" + " the" * (2 * n_prompt)
    out = model.processor(text=text, images=[image] if image is not None else None)
    ids = np.asarray(out["input_ids"]).reshape(-1)[:n_prompt].astype(np.int32)
    if ids.size < n_prompt:
        raise ValueError(f"prompt has only {ids.size} tokens, wanted {n_prompt}")
    cam = out.get("cross_attention_mask")
    if cam is not None:  # processor: [1, seq, n_images, max_tiles]; Model.eval: [seq, n_images, max_tiles]
        cam = np.asarray(cam)
        cam = (cam[0] if cam.ndim == 4 else cam)[:n_prompt]
    return ids, out, cam


def _nvidia_smi_used_bytes() -> int | None:
    """GPU memory this process holds, from nvidia-smi (None if unavailable)."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0] == str(os.getpid()) and parts[1].isdigit():
            return int(parts[1]) << 20  # MiB
    return None


def machine_info() -> dict:
    info = {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def vision_flops(thp: dict, vhp: dict, tiles: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one image of `tiles` tiles through the vision tower,
    the projector and the cross-attention K/V projections, from the loaded model's
    hyper-parameters (Model.text_hparams / vision_hparams: no file access, so it can never
    add to a timed phase). Sequence per image as HF's MllamaVisionModel: tiles x P padded to
    a multiple of 8 (1601 -> 1608); every layer attends over the whole image (all its tiles)."""
    Dv, Fv = vhp["hidden_size"], vhp["intermediate_size"]
    layers = vhp["num_layers"] + vhp["num_global_layers"]
    ps, img = vhp["patch_size"], vhp["image_size"]
    P = (img // ps) ** 2 + 1
    Pp = (P + 7) // 8 * 8
    N = tiles * Pp
    D, Hkv, hd = thp["hidden_size"], thp["n_kv_head"], thp["head_dim"]
    n_cross = len(thp["cross_attention_layers"])
    out_dim = Dv * (1 + len(vhp["intermediate_layers"]))
    f = 2.0 * tiles * (P - 1) * Dv * 3 * ps * ps  # patch conv
    f += layers * (2.0 * N * (4 * Dv * Dv + 2 * Dv * Fv) + 4.0 * N * N * Dv)  # projections+MLP, QK^T and PV
    f += 2.0 * tiles * P * out_dim * D  # projector
    f += n_cross * 2 * 2.0 * tiles * P * D * Hkv * hd  # cross-attention K and V
    return f


def run_bench(args) -> dict:
    from mllama_q.model import Model

    res: dict = {"device": args.device, **machine_info()}
    if args.synthetic:
        from mllama_q.cli.synthetic import cached_synthetic

        t0 = time.perf_counter()
        path = cached_synthetic(args.synthetic, args.type, cache_dir=args.cache_dir, progress=not args.json)
        res["synthetic"] = args.synthetic
        res["type"] = args.type
        res["synthetic_prepare_s"] = time.perf_counter() - t0
    else:
        path = Path(args.model)
    res["model"] = str(path)
    res.update(decode_weight_bytes(path))

    t0 = time.perf_counter()
    with Progress(f"loading {path.name}", ticker=True):
        model = Model(
            str(path),
            device=args.device,
            n_ctx=args.n_ctx,
            n_threads=args.threads,
            vision=(args.image is not None or args.tiles > 0),
        )
    res["load_s"] = time.perf_counter() - t0
    res["threads"] = args.threads or getattr(model, "n_threads", None) or os.cpu_count()
    warn_context(args.n_ctx, model, sys.stderr, "--n-ctx")

    image = None
    if args.image:
        from PIL import Image

        image = Image.open(args.image)
        image.load()
    elif args.tiles > 0:
        tile = int(getattr(getattr(model.processor, "settings", None), "tile_size", 0) or 560)
        image = synthetic_image(args.tiles, tile)

    vocab = int(model.text_hparams.get("vocab_size", 0)) if hasattr(model, "text_hparams") else 0
    vocab = vocab or len(model.tokenizer.tokens) - 1
    ids, proc, cam = _prompt_inputs(model, args.n_prompt, image)
    res["n_prompt"] = int(ids.size)
    flops = None
    if image is not None:
        res["image_tiles"] = int(np.asarray(proc["aspect_ratio_mask"]).sum())
        flops = vision_flops(model.text_hparams, model.vision_hparams, res["image_tiles"])
    model.reset()
    # Timed from here to the first token: image encode + prefill + picking the token, nothing
    # else (no file access, no FLOP counting; the status lines only draw on a terminal).
    t_start = time.perf_counter()
    if image is not None:
        t0 = time.perf_counter()
        with Progress(f"image encode ({res['image_tiles']} tiles)", ticker=True):
            model.encode_images(proc["pixel_values"], proc["aspect_ratio_ids"], proc["aspect_ratio_mask"])
        res["image_encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Progress(f"prefill ({ids.size} tokens)", ticker=True):
        logits = model.eval(ids, cross_attention_mask=cam)
    res["prefill_s"] = time.perf_counter() - t0
    tok = int(np.argmax(np.asarray(logits).reshape(-1)[-vocab:]))
    res["ttft_s"] = time.perf_counter() - t_start
    res["prefill_tok_s"] = ids.size / res["prefill_s"]
    if flops is not None:
        res["image_encode_GFLOPs"] = flops / res["image_encode_s"] / 1e9

    # Decode: cross_attention_mask=None repeats the prompt's last row (as HF generate does).
    times = []
    finite = True
    with Progress("decode") as bar:
        for i in range(args.n_gen):
            t0 = time.perf_counter()
            logits = model.eval(np.array([tok], dtype=np.int32))
            last = np.asarray(logits).reshape(-1)[-vocab:]
            tok = int(np.argmax(last))
            times.append(time.perf_counter() - t0)
            finite = finite and bool(np.isfinite(last).all())
            bar.update(i + 1, args.n_gen)
    res["n_gen"] = len(times)
    if times:
        # the first decode step may still fault in pages; report the mean of the rest too
        res["decode_s"] = float(sum(times))
        res["decode_tok_s"] = len(times) / sum(times)
        steady = times[1:] or times
        res["decode_tok_s_steady"] = len(steady) / sum(steady)
        res["decode_weight_read_GBps"] = res["decode_bytes_per_token"] * res["decode_tok_s_steady"] / 1e9
    res["logits_finite"] = finite

    res["peak_rss_bytes"] = peak_rss_bytes()
    kv = kv_cache_bytes(
        model.text_hparams,
        model.vision_hparams,
        args.n_ctx,
        1 if image is not None else 0,
        4 if getattr(model, "kv_type", "f16") == "f32" else 2,
    )
    res["kv_cache_bytes"] = kv
    # Weights the run maps and reads: the file minus the vision tower when no image was used
    # (Model(vision=False) never touches it) minus the unread rows of token_embd (only the
    # prompt's rows are gathered; we count the whole table to stay conservative).
    res["weights_in_use_bytes"] = res["tensor_bytes"] - (0 if image is not None else res["vision_bytes"])
    res["rss_over_weights_and_kv_bytes"] = res["peak_rss_bytes"] - res["weights_in_use_bytes"] - kv
    res["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for attr in ("peak_vram_bytes", "peak_device_bytes"):
        v = getattr(model, attr, None)
        if v is not None:
            res["peak_vram_bytes"] = int(v() if callable(v) else v)
            break
    if args.device.startswith("cuda") and "peak_vram_bytes" not in res:
        used = _nvidia_smi_used_bytes()
        if used is not None:  # weights, KV cache and scratch are allocated up front: ~ the peak
            res["vram_used_bytes_after_run"] = used
    del model

    if not args.no_bandwidth and args.device == "cpu":
        bw, how = measure_read_bandwidth(args.threads)
        res["mem_read_GBps"] = bw / 1e9
        res["mem_read_method"] = how
        if "decode_weight_read_GBps" in res:
            res["decode_bw_fraction"] = res["decode_weight_read_GBps"] / res["mem_read_GBps"]
    return res


def _bench_file(args, res: dict) -> Path:
    """The GGUF to benchmark (generating the synthetic one once), its sizes into `res`."""
    if args.synthetic:
        from mllama_q.cli.synthetic import cached_synthetic

        t0 = time.perf_counter()
        path = cached_synthetic(args.synthetic, args.type, cache_dir=args.cache_dir, progress=not args.json)
        res.update(synthetic=args.synthetic, type=args.type, synthetic_prepare_s=time.perf_counter() - t0)
    else:
        path = Path(args.model)
    res["model"] = str(path)
    res.update(decode_weight_bytes(path))
    return path


def _memory(model, res: dict, n_sessions: int, n_images: int) -> None:
    """Cache sizes (model.memory()) and peak RSS against file + caches."""
    mem = model.memory()
    res.update(
        kv_bytes_per_session=mem["kv_bytes_per_session"],
        image_kv_bytes=mem["image_bytes"],
        peak_rss_bytes=peak_rss_bytes(),
    )
    caches = mem["kv_bytes_per_session"] * n_sessions + mem["image_bytes"] * n_images
    res["caches_bytes"] = caches
    res["rss_over_file_and_caches_bytes"] = res["peak_rss_bytes"] - res["file_bytes"] - caches


def steady_rate(stamps: list[list[float]]) -> tuple[float, float, int]:
    """(aggregate tokens/s, window seconds, tokens in the window) of concurrent streams, each
    a list of its tokens' arrival times, while every one of them is producing: the window runs
    from the last stream's first token to the first stream's last token, and each stream's
    rate inside it is (its tokens there - 1) / (the time from its first to its last token
    there), summed over the streams. (All streams' tokens in the window over the window's
    length would undercount: the window ends on the first finisher's last token, before the
    other streams' tokens of that same step arrive -- up to N - 1 tokens short, 2.5 % for 4
    streams of 32 tokens.) NaN when the streams never all produce at once."""
    live = [s for s in stamps if s]
    if not live:
        return float("nan"), 0.0, 0
    w0, w1 = max(s[0] for s in live), min(s[-1] for s in live)
    rate, n_in = 0.0, 0
    for s in live:
        inside = [t for t in s if w0 <= t <= w1]
        n_in += len(inside)
        if len(inside) >= 2 and inside[-1] > inside[0]:
            rate += (len(inside) - 1) / (inside[-1] - inside[0])
    return (rate if w1 > w0 else float("nan")), max(w1 - w0, 0.0), n_in


def run_sessions_bench(args) -> dict:
    """Aggregate decode speed of N concurrent sessions (see the module docstring)."""
    import threading

    from mllama_q.model import Model

    res: dict = {"device": args.device, "mode": "sessions", **machine_info()}
    path = _bench_file(args, res)
    n_max = max(args.sessions)
    t0 = time.perf_counter()
    with Progress(f"loading {path.name}", ticker=True):
        model = Model(
            str(path),
            device=args.device,
            n_ctx=args.n_ctx,
            n_threads=args.threads,
            vision=False,
            max_sessions=n_max,
            n_batch=max(512, n_max + 1) if n_max >= 512 else 512,
        )
    res["load_s"] = time.perf_counter() - t0
    res["threads"] = args.threads or os.cpu_count()
    ids, _, _ = _prompt_inputs(model, args.n_prompt, None)
    runs = []
    for n in args.sessions:
        sessions = [model.session() for _ in range(n)]
        stamps: list[list[float]] = [[] for _ in range(n)]
        results = [None] * n
        barrier = threading.Barrier(n)

        errors: list[BaseException] = []

        def worker(i):
            prompt_ids = ids.copy()
            prompt_ids[-1] = ids[1 + i % (ids.size - 1)]  # distinct prompts
            barrier.wait()
            try:
                st = sessions[i].generate(input_ids=prompt_ids, max_new_tokens=args.n_gen, temperature=0, stream=True)
                for _ in st:
                    stamps[i].append(time.perf_counter())
                results[i] = st.result
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        with Progress(f"{n} session(s) x {args.n_gen} tokens", ticker=True):
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for sess in sessions:
            sess.close()
        if errors:
            raise errors[0]
        agg, window, inside = steady_rate(stamps)
        runs.append(
            {
                "sessions": n,
                "aggregate_decode_tok_s": agg,
                "window_s": window,
                "tokens_in_window": inside,
                "completion_tokens": [r.completion_tokens for r in results],
                "per_session_decode_tok_s": [r.timings["decode_tokens_per_s"] for r in results],
            }
        )
    base = next((r["aggregate_decode_tok_s"] for r in runs if r["sessions"] == 1), None)
    for r in runs:
        r["speedup_vs_1"] = r["aggregate_decode_tok_s"] / base if base else None
    res["runs"] = runs
    _memory(model, res, n_max, 0)
    res["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    model.close()
    return res


def run_chat_bench(args) -> dict:
    """Two turns of a chat about one image (see the module docstring)."""
    from mllama_q.model import Model

    res: dict = {"device": args.device, "mode": "chat", **machine_info()}
    path = _bench_file(args, res)
    t0 = time.perf_counter()
    with Progress(f"loading {path.name}", ticker=True):
        model = Model(str(path), device=args.device, n_ctx=args.n_ctx, n_threads=args.threads, vision=True)
    res["load_s"] = time.perf_counter() - t0
    res["threads"] = args.threads or os.cpu_count()
    if args.image:
        from PIL import Image

        image = Image.open(args.image)
        image.load()
    else:
        tile = int(getattr(getattr(model.processor, "settings", None), "tile_size", 0) or 560)
        image = synthetic_image(max(args.tiles, 1), tile)
    from mllama_q.processor import cross_attention_mask

    question = "Describe this picture in detail."
    follow = " ".join(["and"] * args.follow_up)  # one token each in Llama 3's vocabulary
    turn1 = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    enc = model.processor(text=_render(model, turn1), images=[image], add_special_tokens=False)
    # Turn 2: turn 1's prompt and the reply's tokens as generated, then the new message. The chat
    # template renders exactly this when the reply's text tokenizes back to the same ids, as a real
    # model's does (a synthetic model's random tokens need not: it would measure the re-tokenization).
    tail = model.tokenizer.encode(
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        + follow
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        add_special_tokens=False,
    )
    image_kw = {k: enc[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    n_tiles = [int(x) for x in np.asarray(enc["aspect_ratio_mask"])[0].sum(axis=1)]
    max_tiles = int(np.asarray(enc["aspect_ratio_mask"]).shape[-1])
    turns = []
    with model.session() as sess:
        with Progress("turn 1 (image encode, prefill, decode)", ticker=True):
            r1 = sess.generate(
                input_ids=enc["input_ids"],
                cross_attention_mask=enc["cross_attention_mask"],
                max_new_tokens=args.n_gen,
                temperature=0,
                **image_kw,
            )
        ids2 = [int(t) for t in enc["input_ids"][0]] + r1.tokens + tail
        mask2 = cross_attention_mask(ids2, model.image_token_id, n_tiles, max_tiles)
        with Progress("turn 2", ticker=True):
            r2 = sess.generate(
                input_ids=[ids2], cross_attention_mask=mask2, max_new_tokens=args.n_gen, temperature=0, **image_kw
            )
        for r in (r1, r2):
            turns.append(
                {
                    "ttft_s": r.timings["time_to_first_token_s"],
                    "prompt_tokens": r.prompt_tokens,
                    "cached_tokens": r.cached_tokens,
                    "prefilled_tokens": r.prompt_tokens - r.cached_tokens,
                    "images_encoded": r.images_encoded,
                    "images_cached": r.images_cached,
                    "image_encode_s": r.timings["image_encode_s"],
                    "prefill_s": r.timings["prefill_s"],
                    "decode_tok_s": r.timings["decode_tokens_per_s"],
                }
            )
    res["image_tiles"] = sum(n_tiles)
    res["turns"] = turns
    res["ttft_ratio"] = turns[1]["ttft_s"] / turns[0]["ttft_s"]
    _memory(model, res, 1, 1)
    res["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    model.close()
    return res


def _render(model, messages) -> str:
    """The chat template's prompt text for `messages` (with the assistant header)."""
    from mllama_q.chat import ChatTemplate

    return ChatTemplate(model.tokenizer.chat_template, model.tokenizer).render(messages, add_generation_prompt=True)


def _model_line(res: dict) -> str:
    synth = f"  (synthetic {res['synthetic']} {res['type']})" if "synthetic" in res else ""
    return f"model            {res['model']}{synth}"


def _device_line(res: dict) -> str:
    return (
        f"device           {res['device']}, threads {res['threads']}; {res.get('cpu_model', '?')},"
        f" {res['cpus']} CPUs, load average {res['loadavg_start']:.1f} at start"
    )


def _over_under(nbytes: int) -> str:
    """A signed RSS difference in words ("0.73 GiB under"), not as "+ -0.73 GiB"."""
    gib = 1 << 30
    return f"{nbytes / gib:.2f} GiB over" if nbytes >= 0 else f"{-nbytes / gib:.2f} GiB under"


def _fmt_sessions(res: dict) -> str:
    gib = 1 << 30
    lines = [_model_line(res), _device_line(res) + f", {res['loadavg_end']:.1f} at end"]
    if res["mode"] == "sessions":
        for r in res["runs"]:
            sp = f"  x{r['speedup_vs_1']:.2f} of 1 session" if r.get("speedup_vs_1") else ""
            lines.append(
                f"{r['sessions']:3d} session(s)    {r['aggregate_decode_tok_s']:8.2f} tok/s aggregate{sp}"
                f"  ({r['tokens_in_window']} tokens in {r['window_s']:.1f} s)"
            )
    else:
        for i, t in enumerate(res["turns"]):
            lines.append(
                f"turn {i + 1}           first token after {t['ttft_s']:8.2f} s  ({t['prompt_tokens']} prompt "
                f"tokens, {t['cached_tokens']} reused, {t['prefilled_tokens']} prefilled; images "
                f"{t['images_encoded']} encoded, {t['images_cached']} reused)"
            )
        lines.append(
            f"turn 2 / turn 1  {100 * res['ttft_ratio']:8.2f} % of the time to first token"
            f"  ({res['image_tiles']}-tile image)"
        )
    lines.append(
        f"KV cache         {res['kv_bytes_per_session'] / gib:8.3f} GiB per session; image K/V "
        f"{res['image_kv_bytes'] / gib:.3f} GiB per image"
    )
    # Below file + caches is the usual case (mmap: weights never read, here the vision tower, are
    # not resident).
    rel = _over_under(res["rss_over_file_and_caches_bytes"])
    lines.append(
        f"peak RSS         {res['peak_rss_bytes'] / gib:8.2f} GiB  ({rel} file {res['file_bytes'] / gib:.2f} GiB"
        f" + caches {res['caches_bytes'] / gib:.2f} GiB)"
    )
    return "\n".join(lines)


def _fmt(res: dict) -> str:
    gib = 1 << 30
    lines = [
        _model_line(res),
        f"file             {res['file_bytes'] / 1e9:.2f} GB; decode reads "
        f"{res['decode_bytes_per_token'] / 1e9:.3f}"
        f" GB/token; vision {res['vision_bytes'] / 1e9:.2f} GB",
        _device_line(res),
        f"load             {res['load_s'] * 1e3:9.1f} ms",
    ]
    if "image_encode_s" in res:
        lines.append(
            f"image encode     {res['image_encode_s'] * 1e3:9.1f} ms  ({res['image_tiles']} tiles,"
            f" {res['image_encode_GFLOPs']:.2f} GFLOP/s incl. projector and cross-attn K/V)"
        )
    lines.append(
        f"prefill          {res['prefill_s'] * 1e3:9.1f} ms  {res['prefill_tok_s']:8.1f} tok/s"
        f"  ({res['n_prompt']} tokens)"
    )
    lines.append(f"time to 1st tok  {res['ttft_s'] * 1e3:9.1f} ms")
    if "decode_tok_s" in res:
        lines.append(
            f"decode           {res['decode_tok_s']:9.2f} tok/s  (steady {res['decode_tok_s_steady']:.2f};"
            f" {res['n_gen']} tokens)"
        )
        lines.append(f"decode weights   {res['decode_weight_read_GBps']:9.2f} GB/s read")
    if "mem_read_GBps" in res:
        frac = f"  -> decode at {100 * res['decode_bw_fraction']:.0f}% of it" if "decode_bw_fraction" in res else ""
        lines.append(f"memory bandwidth {res['mem_read_GBps']:9.2f} GB/s  ({res['mem_read_method']}){frac}")
    # The rest can be negative (KV pages never touched are not resident).
    rel = _over_under(res["rss_over_weights_and_kv_bytes"])
    mem = f"peak RSS         {res['peak_rss_bytes'] / gib:9.2f} GiB"
    mem += (
        f"  ({rel} weights in use {res['weights_in_use_bytes'] / gib:.2f} GiB + KV"
        f" {res['kv_cache_bytes'] / gib:.2f} GiB; file {res['file_bytes'] / gib:.2f} GiB)"
    )
    lines.append(mem)
    if "peak_vram_bytes" in res:
        lines.append(f"peak VRAM        {res['peak_vram_bytes'] / gib:9.2f} GiB")
    elif "vram_used_bytes_after_run" in res:
        lines.append(f"VRAM in use      {res['vram_used_bytes_after_run'] / gib:9.2f} GiB  (nvidia-smi, after the run)")
    if not res.get("logits_finite", True):
        lines.append("WARNING: non-finite logits during decode")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    try:
        if args.sessions is not None:
            res = run_sessions_bench(args)
        elif args.chat:
            res = run_chat_bench(args)
        else:
            res = run_bench(args)
    except KeyboardInterrupt:
        print("mllama-q bench: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        print(f"mllama-q bench: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(_fmt_sessions(res) if "mode" in res else _fmt(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
