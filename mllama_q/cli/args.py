"""Checks of command-line values, made right after parsing: before the model loads or anything
is written, and in the command line's own words (`--threads must be >= 1`, not the API's
`n_threads must be a positive integer`).

Every check reports through argparse's `parser.error`: the usage line, then
`PROG: error: MESSAGE`, exit status 2 (argparse's status for a bad command line). The
sampling ranges are those of mllama_q.sampling.LIMITS (one table for the API and the CLI).
"""

from __future__ import annotations

import argparse
import re

_DEVICE = re.compile(r"cpu|cuda(?::(\d+))?")

# CLI flag of each sampling option (mllama_q.sampling.LIMITS names -> argparse dest, flag)
SAMPLING_FLAGS = {
    "temperature": ("temperature", "--temperature"),
    "top_k": ("top_k", "--top-k"),
    "top_p": ("top_p", "--top-p"),
    "min_p": ("min_p", "--min-p"),
    "repetition_penalty": ("repeat_penalty", "--repeat-penalty"),
    "seed": ("seed", "--seed"),
}


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """MODEL (positional) or -m MODEL: a .gguf file or an Ollama model name (mllama_q.store), and
    --projector / --ollama-converter for the files Ollama wrote (mllama_q.ollama); shared by every
    command that loads a model (run, chat, serve). model_option() picks the one given."""
    from mllama_q.ollama import CONVERTERS

    ap.add_argument("model_arg", nargs="?", metavar="MODEL", help="a .gguf file or an Ollama model name")
    ap.add_argument("-m", "--model", metavar="MODEL", help="the same as MODEL")
    ap.add_argument(
        "--projector",
        metavar="PATH",
        help="Ollama's two-file layout: the projector blob (found by itself from a model name)",
    )
    ap.add_argument(
        "--ollama-converter",
        choices=("auto", *CONVERTERS),
        default="auto",
        help="which Ollama converter wrote a one-file blob, when the file cannot tell (default auto)",
    )


def model_option(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """args.model := MODEL or -m MODEL (exactly one of them)."""
    if (args.model is None) == (args.model_arg is None):
        ap.error("give the model once: MODEL or -m MODEL")
    args.model = args.model or args.model_arg


def lower(s: str) -> str:
    """argparse `type=` for case-insensitive choices (`--type Q4_K_M`)."""
    return s.lower()


def check_min(ap: argparse.ArgumentParser, flag: str, value, minimum: int) -> None:
    """`flag` must be an integer >= minimum (None: not given, accepted)."""
    if value is not None and value < minimum:
        ap.error(f"{flag} must be >= {minimum}, got {value}")


def check_device(ap: argparse.ArgumentParser, device: str, flag: str = "--device") -> None:
    """cpu, cuda or cuda:N, and a CUDA device must exist in this build and on this machine."""
    m = _DEVICE.fullmatch(device)
    if not m:
        ap.error(f"{flag} must be cpu, cuda or cuda:N, got {device!r}")
    if device == "cpu":
        return
    from mllama_q import backends

    cuda = backends()["cuda"]
    if not cuda["built"]:
        ap.error(
            f"{flag} {device}: this mllama-q was built without CUDA (reinstall with nvcc on PATH); use --device cpu"
        )
    index, devices = int(m.group(1) or 0), cuda["devices"]
    if not devices:
        ap.error(f"{flag} {device}: no usable CUDA device (no GPU or no driver found); use --device cpu")
    if index >= len(devices):
        ap.error(
            f"{flag} {device}: no such device; this machine has {len(devices)} CUDA device(s): "
            + ", ".join(f"cuda:{i} ({name})" for i, name in enumerate(devices))
        )


def check_sampling(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """-n and the sampling options (unset ones are the model's defaults and are not checked)."""
    from mllama_q.sampling import check_value

    check_min(ap, "-n/--max-new-tokens", args.max_new_tokens, 1)
    for name, (dest, flag) in SAMPLING_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        try:
            check_value(name, value, label=flag)
        except ValueError as e:
            ap.error(str(e))
    for s in args.stop:
        if not s:
            ap.error("--stop must be a non-empty string")


def warn_context(n_ctx: int, model, err, flag: str = "--ctx") -> None:
    """Warn on `err` when n_ctx exceeds the context the model was trained for (the GGUF's
    mllama.context_length, Model.n_ctx_train): positions past it were never seen in training."""
    trained = getattr(model, "n_ctx_train", None)
    if trained and n_ctx > trained:
        err.write(
            f"warning: {flag} {n_ctx} is above the model's trained context of {trained} tokens "
            "(mllama.context_length); answers past that length may degrade\n"
        )
        err.flush()
