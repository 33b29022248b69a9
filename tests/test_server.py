"""`mllama-q serve` against the real client libraries (`openai`, `ollama`) and raw HTTP (httpx),
with a live server process on 127.0.0.1 (a free port) serving the tiny synthetic model.

References: the Python API's own greedy (or seeded) output for the same conversation
(`Model.generate`) is the expected text ("HTTP equals Python API"); the response shapes are
what the real clients parse (their pydantic models) and the documented formats (OpenAI's SSE
ending in `data: [DONE]`, Ollama's NDJSON with nanosecond durations); model facts come from
gguf-py reading the file.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

N_CTX = 2048
MAX_IMAGES = 3
MAX_BODY_MB = 2


def LiveServer(model, *args, **kw):
    from mllama_q.cli.serve import ServerProcess

    return ServerProcess(model, *args, **kw)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    from mllama_q.cli.synthetic import write_synthetic_gguf

    return write_synthetic_gguf(tmp_path_factory.mktemp("serve") / "tiny.gguf", "tiny", "q4_k_m", progress=False)


@pytest.fixture(scope="module")
def ref(tiny_path):
    """The Python API on the same file: the reference outputs."""
    from mllama_q import Model

    return Model(tiny_path, n_ctx=N_CTX)


@pytest.fixture(scope="module")
def server(tiny_path):
    s = LiveServer(
        tiny_path,
        "--parallel",
        "2",
        "--n-ctx",
        str(N_CTX),
        "--max-images",
        str(MAX_IMAGES),
        "--max-body-mb",
        str(MAX_BODY_MB),
        "--alias",
        "tiny",
        "--alias",
        "llama3.2-vision",
    )
    yield s
    s.stop()


MODEL = "tiny"


@pytest.fixture
def oai(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def oll(server):
    import ollama

    return ollama.Client(host=server.url, timeout=60)


def _image_bytes(seed: int, size=(90, 70), fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _expect(ref, messages=None, prompt=None, images=(), **kw):
    """The Python API's answer for the same request (greedy unless told)."""
    kw.setdefault("temperature", 0)
    return ref.generate(messages=messages, prompt=prompt, images=[_pil(b) for b in images] or None, **kw)


# --------------------------------------------------------------------------------------------
# OpenAI API through the `openai` client
# --------------------------------------------------------------------------------------------


def test_openai_chat_equals_python_api(oai, ref):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
    want = _expect(ref, msgs, max_new_tokens=24)
    got = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.model == MODEL and len(got.choices) == 1
    c = got.choices[0]
    assert c.message.role == "assistant" and c.message.content == want.text
    assert c.finish_reason == {"length": "length", "stop_token": "stop"}[want.stop_reason]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert got.usage.total_tokens == want.prompt_tokens + want.completion_tokens


def test_openai_chat_stream_with_images(oai, ref):
    img1, img2 = _image_bytes(1), _image_bytes(2, (60, 120), "JPEG")
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_url(img1)}},
                {"type": "text", "text": "Compare this"},
                {"type": "image_url", "image_url": {"url": _data_url(img2, "image/jpeg"), "detail": "high"}},
                {"type": "text", "text": "with this."},
            ],
        }
    ]
    ref_msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Compare this"},
                {"type": "image"},
                {"type": "text", "text": "with this."},
            ],
        }
    ]
    want = _expect(ref, ref_msgs, images=[img1, img2], max_new_tokens=20)
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=msgs,
            max_completion_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want.text
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.completion_tokens
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_openai_sse_wire_format(server, ref):
    """The raw stream: `data: {json}` events and a final `data: [DONE]`; no usage chunk unless asked."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in r.iter_lines() if ln]
    assert events[-1] == "data: [DONE]"
    objs = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all(e.startswith("data: ") for e in events)
    assert all("usage" not in o for o in objs)
    assert (
        "".join(o["choices"][0]["delta"].get("content", "") for o in objs)
        == _expect(ref, body["messages"], max_new_tokens=5).text
    )


def test_openai_completions(oai, ref):
    prompt = "Once upon a time"
    want = _expect(ref, prompt=prompt, max_new_tokens=12)
    got = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert got.object == "text_completion" and got.choices[0].text == want.text
    assert got.usage.prompt_tokens == want.prompt_tokens
    streamed = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text
    assert streamed[-1].choices[0].finish_reason == "length"
    # OpenAI's default max_tokens for completions is 16
    assert oai.completions.create(model=MODEL, prompt=prompt, temperature=0).usage.completion_tokens == 16


def test_openai_seeded_sampling_equals_python_api(oai, ref):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    want = _expect(ref, msgs, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    got = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    assert got.choices[0].message.content == want.text
    other = _expect(ref, msgs, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=1235)
    assert other.text != want.text  # the seed is really used


def test_openai_stop_string(oai, ref):
    msgs = [{"role": "user", "content": "Count."}]
    full = _expect(ref, msgs, max_new_tokens=24).text
    stop = full[6:9]
    want = _expect(ref, msgs, max_new_tokens=24, stop=[stop])
    assert want.stop_reason == "stop_string" and want.text == full[: full.index(stop)]
    got = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0, stop=stop)
    assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == "stop"


def test_openai_models(oai, server, tiny_path):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].object == "model"
    assert oai.models.retrieve("llama3.2-vision").id == MODEL
    import openai

    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4o")


# --------------------------------------------------------------------------------------------
# Ollama API through the `ollama` client
# --------------------------------------------------------------------------------------------


def test_ollama_chat_with_image(oll, ref):
    img = _image_bytes(3)
    msgs = [{"role": "user", "content": "What is in this picture?", "images": [img]}]
    ref_msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}]
    want = _expect(ref, ref_msgs, images=[img], max_new_tokens=18)
    r = oll.chat(model="llama3.2-vision", messages=msgs, options={"num_predict": 18, "temperature": 0}, stream=False)
    assert r.message.role == "assistant" and r.message.content == want.text
    assert r.done is True and r.done_reason == "length"
    assert r.model == "llama3.2-vision"
    assert (r.prompt_eval_count, r.eval_count) == (want.prompt_tokens, want.completion_tokens)
    for k in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(r, k), int) and getattr(r, k) > 0, k
    assert r.total_duration >= r.eval_duration + r.prompt_eval_duration
    # streaming (the default): pieces, then one final chunk with the stats
    parts = list(
        oll.chat(model="llama3.2-vision", messages=msgs, options={"num_predict": 18, "temperature": 0}, stream=True)
    )
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason == "length"
    assert "".join(p.message.content for p in parts) == want.text
    assert parts[-1].eval_count == want.completion_tokens


def test_ollama_generate(oll, ref):
    img = _image_bytes(4)
    want = _expect(
        ref,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
        ],
        images=[img],
        max_new_tokens=10,
    )
    r = oll.generate(
        model=MODEL, prompt="Describe.", system="Be brief.", images=[img], options={"num_predict": 10, "temperature": 0}
    )
    assert r.response == want.text and r.done and r.eval_count == want.completion_tokens
    # raw: the prompt as-is, the image token placed first
    raw_want = _expect(ref, prompt="<|image|>raw text", images=[img], max_new_tokens=7)
    r = oll.generate(
        model=MODEL, prompt="raw text", raw=True, images=[img], options={"num_predict": 7, "temperature": 0}
    )
    assert r.response == raw_want.text
    streamed = list(
        oll.generate(
            model=MODEL,
            prompt="raw text",
            raw=True,
            images=[img],
            stream=True,
            options={"num_predict": 7, "temperature": 0},
        )
    )
    assert "".join(p.response for p in streamed) == raw_want.text and streamed[-1].done


def test_ollama_options_map_to_sampling(oll, ref):
    msgs = [{"role": "user", "content": "Sample something."}]
    opts = {
        "num_predict": 14,
        "temperature": 0.8,
        "top_k": 50,
        "top_p": 0.9,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
        "seed": 77,
        "num_thread": 3,
        "unknown_option": True,
    }
    want = _expect(
        ref, msgs, max_new_tokens=14, temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=77
    )
    r = oll.chat(model=MODEL, messages=msgs, options=opts)
    assert r.message.content == want.text


def test_ollama_num_ctx_limits_the_answer(oll, ref):
    msgs = [{"role": "user", "content": "hello"}]
    n_prompt = _expect(ref, msgs, max_new_tokens=1).prompt_tokens
    r = oll.chat(model=MODEL, messages=msgs, options={"num_ctx": n_prompt + 5, "temperature": 0, "num_predict": 50})
    assert r.eval_count == 5 and r.done_reason == "length"


def test_ollama_load_and_unload_answers(server):
    r = httpx.post(server.url + "/api/chat", json={"model": MODEL, "messages": []}, timeout=30).json()
    assert r["done"] is True and r["done_reason"] == "load" and r["message"] == {"role": "assistant", "content": ""}
    r = httpx.post(server.url + "/api/generate", json={"model": MODEL, "keep_alive": 0}, timeout=30).json()
    assert r["done_reason"] == "unload" and r["response"] == ""


def test_ollama_listing(oll, server, tiny_path):
    import gguf

    reader = gguf.GGUFReader(str(tiny_path))
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    ftype = int(reader.fields["general.file_type"].contents())
    quant = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_")

    tags = oll.list().models
    assert len(tags) == 1 and tags[0].model == "tiny:latest"
    assert tags[0].size == tiny_path.stat().st_size
    d = tags[0].details
    assert (d.format, d.family, d.families, d.quantization_level) == ("gguf", "mllama", ["mllama"], quant)
    assert abs(tags[0].modified_at.timestamp() - tiny_path.stat().st_mtime) < 1e-3

    show = oll.show("tiny")
    assert show.modelinfo["general.architecture"] == "mllama"
    assert show.modelinfo["general.parameter_count"] == n_params
    assert show.modelinfo["mllama.block_count"] == int(reader.fields["mllama.block_count"].contents())
    assert show.modelinfo["tokenizer.ggml.tokens"] == []  # arrays only with verbose, as Ollama does
    assert "vision" in show.capabilities and "completion" in show.capabilities
    assert show.template == reader.fields["tokenizer.chat_template"].contents()
    verbose = httpx.post(server.url + "/api/show", json={"model": "tiny", "verbose": True}, timeout=30).json()
    assert verbose["model_info"]["tokenizer.ggml.tokens"] == reader.fields["tokenizer.ggml.tokens"].contents()

    ps = oll.ps().models
    assert len(ps) == 1 and ps[0].model == "tiny:latest" and ps[0].context_length == N_CTX and ps[0].size_vram == 0
    assert ps[0].expires_at.year > 2100  # never unloaded (Ollama's keep_alive < 0)

    import ollama

    with pytest.raises(ollama.ResponseError) as e:
        oll.show("llava")
    assert e.value.status_code == 404 and e.value.error == "model 'llava' not found"

    v = httpx.get(server.url + "/api/version", timeout=10)
    assert v.status_code == 200 and isinstance(v.json()["version"], str)
    head = httpx.head(server.url + "/", timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert "Ollama is running" in httpx.get(server.url + "/", timeout=10).text


def test_ollama_ndjson_wire_format(server, ref):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": 4, "temperature": 0},
    }
    with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(ln) for ln in r.iter_lines() if ln]
    assert all(ln["created_at"].endswith("Z") for ln in lines)
    assert [ln["done"] for ln in lines] == [False] * (len(lines) - 1) + [True]
    final = lines[-1]
    assert final["message"] == {"role": "assistant", "content": ""}
    assert {
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
        "done_reason",
    } <= set(final)
    assert "".join(ln["message"]["content"] for ln in lines) == _expect(ref, body["messages"], max_new_tokens=4).text


# --------------------------------------------------------------------------------------------
# Concurrency, slots, disconnects
# --------------------------------------------------------------------------------------------


def _conversations(n):
    return [[{"role": "user", "content": f"Question number {i}: " + "why " * (i % 5)}] for i in range(n)]


def test_concurrent_clients_equal_one_by_one(server, ref):
    import ollama
    import openai

    convs = _conversations(8)
    want = [_expect(ref, c, max_new_tokens=20 + 3 * i).text for i, c in enumerate(convs)]

    def ask(i):
        c, n = convs[i], 20 + 3 * i
        if i % 3 == 0:
            cl = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
            return (
                cl.chat.completions.create(model=MODEL, messages=c, max_tokens=n, temperature=0)
                .choices[0]
                .message.content
            )
        if i % 3 == 1:
            cl = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
            s = cl.chat.completions.create(model=MODEL, messages=c, max_tokens=n, temperature=0, stream=True)
            return "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
        cl = ollama.Client(host=server.url, timeout=120)
        return "".join(
            p.message.content
            for p in cl.chat(model=MODEL, messages=c, stream=True, options={"num_predict": n, "temperature": 0})
        )

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(ask, range(8)))
    assert got == want


def test_follow_up_turn_goes_to_its_slot(server):
    """Open WebUI resends the whole conversation: turn 2 must land on the slot holding turn 1,
    even after another conversation ran in between."""
    img = _image_bytes(5)

    def post(messages):
        r = httpx.post(
            server.url + "/v1/chat/completions",
            timeout=60,
            json={"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        post.usage = r.json()["usage"]
        return int(r.headers["x-mllama-q-slot"]), r.json()["choices"][0]["message"]["content"]

    conv = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_url(img)}},
                {"type": "text", "text": "A long first question about this image " * 8},
            ],
        }
    ]
    slot1, answer = post(conv)
    first_prompt = post.usage["prompt_tokens"]
    assert post.usage["prompt_tokens_details"]["cached_tokens"] == 0
    other = [{"role": "user", "content": "Something unrelated entirely, " * 6}]
    slot_other, _ = post(other)
    assert slot_other != slot1  # LRU: the idle slot that does not hold the conversation
    conv2 = conv + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    slot2, _ = post(conv2)
    assert slot2 == slot1
    # ... and reuses its cache: turn 1's prompt (image included) is not evaluated again; what
    # is new is the reply from where its re-tokenized text first differs from the sampled ids (a
    # random model's 8 tokens can re-tokenize into more: up to ~4 per token seen), the template's
    # tail and "And then?".
    usage = post.usage
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert first_prompt <= cached < usage["prompt_tokens"] < cached + 8 * 4 + 25, usage
    # The same text with a different image is another conversation: its common prefix with that
    # slot ends at the image, so it goes to the least recently used slot (the other one) instead
    # of the most similar token sequence.
    conv3 = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": _data_url(_image_bytes(6))}}, conv[0]["content"][1]],
        }
    ] + conv2[1:]
    slot3, _ = post(conv3)
    assert slot3 == slot_other


def _slots(server):
    return httpx.get(server.url + "/slots", timeout=10).json()


def _until(cond, timeout=30.0, poll=0.02):
    """Polls cond() until it returns a true value or `timeout` seconds pass; returns its last
    value (the caller asserts on it, so a timeout fails with what was seen last)."""
    t_end = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() >= t_end:
            return v
        time.sleep(poll)


def test_disconnect_mid_stream_frees_the_slot(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Go on forever."}],
        "max_tokens": N_CTX - 100,
        "temperature": 0,
        "stream": True,
    }
    before = {s["id"]: s["requests"] for s in _slots(server)["slots"]}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            slot = int(r.headers["x-mllama-q-slot"])
            it = r.iter_lines()
            next(it)
            next(it)  # the role chunk and at least one token
        # leaving the block closes the connection mid-stream

    def slot_state():
        s = {x["id"]: x for x in _slots(server)["slots"]}[slot]
        return s if s["requests"] > before[slot] and not s["busy"] else None

    s = _until(slot_state) or {x["id"]: x for x in _slots(server)["slots"]}[slot]
    assert s["requests"] == before[slot] + 1 and not s["busy"]
    assert s["last"]["stop"] == "cancelled" and s["last"]["generated"] < s["last"]["max_new_tokens"]
    # Ollama NDJSON stream too
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Again, forever."}],
        "options": {"num_predict": N_CTX - 100, "temperature": 0},
    }
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/api/chat", json=body) as r:
            slot = int(r.headers["x-mllama-q-slot"])
            lines = r.iter_lines()
            next(lines)
    _until(lambda: not _slots(server)["slots"][slot]["busy"])
    last = _slots(server)["slots"][slot]["last"]
    assert last["stop"] == "cancelled" and last["generated"] < last["max_new_tokens"]
    # the access log line is written when the response ends
    logged = _until(lambda: server.log_lines("client-disconnected"))
    assert any("POST /api/chat" in ln for ln in logged)


def test_queued_requests_beyond_the_slots(server, ref):
    """More concurrent requests than slots: all are served (queued FIFO), none fails."""
    convs = _conversations(6)
    want = [_expect(ref, c, max_new_tokens=40).text for c in convs]

    def ask(c):
        r = httpx.post(
            server.url + "/api/chat",
            timeout=120,
            json={"model": MODEL, "messages": c, "stream": False, "options": {"num_predict": 40, "temperature": 0}},
        )
        return r.status_code, r.json()["message"]["content"]

    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(ask, convs))
    assert got == [(200, w) for w in want]


# --------------------------------------------------------------------------------------------
# Bad input: the right status and error body, and the server keeps serving
# --------------------------------------------------------------------------------------------


def _png_declaring(w: int, h: int) -> bytes:
    """A valid PNG header (CRCs right) declaring a w x h canvas with almost no data: a
    decompression bomb's shape, refused from the header before any pixel buffer exists."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _oai_img(url):
    return {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
            }
        ],
    }


def _oll_img(b64):
    return {
        "model": MODEL,
        "stream": False,
        "options": {"num_predict": 2},
        "messages": [{"role": "user", "content": "?", "images": [b64]}],
    }


_PNG = _image_bytes(9)
_B64 = base64.b64encode(_PNG).decode()
CHAT, OCHAT, GEN, COMP = "/v1/chat/completions", "/api/chat", "/api/generate", "/v1/completions"
_OK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
_OOK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False, "options": {"num_predict": 2}}

BAD = {
    # malformed bodies
    "json_syntax": (CHAT, b'{"model": "tiny", "messages": [', 400, "invalid JSON"),
    "json_syntax_ollama": (OCHAT, b"{bad json", 400, "invalid JSON"),
    "empty_body": (OCHAT, b"", 400, "missing request body"),
    "not_an_object": (CHAT, b"[1, 2]", 400, "must be a JSON object"),
    "nan": (CHAT, b'{"model": "tiny", "messages": [], "temperature": NaN}', 400, "NaN"),
    "deep_nesting": (CHAT, b"[" * 100000 + b"]" * 100000, 400, "invalid JSON"),
    "not_utf8": (CHAT, b'{"model": "\xff\xfe"}', 400, "UTF-8"),
    # wrong types
    "messages_string": (CHAT, {"model": MODEL, "messages": "hello"}, 400, "'messages' must be an array"),
    "message_not_object": (CHAT, {"model": MODEL, "messages": [1]}, 400, "messages[0]"),
    "content_number": (
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    "max_tokens_string": (CHAT, {**_OK, "max_tokens": "10"}, 400, "'max_tokens' must be an integer"),
    "stream_string": (CHAT, {**_OK, "stream": "yes"}, 400, "'stream' must be a boolean"),
    "model_number": (CHAT, {**_OK, "model": 5}, 400, "'model' must be a string"),
    "ollama_option_type": (OCHAT, {**_OOK, "options": {"temperature": "hot"}}, 400, "options.temperature"),
    "ollama_content_list": (
        OCHAT,
        {**_OOK, "messages": [{"role": "user", "content": ["a"]}]},
        400,
        "messages[0].content",
    ),
    "unknown_part": (
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        400,
        "input_audio",
    ),
    "bad_role": (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    # model names
    "model_missing": (CHAT, {"messages": _OK["messages"]}, 400, "model"),
    "model_missing_ollama": (OCHAT, {"messages": _OOK["messages"]}, 400, "model is required"),
    "model_unknown": (CHAT, {**_OK, "model": "gpt-4o"}, 404, "gpt-4o"),
    "model_unknown_ollama": (OCHAT, {**_OOK, "model": "llava:13b"}, 404, "model 'llava:13b' not found"),
    "model_unknown_generate": (GEN, {"model": "llava", "prompt": "x"}, 404, "model 'llava' not found"),
    # sampling values out of range / unsupported parameters
    "temperature_high": (CHAT, {**_OK, "temperature": 2.5}, 400, "'temperature' must be between 0 and 2"),
    "top_p_high": (CHAT, {**_OK, "top_p": 1.5}, 400, "'top_p'"),
    "max_tokens_zero": (CHAT, {**_OK, "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
    "n_two": (CHAT, {**_OK, "n": 2}, 400, "'n'"),
    "presence_penalty": (CHAT, {**_OK, "presence_penalty": 0.5}, 400, "presence_penalty"),
    "logprobs": (CHAT, {**_OK, "logprobs": True}, 400, "logprobs"),
    "tools": (CHAT, {**_OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    "json_mode": (CHAT, {**_OK, "response_format": {"type": "json_object"}}, 400, "response_format"),
    "too_many_stops": (CHAT, {**_OK, "stop": ["a"] * 17}, 400, "'stop'"),
    "ollama_temperature_negative": (OCHAT, {**_OOK, "options": {"temperature": -1}}, 400, "temperature"),
    "ollama_top_p_high": (OCHAT, {**_OOK, "options": {"top_p": 3}}, 400, "top_p"),
    "ollama_repeat_penalty_zero": (OCHAT, {**_OOK, "options": {"repeat_penalty": 0}}, 400, "repeat_penalty"),
    "ollama_num_ctx_zero": (OCHAT, {**_OOK, "options": {"num_ctx": 0}}, 400, "num_ctx"),
    "ollama_tools": (OCHAT, {**_OOK, "tools": [{"type": "function"}]}, 400, "does not support tools"),
    "ollama_think": (OCHAT, {**_OOK, "think": True}, 400, "does not support thinking"),
    "ollama_format": (OCHAT, {**_OOK, "format": "json"}, 400, "format"),
    "ollama_suffix": (GEN, {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "does not support insert"),
    "ollama_raw_system": (GEN, {"model": MODEL, "prompt": "x", "raw": True, "system": "s"}, 400, "raw mode"),
    "completions_token_prompt": (COMP, {"model": MODEL, "prompt": [[1, 2, 3]]}, 400, "'prompt'"),
    "completions_image_token": (COMP, {"model": MODEL, "prompt": "<|image|> x"}, 400, "image"),
    # images
    "image_http_url": (CHAT, _oai_img("https://example.com/cat.png"), 400, "never reaches the network"),
    "image_file_url": (CHAT, _oai_img("file:///etc/passwd"), 400, "unsupported image URL"),
    "image_not_base64_url": (CHAT, _oai_img("data:image/png,rawbytes"), 400, "only base64 data URLs"),
    "image_not_an_image_type": (CHAT, _oai_img("data:text/plain;base64,aGVsbG8="), 400, "not an image"),
    "image_bad_base64": (OCHAT, _oll_img("!!!not base64!!!"), 400, "not valid base64"),
    "image_garbage": (OCHAT, _oll_img(base64.b64encode(os.urandom(3000)).decode()), 400, "cannot decode the image"),
    "image_truncated": (CHAT, _oai_img(_data_url(_PNG[: len(_PNG) // 2])), 400, "cannot decode the image"),
    "image_empty": (OCHAT, _oll_img("===="), 400, "image"),
    "image_pixels": (
        OCHAT,
        _oll_img(base64.b64encode(_png_declaring(8000, 8000)).decode()),
        400,
        "more than the limit of 40000000",
    ),
    "image_bomb": (CHAT, _oai_img(_data_url(_png_declaring(60000, 60000))), 400, "cannot decode the image"),
    "too_many_images": (
        OCHAT,
        {**_OOK, "messages": [{"role": "user", "content": "x", "images": [_B64] * 4}]},
        400,
        "too many images",
    ),
    "too_many_images_openai": (
        CHAT,
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_PNG)}}] * 4}
            ],
        },
        400,
        "too many images",
    ),
    "image_in_assistant": (
        OCHAT,
        {**_OOK, "messages": [{"role": "assistant", "content": "x", "images": [_B64]}]},
        400,
        "only supported in user messages",
    ),
    # routes
    "unknown_route": ("/v1/embeddings", _OK, 404, "no route"),
    "unknown_route_ollama": ("/api/pull", {"model": "x"}, 404, "no route"),
}


def _post(server, path, body, **kw):
    if isinstance(body, (bytes, bytearray)):
        return httpx.post(server.url + path, content=body, timeout=60, **kw)
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def _error_message(path: str, r) -> str:
    body = r.json()
    if path.startswith("/api/"):
        assert isinstance(body["error"], str)  # Ollama: {"error": "..."}
        return body["error"]
    err = body["error"]  # OpenAI: the error object
    assert set(err) == {"message", "type", "param", "code"}
    return err["message"]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request(server, case):
    path, body, status, needle = BAD[case]
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    assert needle in _error_message(path, r)


def test_bad_requests_leave_the_server_serving(server, ref):
    for path, body, _, _ in BAD.values():
        _post(server, path, body)
    assert server.proc.poll() is None
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = _post(server, CHAT, {**_OK, "temperature": 0, "max_tokens": 6})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == _expect(ref, _OK["messages"], max_new_tokens=6).text
    assert all(not s["busy"] for s in _slots(server)["slots"])


def test_errors_through_the_real_clients(oai, oll, server):
    import ollama
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # the error must come before the stream starts
        list(
            oai.chat.completions.create(
                model=MODEL,
                stream=True,
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}],
                    }
                ],
            )
        )
    assert "never reaches the network" in e.value.body["message"]
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404 and e.value.error == "model 'nope' not found"
    with pytest.raises(ollama.ResponseError) as e:
        list(oll.chat(model=MODEL, stream=True, messages=[{"role": "user", "content": "x", "images": [b"\0" * 50]}]))
    assert e.value.status_code == 400 and "cannot decode the image" in e.value.error


def test_unknown_fields_are_ignored(server, ref):
    r = _post(
        server,
        CHAT,
        {
            **_OK,
            "temperature": 0,
            "user": "u1",
            "metadata": {"a": "b"},
            "frobnicate": [1],
            "messages": [{"role": "user", "content": "hi", "name": "bob", "weird": 1}],
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == _expect(ref, _OK["messages"], max_new_tokens=2).text
    r = _post(
        server,
        OCHAT,
        {
            **_OOK,
            "keep_alive": "5m",
            "frobnicate": True,
            "options": {"num_predict": 2, "temperature": 0, "mirostat_zeta": 1},
        },
    )
    assert r.status_code == 200, r.text


def test_prompt_longer_than_the_context(server, ref):
    words = "alpha beta gamma delta " * 50
    n = len(ref.tokenizer.encode(words))
    text = words * (N_CTX // n + 2)
    r = _post(server, CHAT, {"model": MODEL, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = _post(server, OCHAT, {"model": MODEL, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 400 and "context" in r.json()["error"]


def test_oversized_bodies(server):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (MAX_BODY_MB * 2**20 + 10)}]}
    r = _post(server, CHAT, big)
    assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit applies while reading
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_MB * 4 + 1):
            yield b"y" * (256 * 1024)
        yield b'"}]}'

    r = httpx.post(server.url + OCHAT, content=chunked(), timeout=60)
    assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_wrong_method_is_json(server):
    r = httpx.get(server.url + CHAT, timeout=10)
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]


# --------------------------------------------------------------------------------------------
# API key, loading, start-up failures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tiny_path):
    s = LiveServer(tiny_path, "--parallel", "1", "--n-ctx", "256", "--api-key", "s3cret")
    yield s
    s.stop()


def test_api_key(keyed):
    import ollama
    import openai

    msgs = [{"role": "user", "content": "hi"}]
    ok = openai.OpenAI(base_url=keyed.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
    name = ok.models.list().data[0].id
    assert ok.chat.completions.create(model=name, messages=msgs, max_tokens=2).choices[0].message.content is not None
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=name, messages=msgs, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(keyed.url + "/v1/chat/completions", json={"model": name, "messages": msgs}, timeout=30)
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(keyed.url + "/api/tags", timeout=30)
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=keyed.url).chat(model=name, messages=msgs)
    assert e.value.status_code == 401
    oll = ollama.Client(host=keyed.url, headers={"Authorization": "Bearer s3cret"})
    assert oll.chat(model=name, messages=msgs, options={"num_predict": 2}).done
    for public in ("/health", "/", "/api/version"):  # probes work without the key
        assert httpx.get(keyed.url + public, timeout=30).status_code == 200, public


def test_health_while_loading(tiny_path):
    """/health is 503 until the model is loaded; generation routes answer 503 meanwhile."""
    from starlette.testclient import TestClient

    from mllama_q import Model
    from mllama_q.server import Engine, ModelInfo, create_app

    gate = threading.Event()

    def load():
        assert gate.wait(60)
        return Model(tiny_path, n_ctx=256)

    engine = Engine(load=load, parallel=1)
    app = create_app(engine, ModelInfo.from_path(tiny_path, name="tiny"))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error"
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        r = c.post("/api/chat", json={**body, "stream": False})
        assert r.status_code == 503 and "loading" in r.json()["error"]
        assert c.get("/api/tags").json() == {"models": []}
        gate.set()
        _until(lambda: c.get("/health").status_code == 200, timeout=60)
        assert c.get("/health").json() == {"status": "ok"}
        assert c.post("/v1/chat/completions", json=body).status_code == 200


def test_cli_exits_on_a_bad_model(tmp_path, child_env):
    missing = subprocess.run(
        [sys.executable, "-m", "mllama_q", "serve", "-m", str(tmp_path / "nope.gguf")],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert missing.returncode == 1 and "model file not found" in missing.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**9, 10**9) + os.urandom(64))
    s = LiveServer(bad, wait_ready=False)
    try:
        assert s.proc.wait(60) == 1
    finally:
        s.stop()
    assert any("mllama-q serve: error:" in ln and "bad.gguf" in ln for ln in s.lines), "".join(s.lines)
    args = [sys.executable, "-m", "mllama_q", "serve", "-m", str(bad)]
    for extra in (["--port", "70000"], ["--parallel", "0"], ["--n-ctx", "4"], ["--stream-interval-ms", "-1"]):
        r = subprocess.run(args + extra, capture_output=True, text=True, timeout=60, env=child_env())
        assert r.returncode == 2 and "error" in r.stderr, extra


def test_stream_interval_merges_fast_tokens(tiny_path, ref):
    """--stream-interval-ms: a model faster than the interval gets its tokens merged into chunks
    at least that far apart, the first one is not held back to the end, and the text is still
    exactly the Python API's."""
    interval = 0.25
    messages = [{"role": "user", "content": "Go on forever."}]
    want = _expect(ref, messages, max_new_tokens=1500)
    # the reference must run for several intervals, or the chunk counts below would not tell
    # merging from not merging
    assert want.completion_tokens == 1500, want.stop_reason
    body = {"model": MODEL, "messages": messages, "max_tokens": 1500, "temperature": 0, "stream": True}
    with LiveServer(
        tiny_path, "--n-ctx", str(N_CTX), "--alias", MODEL, "--stream-interval-ms", str(interval * 1e3)
    ) as s:
        t0 = time.monotonic()
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=120) as r:
            pieces = []
            for ln in r.iter_lines():
                if ln.startswith("data: {"):
                    c = json.loads(ln[len("data: ") :])["choices"][0]["delta"].get("content")
                    if c:
                        pieces.append(c)
        wall = time.monotonic() - t0
    assert "".join(pieces) == want.text
    # one chunk per token would be 1500 chunks; merged, there is at most one per interval
    # (+1: the first goes out at once, +1: the end may flush a last partial interval)
    assert len(pieces) <= 2 + wall / interval, (len(pieces), wall)
    # the first chunk went out before the generation ended (it is never delayed), so it holds
    # fewer than all the tokens
    assert len(pieces) >= 2 and len(pieces[0]) < len(want.text)


def test_busy_port(tiny_path, child_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "mllama_q", "serve", "-m", str(tiny_path), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
        )
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr


# --------------------------------------------------------------------------------------------
# Bounded load test: every response checked, memory back near its baseline
# --------------------------------------------------------------------------------------------


def test_load_200_requests_16_clients(tiny_path, ref):
    import ollama
    import openai
    import psutil

    s = LiveServer(tiny_path, "--parallel", "4", "--n-ctx", "512", "--alias", "tiny")
    try:
        proc = psutil.Process(s.proc.pid)
        images = [_image_bytes(100 + k) for k in range(3)]
        convs = _conversations(10)

        def spec(i):
            conv, imgs = convs[i % 10], []
            if i % 10 == 7:  # some requests carry an image
                imgs = [images[i % 3]]
            sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "top_p": 0.9, "seed": i}
            return i % 4, conv, imgs, sampling, 6 + i % 9

        def expected(i):
            _, conv, imgs, sampling, n = spec(i)
            msgs = (
                conv
                if not imgs
                else [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": conv[0]["content"]}]}]
            )
            r = _expect(ref, msgs, images=imgs, max_new_tokens=n, **sampling)
            return r.text, r.completion_tokens

        def ask(i):
            """(text, completion tokens) through one of the four client paths."""
            kind, conv, imgs, sampling, n = spec(i)
            if kind < 2:
                cl = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
                msgs = (
                    conv
                    if not imgs
                    else [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": _data_url(imgs[0])}},
                                {"type": "text", "text": conv[0]["content"]},
                            ],
                        }
                    ]
                )
                if kind == 0:
                    r = cl.chat.completions.create(model="tiny", messages=msgs, max_tokens=n, **sampling)
                    return r.choices[0].message.content, r.usage.completion_tokens
                st = list(
                    cl.chat.completions.create(
                        model="tiny",
                        messages=msgs,
                        max_tokens=n,
                        stream=True,
                        stream_options={"include_usage": True},
                        **sampling,
                    )
                )
                return "".join(ch.choices[0].delta.content or "" for ch in st if ch.choices), st[
                    -1
                ].usage.completion_tokens
            cl = ollama.Client(host=s.url, timeout=120)
            msgs = [{**conv[0], "images": imgs}] if imgs else conv
            opts = {"num_predict": n, **sampling}
            if kind == 2:
                r = cl.chat(model="tiny", messages=msgs, options=opts)
                return r.message.content, r.eval_count
            parts = list(cl.chat(model="tiny", messages=msgs, options=opts, stream=True))
            return "".join(p.message.content for p in parts), parts[-1].eval_count

        # Greedy answers must equal the Python API's exactly. Seeded sampled ones are checked
        # for their shape and length only: batched with other sequences, a step's logits equal
        # the lone run's within the kernels' activation-quantization tolerance
        # (mllama_q/session.py), which a random draw can cross; the seed itself is tested alone.
        want = [expected(i) for i in range(200)]
        greedy = [spec(i)[3].get("temperature") == 0 for i in range(200)]

        def check(got, n):
            for i in range(n):
                if greedy[i]:
                    assert got[i] == want[i], i
                else:  # at most the tokens asked for (an end-of-turn token may come first)
                    text, count = got[i]
                    if count is None and spec(i)[0] >= 2:
                        # Ollama's eval_count is omitted when zero (Go omitempty; ollama_api._metrics
                        # does the same): a first draw of the end-of-turn token generates nothing
                        assert text == "", i
                        count = 0
                    assert isinstance(text, str) and 0 <= count <= spec(i)[4], i

        with ThreadPoolExecutor(16) as ex:
            check(list(ex.map(ask, range(32))), 32)  # warm-up
            baseline = proc.memory_info().rss
            got = list(ex.map(ask, range(200)))
        check(got, 200)
        after = proc.memory_info().rss
        assert after - baseline < 64 * 2**20, (baseline, after)
        st = httpx.get(s.url + "/slots", timeout=10).json()
        assert st["queued"] == 0 and not any(x["busy"] for x in st["slots"])
        assert sum(x["requests"] for x in st["slots"]) == 232
        assert len(s.log_lines("POST /v1/chat/completions 200")) + len(s.log_lines("POST /api/chat 200")) == 232
    finally:
        s.stop()


# --------------------------------------------------------------------------------------------
# Slot choice and the queue (no server)
# --------------------------------------------------------------------------------------------


def test_common_prefix_stops_at_a_different_image():
    from mllama_q.server.engine import common_prefix

    IMG = 99
    cached, ids = [1, 2, IMG, 3, 4, IMG, 5], [1, 2, IMG, 3, 4, IMG, 5, 6]
    assert common_prefix(cached, ["a", "b"], ids, ["a", "b"], IMG) == 7
    assert common_prefix(cached, ["a", "b"], ids, ["a", "c"], IMG) == 5  # the second image differs
    assert common_prefix(cached, ["a", "b"], ids, ["z", "b"], IMG) == 2  # the first one does
    assert common_prefix([1, 2, 7], [], [1, 2, 8], [], IMG) == 2
    assert common_prefix([], [], [1], [], IMG) == 0


def _pool(n, max_queue=8):
    from types import SimpleNamespace

    from mllama_q.server.engine import Slot, SlotPool

    # a session stand-in: the pool only reads `tokens`
    return SlotPool(
        [Slot(i, session=SimpleNamespace(tokens=())) for i in range(n)], image_token_id=99, max_queue=max_queue
    )


def test_slot_choice_longest_prefix_then_lru():
    pool = _pool(3)
    a, b, c = pool.slots
    a.session.tokens, b.session.tokens = (1, 2, 3, 4, 5, 6, 7, 8), (1, 2, 9, 9)
    a.last_used, b.last_used = 5.0, 6.0
    assert pool.choose([1, 2, 3, 4, 5, 6, 7, 8, 10], [])[0] is a  # extends a's history
    assert pool.choose([1, 2, 9, 9, 11], [])[0] is b
    assert pool.choose([50, 51, 52], [])[0] is c  # nothing shared: never-used c
    c.session.tokens, c.last_used = (7,), 7.0
    # 1 token of 20 in common (5 %) is under llama.cpp's 10 % threshold: least recently used instead
    assert pool.choose([1] + [60] * 19, [])[0] is a


def test_queue_is_fifo_and_a_cancelled_waiter_leaves_it():
    import asyncio

    from mllama_q.server.errors import APIError

    async def main():
        pool = _pool(1, max_queue=2)
        slot, _ = await pool.acquire([1], [])
        order = []

        async def waiter(tag):
            s, _ = await pool.acquire([2], [])
            order.append(tag)
            pool.release(s)

        t1 = asyncio.ensure_future(waiter("first"))
        t2 = asyncio.ensure_future(waiter("gone"))
        t3 = asyncio.ensure_future(waiter("second"))
        await asyncio.sleep(0)
        assert pool.n_waiting == 2 and t3.done() and isinstance(t3.exception(), APIError)  # queue full: 503
        assert t3.exception().status == 503
        t2.cancel()
        await asyncio.sleep(0)
        assert pool.n_waiting == 1
        t4 = asyncio.ensure_future(waiter("second"))
        await asyncio.sleep(0)
        pool.release(slot)
        await asyncio.gather(t1, t4)
        assert order == ["first", "second"] and pool.n_busy == 0

    asyncio.run(main())


def test_library_and_other_commands_do_not_load_the_server_stack(child_env):
    code = (
        "import sys, mllama_q, mllama_q.model, mllama_q.generate, mllama_q.cli, mllama_q.cli.run, "
        "mllama_q.cli.serve\n"
        "bad = [m for m in ('starlette', 'uvicorn', 'mllama_q.server') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=child_env())
    assert r.returncode == 0, r.stderr


def _wait_idle(server, timeout=30):
    def idle():
        st = _slots(server)
        return st if st["queued"] == 0 and not any(s["busy"] for s in st["slots"]) else None

    st = _until(idle, timeout)
    assert st, f"slots still busy: {_slots(server)}"
    return st


def test_disconnect_of_a_non_streaming_request(server):
    _wait_idle(server)
    long = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write forever."}],
        "max_tokens": N_CTX - 100,
        "temperature": 0,
    }
    # The client gives up once the run is generating (it closes its connection): the run is
    # cancelled. A raw socket, so the close comes after the slot is busy (a client read timeout
    # could fire before a loaded server had even started the run).
    body = json.dumps(long).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        started = _until(lambda: any(s["busy"] for s in _slots(server)["slots"]), poll=0.005)
        assert started, "the run never started"
    st = _wait_idle(server)
    assert any(
        s["last"].get("stop") == "cancelled" and s["last"]["generated"] < s["last"]["max_new_tokens"]
        for s in st["slots"]
    )


def test_disconnect_while_queued(tiny_path):
    """One slot busy with a long generation, a second request waits, then its client leaves: it
    leaves the queue without ever taking the slot."""
    n_ctx = 16384
    with LiveServer(tiny_path, "--parallel", "1", "--n-ctx", str(n_ctx), "--alias", "tiny") as srv:
        long = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write forever."}],
            "max_tokens": n_ctx - 100,
            "temperature": 0,
        }
        with httpx.Client(timeout=60) as c, c.stream("POST", srv.url + CHAT, json={**long, "stream": True}) as r:
            lines = r.iter_lines()  # kept: a dropped iterator makes httpx close the response
            next(lines)
            with pytest.raises(httpx.ReadTimeout):  # queued behind it; the client gives up
                httpx.post(srv.url + CHAT, json={**long, "max_tokens": 3}, timeout=httpx.Timeout(30, read=0.3))
            _until(lambda: not _slots(srv)["queued"], timeout=10, poll=0.01)
            st = _slots(srv)
            assert st["queued"] == 0 and st["slots"][0]["busy"] and st["slots"][0]["requests"] == 0
        st = _wait_idle(srv)
        assert st["slots"][0]["requests"] == 1 and st["slots"][0]["last"]["stop"] == "cancelled"
        assert any("client-disconnected" in ln for ln in srv.log_lines("POST /v1/chat/completions 499"))


_MARK = "\x00mllama-q-hole\x000\x00mllama-q-hole\x00"  # transport's hole marker, as a value


@pytest.mark.parametrize(
    "piece",
    ["", "plain", 'a "quote" and \\ backslash', "new\nline\ttab\x01\x1f\x7f", "é中文🙂", "\u2028\u2029", _MARK],
)
@pytest.mark.parametrize("model", ["tiny", _MARK])  # a name that clashes with the marker: the whole-object path
def test_stream_chunk_template_is_byte_identical_to_json_dumps(piece, model):
    """The streamed chunks are built from a template (transport.JSONTemplate); their bytes must be
    the stdlib json.dumps of the whole chunk, whatever the text holds."""
    from mllama_q.server.transport import JSONTemplate

    def build(created_at, text):
        return {"model": model, "created_at": created_at, "message": {"content": text}, "usage": None, "done": False}

    t = JSONTemplate(build, 2, b"data: ", b"\n\n")
    assert (t._parts is None) == (model == _MARK)  # the template path unless the marker clashes
    want = json.dumps(build("2026-12-03T23:00:00.5Z", piece), ensure_ascii=False, separators=(",", ":"))
    assert t("2026-12-03T23:00:00.5Z", piece) == b"data: " + want.encode() + b"\n\n"

    def build1(text):
        return {"choices": [{"delta": {"content": text}}], "model": model}

    want1 = json.dumps(build1(piece), ensure_ascii=False, separators=(",", ":"))
    assert JSONTemplate(build1, 1)(piece) == want1.encode()
