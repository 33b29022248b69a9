"""`mllama-q serve`: an OpenAI- and Ollama-compatible HTTP server for one model.

    mllama-q serve [-m] MODEL [--host 127.0.0.1] [--port 8080] [--parallel 2] [--n-ctx 4096]
                   [--api-key KEY] [--device cpu|cuda] [--alias NAME ...]

MODEL is a .gguf file or an Ollama model name (llama3.2-vision[:TAG]) found in the local Ollama
store, as for `mllama-q run` (mllama_q.store): the model is then listed under that name (and
Ollama's digest, size and details), and its manifest's system message and parameters are the
defaults of every request that does not set them, as in Ollama's own server.

The socket is bound first (so a busy port fails at once and `--port 0` picks a free one, which
the start-up line reports), then the model loads in the background while /health answers 503.
The server library is mllama_q.server; Starlette and uvicorn are imported only here.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from mllama_q.cli.args import add_model_options


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mllama-q serve",
        description=(
            "Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) and the "
            "Ollama API (/api/chat, /api/generate, /api/tags, ...), so their clients work unchanged."
        ),
    )
    add_model_options(ap)
    ap.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="ADDR",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    ap.add_argument("--port", type=int, default=8080, metavar="N", help="port (default 8080; 0 picks a free one)")
    ap.add_argument(
        "--parallel",
        "-np",
        type=int,
        default=2,
        metavar="N",
        help="slots: conversations kept and generated at once; more requests queue (default 2)",
    )
    ap.add_argument(
        "--n-ctx", "-c", type=int, default=4096, metavar="N", help="context length of each slot in tokens (4096)"
    )
    ap.add_argument(
        "--api-key",
        default=os.environ.get("MLLAMA_Q_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $MLLAMA_Q_API_KEY; none: no check)",
    )
    ap.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all cores)")
    ap.add_argument(
        "--alias",
        action="append",
        default=[],
        metavar="NAME",
        help="the model's name in the APIs (default: the Ollama name, or the file name without .gguf); repeat to "
        "accept more names, e.g. --alias llama3.2-vision for apps configured for Ollama",
    )
    ap.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests allowed to wait for a slot; beyond that: 503 (default 64)",
    )
    ap.add_argument(
        "--max-body-mb", type=float, default=64.0, metavar="MB", help="largest request body in MiB (default 64)"
    )
    ap.add_argument(
        "--max-image-mb", type=float, default=20.0, metavar="MB", help="largest image (encoded) in MiB (default 20)"
    )
    ap.add_argument(
        "--max-image-pixels",
        type=int,
        default=40_000_000,
        metavar="N",
        help="largest image in pixels, width x height (default 40000000)",
    )
    ap.add_argument(
        "--max-images", type=int, default=4, metavar="N", help="images per request, history included (default 4)"
    )
    ap.add_argument(
        "--stream-interval-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="shortest time between two streamed chunks: tokens generated faster are sent together "
        "(the first is never delayed; default 5, 0: one chunk per token)",
    )
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap


def _check(ap, args) -> None:
    """Option checks before anything loads (mllama_q.cli.args: argparse errors, exit status 2)."""
    from mllama_q.cli.args import check_device, check_min, model_option

    model_option(ap, args)

    if not 0 <= args.port <= 65535:
        ap.error(f"--port must be in 0..65535, got {args.port}")
    for flag, value, minimum in (
        ("--parallel", args.parallel, 1),
        ("--max-images", args.max_images, 1),
        ("--max-queue", args.max_queue, 0),
        ("--n-ctx", args.n_ctx, 16),
        ("--threads", args.threads, 1),
        ("--max-image-pixels", args.max_image_pixels, 1),
    ):
        check_min(ap, flag, value, minimum)
    for flag, value in (("--max-body-mb", args.max_body_mb), ("--max-image-mb", args.max_image_mb)):
        if not value > 0:
            ap.error(f"{flag} must be > 0, got {value}")
    if not 0 <= args.stream_interval_ms <= 1000:
        ap.error(f"--stream-interval-ms must be in 0..1000, got {args.stream_interval_ms}")
    check_device(ap, args.device)
    if args.api_key is not None and not args.api_key.strip():
        args.api_key = None


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(addr)
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    _check(ap, args)
    err = sys.stderr
    from mllama_q.gguf_file import ModelFileError
    from mllama_q.store import find_model

    try:  # a file, or an Ollama name resolved (and its manifest and blobs checked) before the port opens
        found = find_model(args.model)
    except ModelFileError as e:
        err.write(f"mllama-q serve: error: {e}\n")
        return 1
    if found is None and not os.path.isfile(args.model):
        err.write(f"mllama-q serve: error: model file not found: {args.model}\n")
        return 1
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        stream=err,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("mllama_q.server")

    import uvicorn

    from mllama_q.server import Engine, ImageLimits, ModelInfo, ServerConfig, create_app, load_model

    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        err.write(f"mllama-q serve: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}\n")
        return 1
    host, port = sock.getsockname()[:2]
    if not _is_loopback(args.host) and args.api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the model", args.host)

    engine = Engine(
        load=lambda: load_model(
            args.model,
            device=args.device,
            n_ctx=args.n_ctx,
            parallel=args.parallel,
            n_threads=args.threads,
            projector=args.projector,
            ollama_converter=args.ollama_converter,
        ),
        parallel=args.parallel,
        max_queue=args.max_queue,
        stream_interval=args.stream_interval_ms / 1000,
    )
    names = args.alias or [None]
    if found is not None:
        info = ModelInfo.from_store(found, name=names[0], aliases=names[1:])
    else:
        info = ModelInfo.from_path(args.model, name=names[0], aliases=names[1:])
    config = ServerConfig(
        api_key=args.api_key,
        max_body_bytes=int(args.max_body_mb * 2**20),
        image_limits=ImageLimits(
            max_images=args.max_images, max_bytes=int(args.max_image_mb * 2**20), max_pixels=args.max_image_pixels
        ),
    )
    failed: list[str] = []
    server = None

    def load_failed(message: str) -> None:
        failed.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(engine, info, config, on_load_failed=load_failed)
    # limit_concurrency bounds the requests in flight (each may hold a request body of up to
    # --max-body-mb): beyond the slots, the queue and a margin for status probes, uvicorn answers 503.
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=args.log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            limit_concurrency=args.parallel + args.max_queue + 16,
        )
    )
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "listening on http://%s:%d (OpenAI API: /v1, Ollama API: /api); loading %s as %r",
        shown,
        port,
        args.model,
        info.name,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        err.write(f"mllama-q serve: error: {failed[0]}\n")
        return 1
    return 0


class ServerProcess:
    """`mllama-q serve` in a child process on a free port of 127.0.0.1, for tests, benchmarks and
    scripts: waits until it listens (and, by default, until /health is 200); `.url`, `.lines`
    (its stderr so far), `.stop()`. The child imports the same mllama_q as this process."""

    def __init__(self, model, *args: str, wait_ready: bool = True, timeout: float = 120, env=None):
        import mllama_q

        env = dict(os.environ if env is None else env)
        env["PYTHONSAFEPATH"] = "1"  # Python >= 3.11; for 3.10 the cwd below does the same
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(mllama_q.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
        )
        # `python -m` puts the working directory first on sys.path: run the child from the
        # directory that holds this mllama_q, so a source checkout in the caller's working
        # directory (without a built _core) is not imported instead of the installed package.
        home = str(Path(mllama_q.__file__).resolve().parents[1])
        m = Path(model)
        model = str(m.resolve()) if m.exists() else str(model)  # relative to the caller, not to `home`
        cmd = [sys.executable, "-m", "mllama_q", "serve", "-m", model, "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=home
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()  # keeps the pipe drained
        if not self._listening.wait(timeout):
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"
        if wait_ready:
            self.wait_ready(timeout)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.port is None and "listening on http://" in line:
                self.port = int(line.split("listening on http://", 1)[1].split()[0].rsplit(":", 1)[1])
                self._listening.set()
        self._listening.set()

    def wait_ready(self, timeout: float = 120) -> None:
        import urllib.error
        import urllib.request

        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited:\n" + "".join(self.lines))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError("the server is not ready:\n" + "".join(self.lines))

    def log_lines(self, needle: str) -> list[str]:
        return [ln for ln in list(self.lines) if needle in ln]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
