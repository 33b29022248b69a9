"""Benchmarks of `mllama-q serve` (developer script; run under the bench lock, record `uptime`).

    python bench/serve_bench.py overhead    [--synthetic tiny] [--n-gen 512] [--repeat 5]
    python bench/serve_bench.py concurrency [--synthetic 11b] [--clients 1,4,8] [--n-gen 32]
    python bench/serve_bench.py followup    [--synthetic 11b] [--tiles 4]

overhead     tokens/s of one streaming generation through HTTP (OpenAI SSE, Ollama NDJSON, and
             non-streaming) against the same generation through the Python API
             (`Model.generate(stream=True)`), both greedy, same prompt, same token count.
             Issue 11's target: HTTP >= 90 % of the Python API for the tiny model.
             Also the CPU time per token (all threads: the model's compute threads included)
             of each path: the Python API's process; the server process plus the client (this
             process). On a shared machine it moves less with the load than tokens/s does.
concurrency  aggregate generated tokens/s with C clients streaming at once (each its own
             conversation; C slots): total completion tokens / wall time from the first request
             to the last [DONE] (prompts included), and in the steady state (every client past
             its prompt). Target: 4 clients >= 3x one client (needs batched decode).
followup     time to first token of an Open WebUI-style follow-up turn (whole history resent,
             with the same image) against the first turn's. Target: <= 5 %.

The server runs in a child process (mllama_q.cli.serve.ServerProcess); the clients are httpx
streams in this process (the JSON of each event is parsed, as a client would).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from mllama_q.cli.bench_model import steady_rate

PROMPT = "Write a long story about a lighthouse keeper and the sea, with many details."


def _model_path(args) -> Path:
    if args.model:
        return Path(args.model)
    from mllama_q.cli.synthetic import cached_synthetic

    return cached_synthetic(args.synthetic, "q4_k_m")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def _stream_openai(url: str, body: dict, client: httpx.Client) -> dict:
    """One streaming chat completion: (ttft, wall, completion tokens, text)."""
    t0 = time.perf_counter()
    ttft, parts, usage, times = None, [], None, []
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices", []):
                piece = ch["delta"].get("content")
                if piece:
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                    parts.append(piece)
                    times.append(now)
    wall = time.perf_counter() - t0
    return {
        "ttft": ttft or wall,
        "wall": wall,
        "tokens": usage["completion_tokens"] if usage else None,
        "chunk_times": times,
        "prompt_tokens": usage["prompt_tokens"] if usage else None,
        "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") if usage else None,
        "text": "".join(parts),
    }


def _stream_ollama(url: str, body: dict, client: httpx.Client) -> dict:
    t0 = time.perf_counter()
    ttft, parts, final = None, [], None
    with client.stream("POST", url + "/api/chat", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line:
                continue
            obj = json.loads(line)
            piece = obj["message"]["content"]
            if piece:
                ttft = ttft or time.perf_counter() - t0
                parts.append(piece)
            if obj["done"]:
                final = obj
    wall = time.perf_counter() - t0
    return {"ttft": ttft or wall, "wall": wall, "tokens": final["eval_count"], "text": "".join(parts)}


def _interval_args(args) -> list[str]:
    """The server's --stream-interval-ms when the benchmark sets it (else the server's default)."""
    return [] if args.stream_interval_ms is None else ["--stream-interval-ms", str(args.stream_interval_ms)]


def _cpu_s(pid: int) -> float:
    """CPU time (user + system, every thread, exited ones too) of another process so far."""
    st = Path(f"/proc/{pid}/stat").read_text()
    f = st[st.rindex(")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _chat_body(n_gen: int, content, stream=True) -> dict:
    return {
        "model": "bench",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": n_gen,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": True},
    }


def overhead(args) -> dict:
    """The Python API and the server take turns (same load on a shared machine for both); the
    server is idle while the Python API runs and vice versa."""
    from mllama_q import Model
    from mllama_q.cli.serve import ServerProcess

    path = _model_path(args)
    msgs = [{"role": "user", "content": PROMPT}]
    model = Model(path, n_ctx=args.n_ctx)
    body = _chat_body(args.n_gen, PROMPT)
    runs: dict = {"python_api": [], "openai_sse": [], "ollama_ndjson": [], "openai_nonstream": []}
    cpu: dict = {k: [] for k in runs}  # CPU us per token: python_api, or (server, client) for HTTP
    chunks: list[int] = []  # text chunks of each OpenAI SSE run (fewer than tokens: merged pieces)
    with (
        ServerProcess(
            path, "--parallel", "1", "--n-ctx", str(args.n_ctx), "--alias", "bench", *_interval_args(args)
        ) as srv,
        httpx.Client(timeout=600) as client,
    ):
        model.generate(messages=msgs, max_new_tokens=8, temperature=0)  # warm-up both
        _stream_openai(srv.url, {**body, "max_tokens": 8}, client)
        pid = srv.proc.pid

        def http_cpu(key, c0, s0, n):  # (server, client) CPU us per token of one HTTP run
            cpu[key].append(((_cpu_s(pid) - s0) / n * 1e6, (time.process_time() - c0) / n * 1e6))

        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            s = model.generate(messages=msgs, max_new_tokens=args.n_gen, temperature=0, stream=True)
            text = "".join(s)
            n_tok = s.result.completion_tokens
            runs["python_api"].append(n_tok / (time.perf_counter() - t0))
            cpu["python_api"].append((time.process_time() - c0) / n_tok * 1e6)
            c0, s0 = time.process_time(), _cpu_s(pid)
            r = _stream_openai(srv.url, body, client)
            http_cpu("openai_sse", c0, s0, n_tok)
            assert r["tokens"] == n_tok and r["text"] == text, "HTTP and Python API disagree"
            runs["openai_sse"].append(r["tokens"] / r["wall"])
            chunks.append(len(r["chunk_times"]))
            c0, s0 = time.process_time(), _cpu_s(pid)
            o = _stream_ollama(
                srv.url,
                {"model": "bench", "messages": msgs, "options": {"num_predict": args.n_gen, "temperature": 0}},
                client,
            )
            http_cpu("ollama_ndjson", c0, s0, n_tok)
            assert o["tokens"] == n_tok and o["text"] == text
            runs["ollama_ndjson"].append(o["tokens"] / o["wall"])
            s0, c0, t0 = _cpu_s(pid), time.process_time(), time.perf_counter()
            j = client.post(srv.url + "/v1/chat/completions", json={**body, "stream": False}).json()
            runs["openai_nonstream"].append(j["usage"]["completion_tokens"] / (time.perf_counter() - t0))
            http_cpu("openai_nonstream", c0, s0, n_tok)
    out: dict = {"n_gen": n_tok, "repeat": args.repeat, "stream_interval_ms": args.stream_interval_ms}
    out["openai_sse_text_chunks"] = chunks
    for k, v in runs.items():
        out[f"{k}_tok_s"] = statistics.median(v)
        out[f"{k}_tok_s_all"] = [round(x, 1) for x in v]
        if k == "python_api":
            out["python_api_cpu_us_per_token"] = statistics.median(cpu[k])
        else:
            out[f"{k}_cpu_us_per_token"] = {
                "server": statistics.median(c[0] for c in cpu[k]),
                "client": statistics.median(c[1] for c in cpu[k]),
                "total": statistics.median(c[0] + c[1] for c in cpu[k]),
            }
        if k != "python_api":
            # each HTTP run is paired with the Python API run just before it: the median of those
            # ratios is less sensitive to the machine's load drifting during the benchmark
            out[f"{k}_fraction_of_python_api"] = statistics.median(
                h / p for h, p in zip(v, runs["python_api"], strict=True)
            )
    return out


def concurrency(args) -> dict:
    from mllama_q.cli.serve import ServerProcess

    path = _model_path(args)
    counts = [int(c) for c in args.clients.split(",")]
    out: dict = {"n_gen": args.n_gen, "runs": {}}
    with ServerProcess(
        path,
        "--parallel",
        str(max(counts)),
        "--n-ctx",
        str(args.n_ctx),
        "--alias",
        "bench",
        *(["--threads", str(args.threads)] if args.threads else []),
        *_interval_args(args),
    ) as srv:
        with httpx.Client(timeout=3600) as c:
            _stream_openai(srv.url, _chat_body(2, "warm up"), c)
        # rounds of 1, 4, 8, 1, 4, 8, ...: on a shared machine the load drifts; the best round
        # of each count is kept (the least disturbed)
        for n in counts * args.rounds:
            results: list = [None] * n
            barrier = threading.Barrier(n)

            def client(i, barrier=barrier, results=results):
                with httpx.Client(timeout=3600) as c:
                    barrier.wait()
                    results[i] = (
                        time.perf_counter(),
                        _stream_openai(srv.url, _chat_body(args.n_gen, f"Client {i}: {PROMPT}"), c),
                        time.perf_counter(),
                    )

            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            t_first = min(r[0] for r in results)
            t_last = max(r[2] for r in results)
            tokens = sum(r[1]["tokens"] for r in results)
            # steady state: the window in which every client is past its prompt and still
            # generating, each client's chunk rate in it (one chunk per token unless a client
            # lags, which at these rates it does not), summed (bench_model.steady_rate)
            steady, window, _ = steady_rate([r[1]["chunk_times"] for r in results])
            run = {
                "clients": n,
                "tokens": tokens,
                "wall_s": t_last - t_first,
                "aggregate_tok_s": tokens / (t_last - t_first),
                "steady_window_s": window,
                "steady_aggregate_tok_s": steady if window > 0 else None,
                "mean_ttft_s": statistics.mean(r[1]["ttft"] for r in results),
                "per_client_tok_s": [r[1]["tokens"] / r[1]["wall"] for r in results],
            }
            print(json.dumps(run), file=sys.stderr, flush=True)
            out.setdefault("all_rounds", []).append(run)
            best = out["runs"].get(n)
            if best is None or run["aggregate_tok_s"] > best["aggregate_tok_s"]:
                out["runs"][n] = run
    one = out["runs"].get(1)
    if one:
        for r in out["runs"].values():
            r["speedup_vs_1"] = r["aggregate_tok_s"] / one["aggregate_tok_s"]
            if r["steady_aggregate_tok_s"] and one["steady_aggregate_tok_s"]:
                r["steady_speedup_vs_1"] = r["steady_aggregate_tok_s"] / one["steady_aggregate_tok_s"]
    return out


def _photo_data_url(tiles: int) -> str:
    """The bundled demo photo resized so the processor picks `tiles` tiles (1: 560x560,
    2: 560x1120, 4: 1120x1120 for the 11B's 560-pixel tiles)."""
    from PIL import Image

    import mllama_q

    img = Image.open(Path(mllama_q.__file__).parent / "assets" / "demo_scene.jpg").convert("RGB")
    size = {1: (560, 560), 2: (1120, 560), 4: (1120, 1120)}[tiles]
    buf = io.BytesIO()
    img.resize(size).save(buf, format="JPEG", quality=92)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def followup(args) -> dict:
    from mllama_q.cli.serve import ServerProcess

    path = _model_path(args)
    url = _photo_data_url(args.tiles)
    turn1 = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Describe this picture in detail."},
            ],
        }
    ]
    with (
        ServerProcess(
            path,
            "--parallel",
            "2",
            "--n-ctx",
            str(args.n_ctx),
            "--alias",
            "bench",
            *(["--threads", str(args.threads)] if args.threads else []),
            *_interval_args(args),
        ) as srv,
        httpx.Client(timeout=3600) as c,
    ):
        body = {
            "model": "bench",
            "max_tokens": args.n_gen,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        r1 = _stream_openai(srv.url, {**body, "messages": turn1}, c)
        turn2 = turn1 + [
            {"role": "assistant", "content": r1["text"]},
            {"role": "user", "content": "And what colour is the sky in it, exactly? Answer briefly."},
        ]
        r2 = _stream_openai(srv.url, {**body, "messages": turn2}, c)  # Open WebUI resends everything
    return {
        "tiles": args.tiles,
        "turn1_ttft_s": r1["ttft"],
        "turn2_ttft_s": r2["ttft"],
        "ratio": r2["ttft"] / r1["ttft"],
        "turn2_prompt_tokens": r2["prompt_tokens"],
        "turn2_cached_tokens": r2["cached"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["overhead", "concurrency", "followup"])
    ap.add_argument("-m", "--model", default=None, help="a .gguf (default: a cached synthetic model)")
    ap.add_argument("--synthetic", default=None, help="tiny (overhead default) or 11b (the others' default)")
    ap.add_argument("--n-gen", type=int, default=None)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=1, help="concurrency: repeat the client counts; keep the best")
    ap.add_argument("--tiles", type=int, default=4, choices=[1, 2, 4])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stream-interval-ms", type=float, default=None, help="the server's option (default: its default)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    args.synthetic = args.synthetic or ("tiny" if args.mode == "overhead" else "11b")
    args.n_gen = args.n_gen or {"overhead": 512, "concurrency": 32, "followup": 16}[args.mode]
    load_before = _uptime()
    result = {"overhead": overhead, "concurrency": concurrency, "followup": followup}[args.mode](args)
    result.update(
        mode=args.mode,
        model=str(_model_path(args)),
        machine=platform.processor() or platform.machine(),
        uptime_before=load_before,
        uptime_after=_uptime(),
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
