"""`mllama-q list`: the llama3.2-vision models this machine already has.

    mllama-q list [--all] [--verify] [--json]

Two places are searched: Ollama's local store ($OLLAMA_MODELS, else ~/.ollama/models and the
Linux service's /usr/share/ollama/.ollama/models; mllama_q.store) and mllama-q's own cache
($MLLAMA_Q_CACHE, else ~/.cache/mllama-q). Each model is shown with its size, quantization
and layout (mllama-q's own, Ollama's one-file v0.7+ or two-file v0.4-v0.6), and a problem
(missing or incomplete blob, bad manifest) if it cannot be used. Every name in the first
column works as `mllama-q run NAME` / `chat NAME` / `Model(NAME)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _file_type_name(n) -> str | None:
    """general.file_type (llama.cpp's enum llama_ftype, gguf-py LlamaFileType) as Ollama shows it."""
    if n is None:
        return None
    try:
        from gguf import LlamaFileType

        return LlamaFileType(int(n)).name.replace("MOSTLY_", "").replace("ALL_", "")
    except (ImportError, ValueError):
        return f"file_type {n}"


def cache_entries(cache: Path) -> list[dict]:
    """The .gguf files of mllama-q's cache with their quantization and layout."""
    from mllama_q import ollama
    from mllama_q.gguf_file import ModelFileError, check_architecture, field_value, open_gguf

    out = []
    for p in sorted(cache.glob("*.gguf")) if cache.is_dir() else []:
        e = {"name": str(p), "size": p.stat().st_size, "quantization": None, "layout": "", "problem": None}
        try:
            f = open_gguf(p)
            check_architecture(f, p)
            e["quantization"] = _file_type_name(field_value(f, "general.file_type"))
            e["layout"] = ollama.detect_layout(f, p, ollama.tensor_entries(f)).describe()
        except (ModelFileError, ValueError) as err:
            e["problem"] = str(err)
        out.append(e)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="mllama-q list",
        description="llama3.2-vision models in the Ollama store and mllama-q's cache (size, quantization, layout).",
    )
    ap.add_argument("--all", action="store_true", help="also list the store's other (non-mllama) models")
    ap.add_argument(
        "--verify", action="store_true", help="check every model blob's sha256 against its name (reads all of them)"
    )
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = ap.parse_args(argv)
    import warnings

    from mllama_q import ollama, store
    from mllama_q.cli.synthetic import default_cache_dir

    warnings.simplefilter("ignore", ollama.OllamaLayoutWarning)
    rows, hidden = [], 0
    roots = store.store_roots()
    for e in store.list_store(roots, verify=args.verify):
        if not args.all and e.problem is None and not e.is_mllama:
            hidden += 1
            continue
        rows.append(
            {
                "name": str(e.name),
                "size": e.size,
                "quantization": e.file_type,
                "layout": e.layout if e.is_mllama or e.problem else f"not llama3.2-vision ({e.family})",
                "problem": e.problem,
                "source": "ollama",
            }
        )
    cache = default_cache_dir()
    for e in cache_entries(cache):
        rows.append(dict(e, source="mllama-q cache"))
    if args.json:
        print(
            json.dumps(
                {
                    "ollama_stores": [str(r) for r in roots],
                    "cache": str(cache),
                    "models": rows,
                    "other_ollama_models": hidden,
                }
            )
        )
        return 0
    out = sys.stdout
    if not rows:
        out.write(f"no models found (Ollama store: {', '.join(map(str, roots))}; mllama-q cache: {cache})\n")
    else:
        w = max(len(r["name"]) for r in rows)
        out.write(f"{'NAME':<{w}}  {'SIZE':>8}  {'QUANT':<7}  LAYOUT\n")
        for r in rows:
            status = f"  PROBLEM: {r['problem']}" if r["problem"] else ""
            out.write(
                f"{r['name']:<{w}}  {_gb(r['size']):>8}  {(r['quantization'] or '-'):<7}  "
                f"{r['layout'] or '-'}{status}\n"
            )
    if hidden:
        out.write(f"({hidden} other Ollama model(s), not llama3.2-vision: --all lists them)\n")
    return 0
