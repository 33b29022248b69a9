"""Shared fixtures: tiny reference checkpoints, the GGUFs our converter writes from them, their
transformers models, and the real Llama 3.2 Vision tokenizer.

The builders and the reference maths live in plain helper modules beside this file
(tiny_models.py: random Mllama checkpoints saved by transformers; real_tokenizer.py: the
real tokenizer from tiktoken's ranks; op_refs.py: float64 references of the backend ops).
Tests get their SETUP through the fixtures below, so a checkpoint, a conversion or a loaded
reference model asked for by several modules is built once per test session (per xdist
worker) instead of once per module:

    ckpt = tiny_checkpoint(seed=0, dtype="float32")      # make_tiny_checkpoint(**kw), cached by kw
    path = tiny_gguf(ckpt, "q4_k_m")                     # convert(ckpt, ..., ftype), cached
    hf = hf_model(ckpt)                                  # load_hf_model(ckpt), cached: do not modify
    hf = hf_model(ckpt, fresh=True)                      # a private copy that may be modified
    tokenizer_dir / tokenizer_gguf / tokenizer           # the real tokenizer: HF dir, GGUF, ours
    child_env(MLLAMA_Q_CPU_PATH="avx2")                  # env for a child python importing this mllama_q
    ollama_blobs(seed)                                   # Ollama's one-file blob and two-file pair of a checkpoint
    within(30, fn)                                       # fn() in a helper thread; a hang fails the test

torch and transformers are imported only by the fixtures that need them, so modules that do
not use them (the CPU op and quantizer tests) run without.
"""

from __future__ import annotations

import json

import pytest


def _key(kw: dict) -> str:
    return json.dumps(kw, sort_keys=True, default=str)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(**kw)` -> directory of tiny_models.make_tiny_checkpoint(**kw), built
    once per session for each distinct set of keyword arguments. Treat it as read-only
    (copy it before editing files in it)."""
    from tiny_models import make_tiny_checkpoint

    built: dict = {}

    def make(**kw):
        key = _key(kw)
        if key not in built:
            built[key] = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt") / "hf", **kw)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """`tiny_gguf(ckpt, ftype, vision_type=None)` -> path of the GGUF our converter writes
    (mllama_q.convert.convert), once per session for each (checkpoint, types). Read-only."""
    from gguf_reference import assert_matches_gguf_py

    from mllama_q.convert import convert

    written: dict = {}

    def make(ckpt, ftype: str, vision_type: str | None = None):
        key = (str(ckpt), ftype, vision_type)
        if key not in written:
            name = f"tiny-{ftype}" + (f"-v{vision_type}" if vision_type else "") + ".gguf"
            path = tmp_path_factory.mktemp("tiny_gguf") / name
            convert(ckpt, path, ftype=ftype, vision_type=vision_type, progress=False)
            assert_matches_gguf_py(path)  # the runtime's reader sees what gguf-py sees
            written[key] = path
        return written[key]

    return make


@pytest.fixture(scope="session")
def ollama_blobs(tiny_checkpoint, tmp_path_factory):
    """`ollama_blobs(seed)` -> {"one", "text", "proj"}: the tiny checkpoint of `seed` (published
    config spelling) written by tests/ollama_writer.py as Ollama's one-file blob and as its
    two-file text + projector pair; once per session per seed. Read-only."""
    from ollama_writer import write_one_file, write_two_files

    made: dict = {}

    def make(seed: int) -> dict:
        if seed not in made:
            d = tmp_path_factory.mktemp(f"ollama_blobs_s{seed}")
            ck = tiny_checkpoint(seed=seed, dtype="float32", rope_spelling="rope_theta")
            text, proj = write_two_files(ck, d / "text.gguf", d / "proj.gguf")
            made[seed] = {"one": write_one_file(ck, d / "one.gguf"), "text": text, "proj": proj}
        return made[seed]

    return make


@pytest.fixture(scope="session")
def hf_model():
    """`hf_model(ckpt, dtype="float32", intermediate="layer_input", fresh=False)` -> the
    transformers reference model (tiny_models.load_hf_model), eval mode. Shared across the
    session unless fresh=True: never modify a shared one."""
    from tiny_models import load_hf_model

    loaded: dict = {}

    def load(ckpt, fresh: bool = False, **kw):
        if fresh:
            return load_hf_model(ckpt, **kw)
        key = (str(ckpt), _key(kw))
        if key not in loaded:
            loaded[key] = load_hf_model(ckpt, **kw)
        return loaded[key]

    return load


@pytest.fixture(scope="session")
def tokenizer_dir():
    """The real Llama 3.2 Vision tokenizer as a Hugging Face directory (real_tokenizer.py;
    built once per machine from tiktoken's ranks and cached in the temp dir)."""
    from real_tokenizer import cached_llama32_vision_tokenizer

    return cached_llama32_vision_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_gguf(tokenizer_dir, tmp_path_factory):
    """A GGUF holding only the tokenizer metadata our converter writes for tokenizer_dir."""
    from real_tokenizer import write_tokenizer_gguf

    return write_tokenizer_gguf(tokenizer_dir, tmp_path_factory.mktemp("tok_gguf") / "tok.gguf")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_gguf):
    """Our Tokenizer rebuilt from tokenizer_gguf (mllama_q.tokenizer)."""
    from mllama_q.gguf_file import open_gguf
    from mllama_q.tokenizer import Tokenizer

    return Tokenizer.from_gguf(open_gguf(tokenizer_gguf))


@pytest.fixture(scope="session")
def child_env():
    """`child_env(**extra)` -> environment for a child Python that imports the same mllama_q as
    this process (installed, or the source tree with an in-place build), whatever its working
    directory, plus the `extra` variables."""
    import os
    from pathlib import Path

    import mllama_q

    root = str(Path(mllama_q.__file__).resolve().parents[1])

    def make(**extra) -> dict:
        # PYTHONSAFEPATH (Python >= 3.11): `python -c` / `-m` must not put the working directory
        # first on sys.path, or a child started in a source checkout without a built _core
        # imports that tree instead of the installed package (CI runs the tests from the clone).
        return dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
            PYTHONSAFEPATH="1",
            **extra,
        )

    return make


@pytest.fixture(scope="session")
def real_chat_template() -> str:
    """The Llama 3.2 Vision chat template real_tokenizer.py writes into tokenizer_dir."""
    from real_tokenizer import CHAT_TEMPLATE

    return CHAT_TEMPLATE


@pytest.fixture(scope="session")
def within():
    """`within(seconds, fn)` -> fn()'s result, computed in a helper thread: a hang (the
    regression a test guards against) fails that test after `seconds` instead of blocking the
    session. fn's exception is re-raised."""
    import threading

    def run(seconds: float, fn):
        box: dict = {}

        def target():
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001  re-raised below
                box["error"] = e

        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(seconds)
        assert not t.is_alive(), f"did not finish within {seconds} s"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return run
