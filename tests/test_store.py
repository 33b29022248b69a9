"""Models by Ollama name through a (fake) local Ollama store, and a hostile store.

The store is laid out as `ollama pull` leaves it (tests/ollama_writer.make_store, after
manifest/manifest.go and manifest/layer.go); the name rules are checked against the cases of
Ollama's own types/model/name_test.go (at 9db4bdbad^).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ollama_writer import add_blob, make_store  # noqa: E402
from test_model import make_cases, our_logits  # noqa: E402

import mllama_q  # noqa: E402
from mllama_q import store  # noqa: E402
from mllama_q.gguf_file import ModelFileError, ModelFileNotFoundError  # noqa: E402
from mllama_q.store import StoreError, parse_name, resolve_model  # noqa: E402

PART80 = "8" * 80
PART350 = "3" * 350


# ---------------------------------------------------------------------------
# Names: types/model/name_test.go
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,parts",
    [
        (
            "registry.ollama.ai/library/dolphin-mistral:7b-v2.6-dpo-laser-q6_K",
            ("registry.ollama.ai", "library", "dolphin-mistral", "7b-v2.6-dpo-laser-q6_K"),
        ),
        ("scheme://host:port/namespace/model:tag", ("host:port", "namespace", "model", "tag")),
        ("host/namespace/model:tag", ("host", "namespace", "model", "tag")),
        ("host:port/namespace/model:tag", ("host:port", "namespace", "model", "tag")),
        ("host/namespace/model", ("host", "namespace", "model", "latest")),
        ("host:port/namespace/model", ("host:port", "namespace", "model", "latest")),
        ("namespace/model", ("registry.ollama.ai", "namespace", "model", "latest")),
        ("model", ("registry.ollama.ai", "library", "model", "latest")),
        ("h/nn/mm:t", ("h", "nn", "mm", "t")),
        (f"{PART80}/{PART80}/{PART80}:{PART80}", (PART80, PART80, PART80, PART80)),
        (f"{PART350}/{PART80}/{PART80}:{PART80}", (PART350, PART80, PART80, PART80)),
    ],
)
def test_parse_name_parts_like_ollama(name, parts):  # TestParseNameParts (wantFilepath)
    assert parse_name(name).parts == parts


NAME_VALID = {  # testCases (ParseNameBare + IsFullyQualified)
    "": False,
    "_why/_the/_lucky:_stiff": True,
    "h/n/m:t": True,
    "host/namespace/model:tag": True,
    "host/namespace/model": False,
    "namespace/model": False,
    "model": False,
    f"{PART80}/{PART80}/{PART80}:{PART80}": True,
    f"{PART350}/{PART80}/{PART80}:{PART80}": True,
    "h/nn/mm:t": True,
    "m": False,
    "n/m:": False,
    "h/n/m": False,
    "@t": False,
    "m@d": False,
    "^": False,
    "mm:": False,
    "/nn/mm": False,
    "//": False,
    "//mm": False,
    "hh//": False,
    "//mm:@": False,
    "00@": False,
    "@": False,
    "-hh/nn/mm:tt": False,
    "hh/-nn/mm:tt": False,
    "hh/nn/-mm:tt": False,
    "hh/nn/mm:-tt": False,
    "host:https/namespace/model:tag": True,
    "host/name:space/model:tag": False,
}


@pytest.mark.parametrize("name", NAME_VALID)
def test_name_validity_like_ollama(name):
    if NAME_VALID[name]:
        parse_name(name, fill_defaults=False)
    else:
        with pytest.raises(StoreError, match="not a valid Ollama model name"):
            parse_name(name, fill_defaults=False)


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "a/../b", "x:../y", "model:..", "..", "a/b/c/d/e", "%2e%2e/m", "m\x00", "m/\u2025"]
)
def test_names_cannot_leave_the_store(tmp_path, monkeypatch, name):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFileError):  # StoreError / ModelFileNotFoundError (".." is a directory)
        resolve_model(name)


# ---------------------------------------------------------------------------
# Resolving and loading by name
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blobs(ollama_blobs):
    return ollama_blobs(1)


PARAMS = {
    "temperature": 0.25,
    "top_p": 0.8,
    "top_k": 7,
    "repeat_penalty": 1.1,
    "num_ctx": 2048,
    "stop": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "User:"],
}


@pytest.fixture
def root(tmp_path, monkeypatch):
    r = tmp_path / "models"
    monkeypatch.setenv("OLLAMA_MODELS", str(r))
    return r


def test_model_by_name(blobs, root):
    make_store(
        root,
        "llama3.2-vision",
        "latest",
        model=blobs["one"],
        params=PARAMS,
        system="Be brief.",
        template="{{ .Prompt }}",
        license="LICENSE TEXT",
    )
    path, proj, defaults = resolve_model("llama3.2-vision")
    assert os.path.samefile(path, blobs["one"]) and proj is None
    assert defaults == {
        "temperature": 0.25,
        "top_p": 0.8,
        "top_k": 7,
        "repetition_penalty": 1.1,
        "n_ctx": 2048,
        "stop": PARAMS["stop"],
        "system": "Be brief.",
    }
    m = mllama_q.Model("llama3.2-vision:latest", kv_type="f32")
    ref = mllama_q.Model(blobs["one"], kv_type="f32")
    case = make_cases(ref.image_token_id)["two_images_4_and_2_tiles"]
    np.testing.assert_array_equal(our_logits(m, case), our_logits(ref, case))
    # params -> sampling defaults; special-token stop strings -> stop ids, the rest stay strings.
    tok = m.tokenizer
    assert m.generation_defaults["temperature"] == 0.25 and m.generation_defaults["top_k"] == 7
    assert m.generation_defaults["stop"] == ["User:"]
    assert {tok.token_to_id(s) for s in PARAMS["stop"][:3]} <= set(m.stop_ids)
    assert m.store_defaults["system"] == "Be brief."


def test_two_file_pair_by_name_and_by_blob_path(blobs, root):
    make_store(root, "llama3.2-vision", "11b", model=blobs["text"], projector=blobs["proj"])
    path, proj, _ = resolve_model("llama3.2-vision:11b")
    assert os.path.samefile(proj, blobs["proj"])
    m = mllama_q.Model("llama3.2-vision:11b", kv_type="f32")
    ref = mllama_q.Model(blobs["text"], projector=blobs["proj"], kv_type="f32")
    case = make_cases(ref.image_token_id)["one_image_3_tiles"]
    np.testing.assert_array_equal(our_logits(m, case), our_logits(ref, case))
    # The text blob's own path inside the store finds its projector through the manifest.
    m2 = mllama_q.Model(path, kv_type="f32")
    assert m2.layout.projector_path is not None and os.path.samefile(m2.layout.projector_path, blobs["proj"])


def test_other_registries_namespaces_and_case(blobs, root):
    make_store(root, "Llama-Vision", "Q4", model=blobs["one"], host="hf.co", namespace="someone")
    assert os.path.samefile(resolve_model("hf.co/someone/Llama-Vision:Q4")[0], blobs["one"])
    assert os.path.samefile(resolve_model("hf.co/someone/llama-vision:q4")[0], blobs["one"])  # EqualFold
    with pytest.raises(ModelFileNotFoundError, match="mllama-q list"):
        resolve_model("someone/Llama-Vision:Q4")  # registry.ollama.ai, not hf.co


def test_not_found_and_directories(root, tmp_path):
    with pytest.raises(ModelFileNotFoundError, match=r"no Ollama model llama3\.2-vision:latest"):
        mllama_q.Model("llama3.2-vision")
    with pytest.raises(ModelFileNotFoundError, match="not found"):
        mllama_q.Model(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelFileError, match="is a directory"):
        mllama_q.Model(str(tmp_path))


def test_service_store_is_searched_without_ollama_models(monkeypatch):
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    assert store.store_roots()[-1] == store.SERVICE_ROOT


# ---------------------------------------------------------------------------
# A hostile store
# ---------------------------------------------------------------------------
def _manifest(root, name="m", tag="latest"):
    return root / "manifests" / "registry.ollama.ai" / "library" / name / tag


def _edit(root, fn, name="m"):
    p = _manifest(root, name)
    doc = json.loads(p.read_text())
    out = fn(doc)  # a str replaces the manifest's text; otherwise fn edited doc in place
    p.write_text(out if isinstance(out, str) else json.dumps(doc))


def _layer(root, media):
    doc = json.loads(_manifest(root).read_text())
    la = next(la for la in doc["layers"] if la["mediaType"].endswith(media))
    return root / "blobs" / la["digest"].replace(":", "-"), la


BAD_MANIFESTS = {
    "not json": (lambda d: "{not json", "not valid JSON"),
    "a list": (lambda d: "[]", "no 'layers' list"),
    "no layers": (lambda d: d.__delitem__("layers"), "no 'layers' list"),
    "layer not an object": (lambda d: d["layers"].append(3), "must be an object"),
    "bad digest": (lambda d: d["layers"][0].update(digest="sha256:abc"), "64 hex digits"),
    "traversal digest": (lambda d: d["layers"][0].update(digest="sha256:../../../../etc/passwd"), "64 hex digits"),
    "size not a number": (lambda d: d["layers"][0].update(size="7"), "not a byte count"),
    "negative size": (lambda d: d["layers"][0].update(size=-1), "not a byte count"),
    "no media type": (lambda d: d["layers"][0].__delitem__("mediaType"), "without a mediaType"),
    "no model layer": (
        lambda d: d.update(layers=[la for la in d["layers"] if not la["mediaType"].endswith("model")]),
        "0 model layers",
    ),
    "two model layers": (lambda d: d["layers"].append(dict(d["layers"][0])), "2 model layers"),
    "too many layers": (lambda d: d.update(layers=d["layers"] * 300), "layers"),
    "adapter": (
        lambda d: d["layers"].append(dict(d["layers"][0], mediaType="application/vnd.ollama.image.adapter")),
        "LoRA adapter",
    ),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_bad_manifests(blobs, root, case):
    make_store(root, "m", model=blobs["one"], params={"temperature": 0.5})
    fn, match = BAD_MANIFESTS[case]
    _edit(root, fn)
    with pytest.raises(StoreError, match=match):
        mllama_q.Model("m")


def test_huge_manifest_is_not_read(blobs, root):
    make_store(root, "m", model=blobs["one"])
    with open(_manifest(root), "ab") as f:
        f.write(b" " * (store.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(StoreError, match="too large"):
        resolve_model("m")


@pytest.mark.parametrize("case", ["missing", "dangling symlink", "truncated", "device", "directory"])
def test_bad_model_blobs(blobs, root, case):
    make_store(root, "m", model=blobs["one"])
    blob, la = _layer(root, "model")
    blob.unlink()
    if case == "dangling symlink":
        blob.symlink_to(root / "nowhere")
    elif case == "truncated":
        shutil.copyfile(blobs["one"], blob)
        with open(blob, "r+b") as f:
            f.truncate(la["size"] - 100)
    elif case == "device":
        blob.symlink_to("/dev/zero")
    elif case == "directory":
        blob.mkdir()
    match = {
        "missing": "missing",
        "dangling symlink": "dangling symlink",
        "truncated": "manifest says",
        "device": "not a regular file",
        "directory": "not a regular file",
    }[case]
    with pytest.raises(StoreError, match=match):
        mllama_q.Model("m")


def test_symlinked_blob_to_a_regular_file_is_followed(blobs, root):
    make_store(root, "m", model=blobs["one"])
    blob, _ = _layer(root, "model")
    blob.unlink()
    blob.symlink_to(blobs["one"])
    assert mllama_q.Model("m", vision=False).n_ctx == 4096


BAD_PARAMS = {
    "not json": (b"{", "not valid JSON"),
    "not an object": (b"[1]", "not a JSON object"),
    "temperature text": (b'{"temperature": "hot"}', "temperature must be a number"),
    "temperature nan": (b'{"temperature": NaN}', "outside"),
    "top_p too big": (b'{"top_p": 2}', "outside"),
    "top_k fraction": (b'{"top_k": 1.5}', "integer"),
    "empty stop": (b'{"stop": [""]}', "non-empty strings"),
    "stop not strings": (b'{"stop": [1]}', "non-empty strings"),
}


@pytest.mark.parametrize("case", BAD_PARAMS)
def test_bad_params_layers(blobs, root, case):
    data, match = BAD_PARAMS[case]
    make_store(root, "m", model=blobs["one"])
    digest, size = add_blob(root, data)
    _edit(
        root,
        lambda d: d["layers"].append(
            {"mediaType": "application/vnd.ollama.image.params", "digest": f"sha256:{digest}", "size": size}
        ),
    )
    with pytest.raises(StoreError, match=match):
        resolve_model("m")


def test_small_layers_are_hash_checked_big_ones_on_request(blobs, root):
    make_store(root, "m", model=blobs["one"], params={"temperature": 0.5})
    pblob, _ = _layer(root, "params")
    pblob.write_bytes(pblob.read_bytes().replace(b"0.5", b"0.9"))  # same size, other content
    with pytest.raises(StoreError, match="does not match its sha256"):
        resolve_model("m")
    # The model blob: same size, one byte changed -> only verify=True notices.
    make_store(root, "n", model=blobs["one"])
    doc = json.loads(_manifest(root, "n").read_text())
    la = next(la for la in doc["layers"] if la["mediaType"].endswith("model"))
    blob = root / "blobs" / la["digest"].replace(":", "-")
    blob.unlink()  # a hard link to the fixture's file: replace it by a copy before editing
    shutil.copyfile(blobs["one"], blob)
    with open(blob, "r+b") as f:
        f.seek(la["size"] - 1)
        f.write(b"\x01")
    resolve_model("n")  # the size is right: not hashed on the load path
    with pytest.raises(StoreError, match="has sha256"):
        resolve_model("n", verify=True)


def test_verify_passes_on_a_good_store(blobs, root):
    make_store(root, "m", model=blobs["text"], projector=blobs["proj"])
    seen = []
    r = store.resolve_name("m", verify=True, progress=lambda done, total: seen.append((done, total)))
    assert r.projector_path is not None and seen and seen[-1][0] == seen[-1][1]


def test_list_store(blobs, root):
    make_store(root, "llama3.2-vision", "latest", model=blobs["one"], file_type="Q4_K_M")
    make_store(root, "llama3.2-vision", "old", model=blobs["text"], projector=blobs["proj"])
    make_store(root, "qwen", "latest", model=blobs["one"], family="qwen2")
    make_store(root, "broken", "latest", model=blobs["one"])
    _edit(root, lambda d: "{", name="broken")
    (root / "manifests" / "registry.ollama.ai" / "library" / "..bad").mkdir()
    entries = {str(e.name): e for e in store.list_store()}
    assert set(entries) == {"llama3.2-vision:latest", "llama3.2-vision:old", "qwen:latest", "broken:latest"}
    one, two = entries["llama3.2-vision:latest"], entries["llama3.2-vision:old"]
    assert one.is_mllama and one.file_type == "Q4_K_M" and one.layout.startswith("ollama one-file")
    assert one.size == os.path.getsize(blobs["one"])
    assert two.layout.startswith("ollama two-file")
    assert two.size == os.path.getsize(blobs["text"]) + os.path.getsize(blobs["proj"])
    assert not entries["qwen:latest"].is_mllama
    assert "not valid JSON" in entries["broken:latest"].problem


def test_params_stop_string_ends_generation(blobs, root, tmp_path):
    """A stop string from the manifest's params layer is a generate() default: find text the tiny
    model really produces (greedy), make part of it the params' stop string, and generation
    must end there with stop_reason "stop_string"."""
    free = mllama_q.Model(blobs["one"], vision=False).generate(prompt="Hello", max_new_tokens=24, temperature=0)
    text = free.text
    assert len(text) >= 8
    stop = text[4:8]
    make_store(root, "s", model=blobs["one"], params={"stop": [stop], "temperature": 0})
    m = mllama_q.Model("s", vision=False)
    res = m.generate(prompt="Hello", max_new_tokens=24)
    assert res.stop_reason == "stop_string" and res.text == text[: text.find(stop)]
    assert m.generate(prompt="Hello", max_new_tokens=24, stop=["\x00never"]).text == text  # explicit wins


# ---------------------------------------------------------------------------
# Command line: mllama-q list / run NAME
# ---------------------------------------------------------------------------
def test_cli_list(blobs, root, tmp_path, monkeypatch, capsys):
    from mllama_q.cli import main

    cache = tmp_path / "cache"
    cache.mkdir()
    os.link(blobs["one"], cache / "mine.gguf")
    (cache / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 40)
    monkeypatch.setenv("MLLAMA_Q_CACHE", str(cache))
    make_store(root, "llama3.2-vision", "latest", model=blobs["one"], file_type="Q4_K_M")
    make_store(root, "llama3.2-vision", "old", model=blobs["text"], projector=blobs["proj"])
    make_store(root, "qwen", "latest", model=blobs["one"], family="qwen2")
    make_store(root, "gone", "latest", model=blobs["one"])
    doc = json.loads(_manifest(root, "gone").read_text())
    doc["layers"][0]["size"] += 1
    _manifest(root, "gone").write_text(json.dumps(doc))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln and not ln.startswith(("NAME", "("))}
    assert "Q4_K_M" in lines["llama3.2-vision:latest"] and "ollama one-file" in lines["llama3.2-vision:latest"]
    assert "ollama two-file" in lines["llama3.2-vision:old"]
    assert "PROBLEM" in lines["gone:latest"] and "manifest says" in lines["gone:latest"]
    assert "Ollama one-file" in lines[str(cache / "mine.gguf")] and "F16" in lines[str(cache / "mine.gguf")]
    assert "PROBLEM" in lines[str(cache / "junk.gguf")]
    assert "qwen:latest" not in lines and "1 other Ollama model" in out
    assert main(["list", "--json", "--all"]) == 0
    doc = json.loads(capsys.readouterr().out)
    names = {m["name"] for m in doc["models"]}
    assert "qwen:latest" in names and doc["other_ollama_models"] == 0


def test_cli_run_by_name(blobs, root, capsys):
    from mllama_q.cli import main

    make_store(
        root, "llama3.2-vision", "latest", model=blobs["one"], system="Answer in one word.", params={"temperature": 0}
    )
    assert main(["run", "llama3.2-vision", "-p", "Hello there", "-n", "6", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    m = mllama_q.Model(blobs["one"], vision=False)
    ref = m.generate(
        messages=[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hello there"}],
        max_new_tokens=6,
        temperature=0,
    )
    assert got["text"] == ref.text and got["prompt_tokens"] == ref.prompt_tokens
    assert main(["run", "no-such-model", "-p", "x"]) == 1
    assert "no Ollama model no-such-model:latest" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "-p", "x"])  # no model at all
