"""The `mllama-q` command line: argument errors before anything loads, in the CLI's wording;
`--type` in any case; the bare command; `bench --help`; the converter's fallback report; the
trained-context warning; bench's time to first token; terminal progress (mllama_q.cli.progress).

run / chat streaming with a scripted model: tests/test_generate.py."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re

import pytest

import mllama_q
from mllama_q import gguf_keys as K
from mllama_q.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load or synthetic-file write fails the test: argument errors come first."""
    import mllama_q.cli.synthetic
    import mllama_q.model

    def forbidden(*a, **k):
        raise AssertionError("the model was loaded (or a file generated) before the arguments were checked")

    monkeypatch.setattr(mllama_q.model, "Model", forbidden)
    monkeypatch.setattr(mllama_q.cli.synthetic, "cached_synthetic", forbidden)


def _usage_error(capsys, argv) -> str:
    """Run `mllama-q argv`; it must exit with argparse's status 2; returns stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bare_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    cap = capsys.readouterr()
    assert "usage: mllama-q COMMAND" in cap.err and "bench" in cap.err and cap.out == ""
    assert main(["--help"]) == 0
    assert "usage: mllama-q COMMAND" in capsys.readouterr().out


def test_bench_help_shows_the_model_benchmark(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--synthetic", "--n-prompt", "--n-gen", "--tiles", "--n-ctx", "--type", "--device"):
        assert opt in out, opt
    assert "bench kernels" in out


CUDA = mllama_q.backends()["cuda"]

# (extra arguments, message) for run and chat: checked before the model loads
BAD_RUN_ARGS = [
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["-n", "0"], "-n/--max-new-tokens must be >= 1, got 0"),
    (["--ctx", "-5"], "-c/--ctx must be >= 1, got -5"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0, got -0.5"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0 (0 disables it), got -1"),
    (["--min-p", "2"], "--min-p must be in [0, 1], got 2.0"),
    (["--repeat-penalty", "0"], "--repeat-penalty must be a finite number > 0, got 0.0"),
    (["--seed", "-3"], "--seed must be an integer >= 0, got -3"),
    (["--stop", ""], "--stop must be a non-empty string"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:x"], "--device must be cpu, cuda or cuda:N, got 'cuda:x'"),
]


@pytest.mark.parametrize("command", ["run", "chat"])
@pytest.mark.parametrize("extra,message", BAD_RUN_ARGS)
def test_run_and_chat_reject_bad_arguments_before_loading(no_model_load, capsys, command, extra, message):
    argv = [command, "-m", "model.gguf"] + (["-p", "hi"] if command == "run" else []) + extra
    err = _usage_error(capsys, argv)
    assert f"mllama-q {command}: error: {message}" in err
    assert "usage: mllama-q " + command in err  # argparse's usage line, not an API traceback


@pytest.mark.skipif(CUDA["usable"], reason="a usable CUDA device is present")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_gpu_is_an_argument_error(no_model_load, capsys, device):
    err = _usage_error(capsys, ["run", "-m", "model.gguf", "-p", "hi", "--device", device])
    why = "built without CUDA" if not CUDA["built"] else "no usable CUDA device"
    assert f"mllama-q run: error: --device {device}: " in err and why in err and "--device cpu" in err


BAD_BENCH_ARGS = [
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--n-prompt", "1"], "--n-prompt must be >= 2, got 1"),
    (["--n-gen", "-1"], "--n-gen must be >= 0, got -1"),
    (["--n-ctx", "40"], "--n-ctx must be >= --n-prompt + --n-gen = 64, got 40"),
    (["--device", "gpu"], "--device must be cpu, cuda or cuda:N, got 'gpu'"),
    (["--type", "q5_k"], "argument --type: invalid choice: 'q5_k'"),
    (["--image", "/no/such/image.png"], "--image /no/such/image.png: no such file"),
]


@pytest.mark.parametrize("extra,message", BAD_BENCH_ARGS)
def test_bench_rejects_bad_arguments_before_loading(no_model_load, capsys, extra, message):
    err = _usage_error(capsys, ["bench", "--synthetic", "tiny"] + extra)
    assert f"mllama-q bench: error: {message}" in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["-n", "0"], "-n/--max-new-tokens must be >= 1, got 0"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
    ],
)
def test_demo_rejects_bad_arguments_before_loading(no_model_load, capsys, extra, message):
    err = _usage_error(capsys, ["demo"] + extra)
    assert f"mllama-q demo: error: {message}" in err


def test_bench_missing_model_file(no_model_load, capsys, tmp_path):
    err = _usage_error(capsys, ["bench", "-m", str(tmp_path / "nope.gguf")])
    assert f"mllama-q bench: error: --model {tmp_path / 'nope.gguf'}: no such file" in err


def test_type_accepts_any_case():
    from mllama_q.cli.bench_model import _parser
    from mllama_q.convert.cli import build_parser

    a = build_parser().parse_args(["hf", "-o", "x.gguf", "--type", "Q4_K_M", "--vision-type", "Q8_0"])
    assert (a.ftype, a.vision_type) == ("q4_k_m", "q8_0")
    b = _parser().parse_args(["--synthetic", "11B", "--type", "Q6_K"])
    assert (b.synthetic, b.type) == ("11b", "q6_k")


def test_convert_reports_fallbacks(tiny_checkpoint, tmp_path, capsys):
    """--type Q8_0 --vision-type Q4_K on the tiny checkpoint (vision rows of 64 / 128 values,
    not multiples of Q4_K's 256): every vision matrix falls back to Q8_0, and the report
    names exactly the tensors gguf-py reads back as Q8_0 in the vision tower."""
    import gguf

    from mllama_q.convert.cli import main as convert_main

    out = tmp_path / "m.gguf"
    assert (
        convert_main([str(tiny_checkpoint(seed=0)), "-o", str(out), "--type", "Q8_0", "--vision-type", "Q4_K", "-q"])
        == 0
    )
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("mllama-q convert: note: ")]
    assert notes and all("--vision-type q4_k: " in n and "instead of Q4_K: rows of " in n for n in notes)
    reported = {}
    for n in notes:  # "... rows of R values are not a multiple of Q4_K's 256-value blocks: a (x4), b"
        assert "are not a multiple of Q4_K's 256-value blocks: " in n
        for item in n.split("blocks: ", 1)[1].split(", "):
            name, _, count = item.partition(" (x")
            reported[name] = int(count.rstrip(")") or 1)
    r = gguf.GGUFReader(str(out))
    stored = {}
    for t in r.tensors:
        if t.name.startswith(("v.", "mm.")) and t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            folded = ".".join("*" if p.isdigit() else p for p in t.name.split("."))
            stored[folded] = stored.get(folded, 0) + 1
    assert reported == stored and sum(stored.values()) > 10
    assert not any(t.tensor_type == gguf.GGMLQuantizationType.Q4_K for t in r.tensors)


def test_convert_without_fallbacks_says_nothing(tiny_checkpoint, tmp_path, capsys):
    from mllama_q.convert.cli import main as convert_main

    assert convert_main([str(tiny_checkpoint(seed=0)), "-o", str(tmp_path / "m.gguf"), "--type", "f16", "-q"]) == 0
    assert "note:" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """The tiny synthetic model with a trained context of 256 tokens (mllama.context_length)."""
    from mllama_q.cli.synthetic import CONFIGS, write_synthetic_gguf

    cfg = dataclasses.replace(CONFIGS["tiny"], context_length=256)
    return write_synthetic_gguf(tmp_path_factory.mktemp("ctx") / "ctx256.gguf", cfg, "q4_k_m", progress=False)


def test_model_reads_trained_context(short_context_model):
    import gguf

    m = mllama_q.Model(short_context_model, n_ctx=64)
    assert m.n_ctx_train == int(gguf.GGUFReader(str(short_context_model)).fields[K.CONTEXT_LENGTH].contents()) == 256


def test_ctx_above_trained_context_warns(short_context_model, capsys):
    args = ["run", "-m", str(short_context_model), "-p", "hi", "-n", "2", "--temperature", "0"]
    assert main(args + ["-c", "512"]) == 0
    err = capsys.readouterr().err
    assert "warning: -c/--ctx 512 is above the model's trained context of 256 tokens" in err
    assert main(args + ["-c", "256"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_bench_time_to_first_token_opens_no_file(short_context_model, monkeypatch, capsys):
    """Between the start of the image encode and the first token nothing opens the GGUF again
    (the FLOP count used to re-read it inside the timed interval)."""
    import builtins

    import gguf

    from mllama_q.cli import bench_model
    from mllama_q.model import Model

    timed = {"on": False, "opened": []}
    real_reader_init, real_open = gguf.GGUFReader.__init__, builtins.open
    real_encode, real_eval = Model.encode_images, Model.eval

    def reader_init(self, path, *a, **k):
        if timed["on"]:
            timed["opened"].append(str(path))
        return real_reader_init(self, path, *a, **k)

    def opener(file, *a, **k):
        if timed["on"]:
            timed["opened"].append(str(file))
        return real_open(file, *a, **k)

    def encode(self, *a, **k):
        timed["on"] = True
        return real_encode(self, *a, **k)

    def evaluate(self, tokens, *a, **k):
        out = real_eval(self, tokens, *a, **k)
        timed["on"] = False  # the prefill (the first eval) ends the timed interval
        return out

    monkeypatch.setattr(gguf.GGUFReader, "__init__", reader_init)
    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(Model, "encode_images", encode)
    monkeypatch.setattr(Model, "eval", evaluate)
    assert (
        bench_model.main(
            [
                "-m",
                str(short_context_model),
                "--n-ctx",
                "512",
                "--n-prompt",
                "8",
                "--n-gen",
                "2",
                "--tiles",
                "2",
                "--no-bandwidth",
                "--json",
            ]
        )
        == 0
    )
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert timed["opened"] == []
    assert res["image_tiles"] == 2 and res["n_prompt"] == 8 and res["n_gen"] == 2 and res["logits_finite"]
    assert res["ttft_s"] >= res["image_encode_s"] + res["prefill_s"]
    assert "warning: --n-ctx 512 is above the model's trained context of 256 tokens" in cap.err


# ---------------------------------------------------------------------------------------------
# mllama_q.cli.progress
# ---------------------------------------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_silent_off_a_terminal():
    from mllama_q.cli.progress import PhaseProgress, Progress

    s = io.StringIO()
    p = Progress("loading", stream=s, delay=0)
    p.update(1, 2)
    p.done("loaded")
    ph = PhaseProgress(stream=s, delay=0)
    ph("image_encode", 1, 40)
    ph.close()
    with Progress("ticking", stream=s, delay=0, ticker=True):
        pass
    assert s.getvalue() == ""


def test_progress_on_a_terminal():
    from mllama_q.cli.progress import Progress

    t = Terminal()
    p = Progress("encoding image", stream=t, delay=0)
    p.update(10, 40)
    p.update(40, 40)  # the last one always draws
    p.done("image encoded")
    out = t.getvalue()
    assert "\rencoding image  10/40   25%" in out and "\rencoding image  40/40  100%" in out
    # done() wipes the line (spaces over the longest text, back to column 0), then the message
    assert out.endswith("\r" + " " * len("encoding image  40/40  100%  0 s") + "\rimage encoded\n")
    p.done("again")  # idempotent
    assert t.getvalue() == out


def test_progress_waits_for_its_delay():
    from mllama_q.cli.progress import Progress

    t = Terminal()
    p = Progress("quick", stream=t, delay=60)
    p.update(1, 2)
    p.done()
    assert t.getvalue() == ""  # a phase shorter than the delay shows nothing


def test_progress_ticker_draws_elapsed_time():
    import time

    from mllama_q.cli.progress import TICK_S, Progress

    t = Terminal()
    with Progress("loading model.gguf", stream=t, delay=0, ticker=True):
        time.sleep(TICK_S * 2.5)
    out = t.getvalue()
    assert len(re.findall(r"\rloading model\.gguf  \d+ s", out)) >= 2 and out.endswith("\r")


def test_phase_progress_one_line_per_phase():
    from mllama_q.cli.progress import PhaseProgress

    t = Terminal()
    with PhaseProgress(stream=t, delay=0) as ph:
        ph("image_encode", 1, 2)
        ph("image_encode", 2, 2)
        ph("prefill", 1, 3)
    out = t.getvalue()
    assert "\rencoding image  1/2   50%" in out and "\rreading the prompt  1/3   33%" in out
    assert out.index("encoding image  2/2") < out.index("reading the prompt")


def _modules_after(child_env, imports: str) -> set[str]:
    """The modules a fresh Python has loaded after `import <imports>`."""
    import subprocess
    import sys

    code = f"import sys, {imports}; print('\\n'.join(sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env())
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


def test_runtime_never_imports_the_cli(child_env):
    """The runtime library must not import the CLI's progress (or anything under mllama_q.cli)."""
    loaded = _modules_after(child_env, "mllama_q, mllama_q.model, mllama_q.generate")
    assert "mllama_q.model" in loaded and not {m for m in loaded if m.startswith("mllama_q.cli")}


def test_import_is_cheap(child_env):
    """`import mllama_q` loads neither the compiled core nor numpy nor PIL (PEP 562 lazy names)."""
    loaded = _modules_after(child_env, "mllama_q")
    assert "mllama_q" in loaded
    assert not loaded & {"mllama_q._core", "numpy", "PIL", "gguf", "jinja2"}


def test_tool_assets_are_found():
    """The tools find their files after the move into mllama_q/cli/: the demo photo in
    mllama_q/assets and, in a source checkout, bench/run_ggml_peer.sh for `bench kernels --peer`."""
    from pathlib import Path

    from mllama_q.cli import bench, demo

    assert demo.DEMO_IMAGE.is_file() and demo.DEMO_IMAGE.parent.name == "assets"
    src = Path(__file__).resolve().parents[1]
    if Path(mllama_q.__file__).resolve().parent == src / "mllama_q":  # running from the source tree
        assert bench.PEER_SCRIPT == src / "bench" / "run_ggml_peer.sh" and bench.PEER_SCRIPT.is_file()


def test_backends_state_cuda_is_unverified():
    """Until bench/RESULTS.md holds GPU measurements, backends() says plainly that the CUDA
    backend is not verified (README.md, "CUDA status")."""
    b = mllama_q.backends()
    assert b["cpu"]["usable"] and b["cpu"]["verified"]
    cuda = b["cuda"]
    assert cuda["verified"] is False
    assert ("NOT YET VERIFIED" in cuda["status"]) if cuda["built"] else cuda["status"].startswith("not built")


def test_sessions_rate_counts_whole_steps():
    """The sessions / serve benchmarks' steady rate: N streams decoding in lock step (one token
    each per step of `dt` seconds, arriving in a fixed order within the step, some starting or
    ending steps earlier) produce N / dt tokens/s; counting all tokens in the common window
    over its length gave N / dt minus the last step's late arrivals."""
    from mllama_q.cli.bench_model import steady_rate

    dt, eps = 0.25, 1e-3
    for n in (1, 2, 4, 8):
        starts = [i % 3 for i in range(n)]  # streams join at steps 0, 1, 2
        stamps = [[(starts[i] + j) * dt + i * eps for j in range(32)] for i in range(n)]
        rate, window, tokens = steady_rate(stamps)
        assert rate == pytest.approx(n / dt, rel=1e-9), n
        assert window == pytest.approx(stamps[0][-1] - max(s[0] for s in stamps))
        assert tokens == sum(sum(1 for t in s if max(x[0] for x in stamps) <= t <= stamps[0][-1]) for s in stamps)
        # the old estimate (every token in the window / its length) falls short for n > 1
        old = sum(sum(1 for t in s if max(x[0] for x in stamps) < t <= stamps[0][-1]) for s in stamps) / window
        assert (old < 0.99 * n / dt) == (n > 1)
    assert math.isnan(steady_rate([[0.0, 0.25], [1.0, 1.25]])[0])  # never decoding together
    assert math.isnan(steady_rate([])[0])
