"""Command line: mllama-q {demo,run,chat,serve,list,bench,convert} ...

Each sub-command lives in its own module and is imported only when used, so
`mllama-q convert` never loads the runtime and vice versa.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": (
        "mllama_q.cli.demo",
        "run the whole pipeline on a tiny synthetic model and a bundled photo (--selfcheck: kernel self-check)",
    ),
    "convert": ("mllama_q.convert.cli", "convert a Hugging Face Mllama checkpoint to one GGUF file"),
    "bench": (
        "mllama_q.cli.bench",
        "model speed: load, image encode, prefill, decode, memory ('bench kernels': the matmul kernels)",
    ),
    "run": ("mllama_q.cli.run:run_main", "generate an answer to one prompt (and images), streamed"),
    "chat": ("mllama_q.cli.run:chat_main", "interactive chat; /image PATH attaches an image"),
    "serve": ("mllama_q.cli.serve", "OpenAI- and Ollama-compatible HTTP server (/v1/..., /api/...)"),
    "list": ("mllama_q.cli.models", "llama3.2-vision models found in the Ollama store and mllama-q's cache"),
}


def _usage() -> str:
    lines = ["usage: mllama-q COMMAND [options]", "", "commands:"]
    for name, (_, help_) in COMMANDS.items():
        lines.append(f"  {name:<9} {help_}")
    lines.append("")
    lines.append("Run 'mllama-q COMMAND --help' for a command's options.")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # no command: the help, as an error (a script calling a bare mllama-q is wrong)
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mllama_q import __version__

        print(f"mllama-q {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"mllama-q: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    # "package.module" runs its main(); "package.module:func" runs func() (two commands, one module)
    module_name, _, func = COMMANDS[cmd][0].partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, func or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
