"""`mllama-q convert HF_DIR -o OUT.gguf --type ...` (also `python -m mllama_q.convert`)."""

from __future__ import annotations

import argparse
import re
import signal
import sys
from collections import defaultdict

from mllama_q import gguf_keys as K

from .errors import ConvertError

PROG = "mllama-q convert"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a Hugging Face Llama 3.2 Vision (Mllama) checkpoint directory to one GGUF file, "
        "or (--from-ollama) re-quantize the vision tower of a llama3.2-vision that Ollama pulled.",
        epilog="q4_k_m: Q4_K with Q6_K for output.weight and llama.cpp's choice of attn_v / ffn_down layers; "
        "q4_k_s: Q4_K throughout. Norms, biases, gates and position/tile embeddings stay F32.",
    )
    p.add_argument(
        "hf_dir", metavar="HF_DIR", nargs="?", help="checkpoint directory (config.json, *.safetensors, tokenizer...)"
    )
    p.add_argument(
        "--from-ollama",
        metavar="NAME",
        help="instead of HF_DIR: an Ollama model name (or blob path); "
        "its text weights are kept, its F16 vision tower becomes --vision-type (default q8_0)",
    )
    p.add_argument("--projector", help="--from-ollama with a two-file blob path: its projector blob")
    p.add_argument("-o", "--output", required=True, metavar="OUT.gguf", help="output file")
    p.add_argument(
        "--type",
        dest="ftype",
        type=str.lower,
        default=None,
        choices=K.FTYPES,
        help="text weights (default: q4_k_m; any case; --from-ollama keeps them as they are)",
    )
    p.add_argument(
        "--vision-type",
        type=str.lower,
        default=None,
        choices=K.VISION_TYPES,
        help="vision tower and projector weights (default: q8_0 for quantized --type, else the --type)",
    )
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def fallback_notes(fallbacks, ftype: str, vision_type) -> list[str]:
    """One line per (requested type, stored type, row length): which tensors the requested block
    type could not tile, and why (gguf_keys.fallback). Layer numbers are folded: blk.*.attn_q."""
    groups = defaultdict(list)
    for name, wanted, got, row in fallbacks:
        groups[(name.startswith(K.VISION_PREFIXES), wanted, got, row)].append(name)
    lines = []
    for (vision, wanted, _got, row), names in groups.items():
        option = f"--vision-type {vision_type}" if vision and vision_type else f"--type {ftype}"
        folded = defaultdict(int)
        for n in names:
            folded[re.sub(r"\.\d+\.", ".*.", n)] += 1
        listed = ", ".join(f"{n} (x{c})" if c > 1 else n for n, c in folded.items())
        lines.append(
            f"{PROG}: note: {option}: {len(names)} tensor(s) stored as {K.fallback_reason(wanted, row)}: {listed}"
        )
    return lines


def _sigterm(signum, frame):
    # Turn SIGTERM into an exception so the converter's cleanup removes its temp file.
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if (args.hf_dir is None) == (args.from_ollama is None):
        ap.error("give HF_DIR or --from-ollama NAME (one of them)")
    if args.from_ollama is not None and args.ftype is not None:
        ap.error("--from-ollama keeps the text weights as Ollama stored them: --type does not apply")
    if args.from_ollama is None and args.projector is not None:
        ap.error("--projector goes with --from-ollama")
    from .converter import convert

    old = signal.signal(signal.SIGTERM, _sigterm) if _is_main_thread() else None
    try:
        if args.from_ollama is not None:
            from .from_ollama import convert_from_ollama

            s = convert_from_ollama(
                args.from_ollama,
                args.output,
                args.vision_type or "q8_0",
                projector=args.projector,
                force=args.force,
                progress=not args.quiet,
            )
            s["ftype"] = "as stored"
        else:
            s = convert(
                args.hf_dir,
                args.output,
                args.ftype or "q4_k_m",
                args.vision_type,
                force=args.force,
                progress=not args.quiet,
            )
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted, nothing written", file=sys.stderr)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    for line in fallback_notes(s.get("fallbacks", ()), s["ftype"], s["vision_type"]):
        print(line, file=sys.stderr)
    if not args.quiet:
        gib = s["bytes_in"] / 2**30
        print(
            f"wrote {s['output']}: {s['tensors']} tensors, {s['bytes_out'] / 2**30:.2f} GiB "
            f"({s['ftype']}, vision {s['vision_type'] or s['ftype']}) from {gib:.2f} GiB in {s['seconds']:.1f} s "
            f"({gib / max(s['seconds'], 1e-9):.2f} GiB/s)",
            file=sys.stderr,
        )
    return 0


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
