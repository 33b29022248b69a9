"""`mllama-q serve NAME`: a model of the (fake) local Ollama store served by its Ollama name,
with the real `ollama` and `openai` clients.

References: Ollama's own server at 9db4bdbad^ (the listing, server/model_list_cache.go
buildModelListSummary: DisplayShortest name, sha256 of the manifest file as digest, its mtime,
every layer's size plus the config's, details from the config blob; ShowHandler's `system`;
ChatHandler: the model's system message opens a conversation that has none), and the Python
API on the blob itself, given the system message and sampling explicitly (what the manifest's
layers must turn into). The store is the one tests/ollama_writer.make_store writes, the way
`ollama pull` leaves it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("ollama")

from ollama_writer import make_store  # noqa: E402
from PIL import Image  # noqa: E402

import mllama_q  # noqa: E402

SYSTEM = "Answer in one word."
USER = "Hello there, who are you?"
N_CTX = 1024


def _serve(model, env, *args, **kw):
    from mllama_q.cli.serve import ServerProcess

    return ServerProcess(model, "--n-ctx", str(N_CTX), *args, env=env, **kw)


@pytest.fixture(scope="module")
def blobs(ollama_blobs):
    return ollama_blobs(3)


@pytest.fixture(scope="module")
def ref(blobs):
    """The Python API on the one-file blob by path (no store, so no manifest defaults)."""
    return mllama_q.Model(blobs["one"], n_ctx=N_CTX)


@pytest.fixture(scope="module")
def greedy(ref):
    """What the model says, greedily, to SYSTEM + USER; and a stop string cut from it."""
    text = ref.generate(
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
        max_new_tokens=24,
        temperature=0,
    ).text
    assert len(text) >= 8, text
    return text, text[4:8]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, blobs, greedy):
    root = tmp_path_factory.mktemp("ollama_models")
    _, stop = greedy
    make_store(
        root,
        "llama3.2-vision",
        "latest",
        model=blobs["one"],
        system=SYSTEM,
        params={"temperature": 0, "stop": ["<|eot_id|>", stop]},
        file_type="Q4_K_M",
    )
    make_store(root, "llama3.2-vision", "11b", model=blobs["text"], projector=blobs["proj"], params={"temperature": 0})
    return root


@pytest.fixture(scope="module")
def server(store_root, child_env):
    s = _serve("llama3.2-vision", child_env(OLLAMA_MODELS=str(store_root)))
    yield s
    s.stop()


@pytest.fixture
def oll(server):
    import ollama

    return ollama.Client(host=server.url, timeout=60)


def _manifest(root, tag):
    return root / "manifests" / "registry.ollama.ai" / "library" / "llama3.2-vision" / tag


def test_listing_is_ollamas(oll, server, store_root):
    path = _manifest(store_root, "latest")
    doc = json.loads(path.read_text())
    tags = oll.list().models
    assert len(tags) == 1
    m = tags[0]
    assert m.model == "llama3.2-vision:latest"
    assert m.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m.size == sum(la["size"] for la in doc["layers"]) + doc["config"]["size"]
    assert abs(m.modified_at.timestamp() - path.stat().st_mtime) < 1e-3
    d = m.details
    assert (d.format, d.family, d.families, d.parameter_size, d.quantization_level) == (
        "gguf",
        "mllama",
        ["mllama"],
        "tiny",
        "Q4_K_M",
    )  # the config blob's, as Ollama lists them

    show = oll.show("llama3.2-vision")
    raw = httpx.post(server.url + "/api/show", json={"model": "llama3.2-vision"}, timeout=30).json()
    assert raw["system"] == SYSTEM  # api/types.go ShowResponse.System (the Python client drops it)
    assert "vision" in show.capabilities
    assert f'SYSTEM """{SYSTEM}"""' in show.modelfile
    lines = [ln.split(None, 1) for ln in show.parameters.splitlines()]
    assert ["temperature", "0.0"] in lines and ["stop", '"<|eot_id|>"'] in lines
    import ollama

    with pytest.raises(ollama.ResponseError) as e:
        oll.show("llama3.2-vision:11b")  # another model of the store: not the one served
    assert e.value.status_code == 404


def test_chat_gets_the_manifests_system_message_and_params(oll, server, ref, greedy):
    text, stop = greedy
    expected = text[: text.find(stop)]
    # No system message and no options: the manifest's system message, temperature 0 and stop string.
    r = oll.chat(model="llama3.2-vision", messages=[{"role": "user", "content": USER}], options={"num_predict": 24})
    assert r.message.content == expected and r.done_reason == "stop"
    # A conversation that opens with its own system message keeps it alone (Ollama's ChatHandler).
    own = [{"role": "system", "content": "Be verbose."}, {"role": "user", "content": USER}]
    want = ref.generate(messages=own, max_new_tokens=6, temperature=0, stop=[stop]).text
    r = oll.chat(model="llama3.2-vision:latest", messages=own, options={"num_predict": 6})
    assert r.message.content == want
    # /api/generate (templated): the model's system message too; a request's stop list replaces the manifest's.
    g = oll.generate(model="llama3.2-vision", prompt=USER, options={"num_predict": 24, "stop": ["\x00never"]})
    assert g.response == text


def test_openai_client_by_ollama_names(server, greedy):
    import openai

    text, stop = greedy
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    ids = [m.id for m in client.models.list().data]
    assert ids == ["llama3.2-vision:latest"]
    for name in ("llama3.2-vision", "registry.ollama.ai/library/llama3.2-vision:latest"):
        r = client.chat.completions.create(model=name, max_tokens=24, messages=[{"role": "user", "content": USER}])
        assert r.choices[0].message.content == text[: text.find(stop)]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="llama3.2-vision:11b", max_tokens=2, messages=[{"role": "user", "content": USER}]
        )


def test_two_file_pair_by_name_with_an_image(store_root, blobs, child_env):
    """llama3.2-vision:11b is a text blob + projector pair: the server finds the projector in the
    manifest and answers about an image as the Python API does on the two files."""
    import ollama

    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(buf, format="PNG")
    ref = mllama_q.Model(blobs["text"], projector=blobs["proj"], n_ctx=N_CTX)
    assert ref.has_vision
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    want = ref.generate(
        messages=msgs, images=[Image.open(io.BytesIO(buf.getvalue()))], max_new_tokens=8, temperature=0
    ).text
    with _serve("llama3.2-vision:11b", child_env(OLLAMA_MODELS=str(store_root))) as s:
        c = ollama.Client(host=s.url, timeout=60)
        assert c.show("llama3.2-vision:11b").capabilities == ["completion", "vision"]
        r = c.chat(
            model="llama3.2-vision:11b",
            options={"num_predict": 8},
            messages=[
                {"role": "user", "content": "What is it?", "images": [base64.b64encode(buf.getvalue()).decode()]}
            ],
        )
        assert r.message.content == want


def _serve_fails(args, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mllama_q", "serve", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_bad_names_and_broken_store_entries_fail_before_listening(store_root, tmp_path, child_env, blobs):
    env = child_env(OLLAMA_MODELS=str(store_root))
    r = _serve_fails(["no-such-model"], env)  # MODEL positional, as for run / chat
    assert r.returncode == 1 and "no Ollama model no-such-model:latest" in r.stderr
    assert "listening" not in r.stderr
    r = _serve_fails(["-m", "../../etc/passwd:x"], env)
    assert r.returncode == 1 and "listening" not in r.stderr
    r = _serve_fails(["-m", "llama3.2-vision", "--ollama-converter", "v9"], env)
    assert r.returncode == 2 and "--ollama-converter" in r.stderr
    r = _serve_fails(["llama3.2-vision", "-m", "llama3.2-vision"], env)
    assert r.returncode == 2 and "give the model once" in r.stderr
    # A manifest whose model layer's size disagrees with the blob (an interrupted pull).
    broken = tmp_path / "models"
    make_store(broken, "llama3.2-vision", "latest", model=blobs["one"])
    path = _manifest(broken, "latest")
    doc = json.loads(path.read_text())
    doc["layers"][0]["size"] += 1
    path.write_text(json.dumps(doc))
    r = _serve_fails(["-m", "llama3.2-vision"], child_env(OLLAMA_MODELS=str(broken)))
    assert r.returncode == 1 and "manifest says" in r.stderr and "ollama pull" in r.stderr


def test_text_blob_without_its_projector_is_served_text_only_with_a_warning(blobs, child_env):
    with _serve(blobs["text"], child_env()) as s:
        assert any("projector" in ln and "text-only" in ln for ln in s.lines), "".join(s.lines)
        assert httpx.post(s.url + "/api/show", json={"model": "text"}, timeout=30).json()["capabilities"] == [
            "completion"
        ]
