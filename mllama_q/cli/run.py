"""`mllama-q run` and `mllama-q chat`.

    mllama-q run [-m] MODEL [-i IMAGE ...] -p PROMPT [sampling options]
    mllama-q chat [-m] MODEL [-i IMAGE ...] [sampling options]

MODEL is a .gguf file or an Ollama model name (llama3.2-vision, llama3.2-vision:11b, ...) found
in the local Ollama store (mllama_q.store; `mllama-q list` shows what is there).

`run` wraps the prompt as one user message (images first, then the text, as in the model card's
examples) and streams the answer to stdout; `--raw` sends the prompt as-is (no chat template;
put `<|image|>` tokens in it yourself). `chat` keeps the conversation in one session
(mllama_q.session): turn N prefills only the new message and each image is encoded once per
conversation; `/image PATH` attaches an image to the next message, `/reset` starts over,
`/quit` leaves; a message can span lines (between two lines of three double quotes, or with
a trailing backslash); the
standard library's readline gives line editing and a history (kept in ~/.mllama_q_history on a
terminal). Ctrl-C during an image encode or the prefill stops it at once and drops that turn
(its message and images); during the answer it stops the answer.

The model (mllama_q.model.Model) is imported only here, lazily, so `--help` is instant. Every
option is checked (mllama_q.cli.args) before the model loads; on a terminal, the load and the
long phases (image encode, prefill) show a status line on stderr (mllama_q.cli.progress).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mllama_q.cli.args import add_model_options, check_device, check_min, check_sampling, model_option, warn_context
from mllama_q.cli.progress import PhaseProgress, Progress


def _add_common(ap: argparse.ArgumentParser) -> None:
    add_model_options(ap)
    ap.add_argument(
        "-i", "--image", action="append", default=[], metavar="IMAGE", help="an image file (repeat for several)"
    )
    ap.add_argument("--system", default=None, help="system message")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=512, help="at most this many new tokens (512)")
    ap.add_argument(
        "--temperature",
        "--temp",
        type=float,
        default=None,
        help="0 = greedy (default: the model's generation config, 0.6)",
    )
    ap.add_argument("--top-k", type=int, default=None, help="0 = off (default: the model's, off)")
    ap.add_argument("--top-p", type=float, default=None, help="1 = off (default: the model's, 0.9)")
    ap.add_argument("--min-p", type=float, default=0.0, help="0 = off (default 0)")
    ap.add_argument("--repeat-penalty", type=float, default=1.0, help="HF repetition_penalty, 1 = off")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    ap.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("-c", "--ctx", type=int, default=4096, help="context length in tokens (4096)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print token counts and timings to stderr")


def _parse(ap: argparse.ArgumentParser, argv):
    args = ap.parse_args(argv)
    model_option(ap, args)
    return args


def _system(args, model) -> str | None:
    """--system, else the system message of the model's Ollama manifest (if any)."""
    return args.system or (getattr(model, "store_defaults", None) or {}).get("system")


def _check_common(ap: argparse.ArgumentParser, args) -> None:
    """Every option, before anything slow: argparse errors (exit 2) in the CLI's own words."""
    check_device(ap, args.device)
    check_min(ap, "--threads", args.threads, 1)
    check_min(ap, "-c/--ctx", args.ctx, 1)
    check_sampling(ap, args)


def _sampling_kwargs(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        seed=args.seed,
        stop=args.stop or None,
    )


def _load_model(args, want_vision: bool, err=None):
    """Model(...) under a "loading FILE" status line (terminals only); -v reports the load time."""
    from mllama_q.model import Model

    err = sys.stderr if err is None else err
    # The load status shows at once (issue 8: a one-line "loading ..." on a terminal), not
    # after the 2 s other phases wait: a user who just typed the command sees it is working.
    with Progress(f"loading {Path(args.model).name}", stream=err, delay=0, ticker=True):
        model = Model(
            args.model,
            device=args.device,
            n_ctx=args.ctx,
            n_threads=args.threads,
            vision=want_vision,
            projector=args.projector,
            ollama_converter=args.ollama_converter,
        )
    load_s = getattr(model, "load_time_s", None)
    if args.verbose and load_s is not None:
        text_only = "" if getattr(model, "vision_hparams", None) else ", text only"
        err.write(f"[loaded {args.model} in {load_s:.2f} s{text_only}]\n")
        err.flush()
    warn_context(args.ctx, model, err, "-c/--ctx")
    return model


def _check_images(paths, already: int = 0) -> list[str]:
    """Decode each image once now: a missing, corrupt or oversized file (a decompression bomb)
    fails before the slow model load, with a clear ValueError. `already`: images the
    conversation holds (the per-prompt cap counts them too)."""
    from mllama_q.hparams import check_image_count
    from mllama_q.processor import load_image

    check_image_count(already + len(paths))  # before decoding any of them
    for p in paths:
        load_image(p)
    return list(paths)


def _user_message(text: str, n_images: int) -> dict:
    if n_images == 0:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def _stream(target, out, err=None, **kw):
    """Generate with streaming on `target` (a Session or a Model; a model object with only the
    low-level API goes through mllama_q.generate.generate); write pieces to `out`; return the
    GenerationResult. Long phases show a status line on `err` when it is a terminal."""
    err = sys.stderr if err is None else err
    if hasattr(target, "generate"):
        gen = target.generate
    else:
        from mllama_q.generate import generate

        def gen(**k):
            k.pop("progress", None)  # the low-level loop reports no phases
            return generate(target, **k)

    label = "reading the image and the prompt" if kw.get("images") else "reading the prompt"
    with PhaseProgress(stream=err) as phases, Progress(label, stream=err, ticker=True) as wait:

        def progress(phase, done, total):
            wait.done()  # the phase lines replace the ticker
            phases(phase, done, total)

        stream = gen(stream=True, progress=progress, **kw)
        try:
            for piece in stream:
                wait.done()  # clears the status lines before the answer appears
                phases.close()
                out.write(piece)
                out.flush()
        finally:
            if stream.result is None:
                stream.close()
    return stream.result


def _report(res, err) -> None:
    t = res.timings
    cache = ""
    if res.cached_tokens or res.images_cached or res.images_encoded:
        cache = (
            f"; cache: {res.cached_tokens} of {res.prompt_tokens} prompt tokens reused, "
            f"{res.images_cached} image(s) reused, {res.images_encoded} encoded"
        )
    err.write(
        f"\n[{res.prompt_tokens} prompt tokens, {res.completion_tokens} generated, stop: {res.stop_reason}{cache}; "
        f"image encode {t.get('image_encode_s', 0):.2f} s, prefill {t.get('prefill_s', 0):.2f} s "
        f"({t.get('prefill_tokens_per_s', 0):.1f} tok/s), decode {t.get('decode_tokens_per_s', 0):.2f} tok/s, "
        f"first token after {t.get('time_to_first_token_s', 0):.2f} s]\n"
    )
    err.flush()


def run_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mllama-q run", description="Answer one prompt (with optional images).")
    _add_common(ap)
    ap.add_argument("-p", "--prompt", required=True, help="the prompt text ('-' reads stdin)")
    ap.add_argument(
        "--raw",
        action="store_true",
        help="no chat template: the prompt goes to the model as-is (MllamaProcessor rules)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object (text, counts, timings) instead")
    args = _parse(ap, argv)
    _check_common(ap, args)
    out, err = sys.stdout, sys.stderr
    try:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        images = _check_images(args.image)
        model = _load_model(args, want_vision=bool(images), err=err)
        kw = _sampling_kwargs(args)
        if args.raw:
            kw.update(prompt=prompt, images=images or None)
        else:
            system = _system(args, model)
            msgs = ([{"role": "system", "content": system}] if system else []) + [_user_message(prompt, len(images))]
            kw.update(messages=msgs, images=images or None)
        if args.json:
            from mllama_q.generate import generate

            with Progress("generating", stream=err, ticker=True):
                res = generate(model, **kw)
            out.write(
                json.dumps(
                    {
                        "text": res.text,
                        "prompt_tokens": res.prompt_tokens,
                        "completion_tokens": res.completion_tokens,
                        "stop_reason": res.stop_reason,
                        "timings": res.timings,
                    }
                )
                + "\n"
            )
            return 0
        res = _stream(model, out, err, **kw)
        out.write("\n")
        if args.verbose:
            _report(res, err)
        return 0
    except KeyboardInterrupt:
        err.write("\ninterrupted\n")
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        err.write(f"mllama-q run: error: {e}\n")
        return 1


CHAT_HELP = """commands: /image PATH  attach an image to your next message
          /reset       forget the conversation
          /quit        leave (also Ctrl-D)
          \"\"\"         start (and end) a message of several lines; a line ending in \\ goes on too"""

HISTORY_FILE = "~/.mllama_q_history"


def _readline_history(out):
    """Line editing and a history for input() (stdlib readline) when stdin is a terminal; returns
    a function that saves the history (or None)."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input()
        return None
    import os

    path = os.path.expanduser(HISTORY_FILE)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save():
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    return save


def _read_message(input_fn, first: str) -> str:
    """The rest of a multi-line message: a block between two lines of three double quotes, or
    lines ending in a backslash."""
    if first.strip().startswith('"""'):
        body = first.strip()[3:]
        lines = []
        if body.endswith('"""'):
            return body[:-3]
        if body:
            lines.append(body)
        while True:
            line = input_fn("... ")
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines)
            lines.append(line)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input_fn("... "))
    return "\n".join(lines)


def chat_main(argv=None, input_fn=None) -> int:
    ap = argparse.ArgumentParser(
        prog="mllama-q chat",
        description="Interactive chat. " + CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(ap)
    args = _parse(ap, argv)
    _check_common(ap, args)
    out, err = sys.stdout, sys.stderr
    try:
        pending = _check_images(args.image)
        model = _load_model(args, want_vision=True, err=err)
    except ValueError as e:
        if "vision=False" in str(e):  # a text-only file
            try:
                model = _load_model(args, want_vision=False, err=err)
            except (ValueError, RuntimeError, OSError) as e2:
                err.write(f"mllama-q chat: error: {e2}\n")
                return 1
        else:
            err.write(f"mllama-q chat: error: {e}\n")
            return 1
    except (RuntimeError, OSError) as e:
        err.write(f"mllama-q chat: error: {e}\n")
        return 1

    save_history = _readline_history(out) if input_fn is None else None
    input_fn = input if input_fn is None else input_fn
    # One session holds the conversation: turn N prefills only its new tokens, images stay encoded.
    session = model.session() if hasattr(model, "session") else model
    system_text = _system(args, model)
    system = [{"role": "system", "content": system_text}] if system_text else []
    history: list[dict] = []
    images: list[str] = []  # every image of the conversation, in prompt order
    out.write(f"mllama-q chat ({Path(args.model).name}). {CHAT_HELP}\n")
    out.flush()
    try:
        while True:
            try:
                line = input_fn(">>> ")
                text = line.strip()
                if text.startswith('"""') or line.endswith("\\"):
                    line = _read_message(input_fn, line)
                    text = line.strip()
            except EOFError:
                out.write("\n")
                return 0
            except KeyboardInterrupt:
                out.write("\n")
                return 130
            if not text:
                continue
            if text in ("/quit", "/exit", "/bye"):
                return 0
            if text == "/reset":
                history, images, pending = [], [], []
                if session is not model:
                    session.reset()
                out.write("(conversation cleared)\n")
                continue
            if text in ("/help", "/?"):
                out.write(CHAT_HELP + "\n")
                continue
            if text.startswith("/image"):
                path = text[len("/image") :].strip().strip("'\"")
                try:
                    _check_images([path], already=len(images) + len(pending))
                except ValueError as e:
                    out.write(f"error: {e}\n")
                    continue
                pending.append(path)
                out.write(f"(image attached: {path})\n")
                continue
            if text.startswith("/"):
                out.write(f"unknown command {text.split()[0]!r}. {CHAT_HELP}\n")
                continue
            msg = _user_message(line, len(pending))
            pieces: list[str] = []

            class _Tee:  # the answer as it is shown, for the history if the turn is interrupted
                def write(self, s):
                    pieces.append(s)
                    out.write(s)

                def flush(self):
                    out.flush()

            try:
                res = _stream(
                    session,
                    _Tee(),
                    err,
                    messages=system + history + [msg],
                    images=(images + pending) or None,
                    **_sampling_kwargs(args),
                )
            except KeyboardInterrupt:
                if not pieces and session is not model and session.n_images > len(images):
                    # Ctrl-C came after the engine had finished this turn's images and prompt (the
                    # progress shown lags the engine): the session kept them, so the conversation
                    # does too, and the next turn reuses the cache instead of starting over.
                    out.write("\n(interrupted)\n")
                    history += [msg, {"role": "assistant", "content": ""}]
                    images += pending
                    pending = []
                    continue
                if not pieces:  # during the image encode or the prefill: the turn is dropped
                    out.write("\n(interrupted: message and its images dropped)\n")
                    pending = []
                    continue
                out.write("\n(interrupted)\n")
                history += [msg, {"role": "assistant", "content": "".join(pieces)}]
                images += pending
                pending = []
                continue
            except (ValueError, RuntimeError, OSError, MemoryError) as e:
                # The conversation stays as it was before this message; its attached images are
                # dropped (a bad one would fail every later turn too).
                out.write(f"\nerror: {e}\n")
                if pending:
                    out.write(f"({len(pending)} attached image(s) dropped; /image to attach again)\n")
                    pending = []
                continue
            out.write("\n")
            if args.verbose:
                _report(res, err)
            history += [msg, {"role": "assistant", "content": res.text}]
            images += pending
            pending = []
    finally:
        if save_history:
            save_history()
        if session is not model:
            session.close()
