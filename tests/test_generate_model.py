"""End to end through the public API: chat messages + real photos -> our processor, chat template,
generate() loop and the compiled model, against transformers' MllamaProcessor + generate()
(greedy, F32 tiny checkpoint from the converter; fixtures from conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DATE = "26 Jul 2024"


def _photo(name: str) -> Image.Image:
    import llama_models

    return Image.open(Path(llama_models.__file__).parent / "resources" / name)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tiny_gguf, hf_model):
    from transformers import MllamaProcessor

    import mllama_q

    ckpt = tiny_checkpoint(seed=0, dtype="float32")
    return {
        "hf": hf_model(ckpt),
        "proc": MllamaProcessor.from_pretrained(str(ckpt)),
        "model": mllama_q.Model(tiny_gguf(ckpt, "f32"), n_ctx=256, kv_type="f32"),
    }


def _hf_reply(setup, messages, images, n_new, **gen_kw):
    proc, hf = setup["proc"], setup["hf"]
    text = proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, date_string=DATE)
    kw = {"images": [images]} if images else {}
    inp = proc(text=text, add_special_tokens=False, return_tensors="pt", **kw)
    inp["attention_mask"] = torch.ones_like(inp["input_ids"])
    with torch.no_grad():
        out = hf.generate(**inp, max_new_tokens=n_new, do_sample=False, **gen_kw)
    return inp["input_ids"].shape[1], out[0, inp["input_ids"].shape[1] :].tolist()


CASES = {
    "text": ([{"role": "user", "content": "Hello, who are you?"}], [], 8),
    "two_photos": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "A"},
                    {"type": "image"},
                    {"type": "text", "text": "B"},
                    {"type": "image"},
                    {"type": "text", "text": "compare"},
                ],
            }
        ],
        ["dog.jpg", "pasta.jpeg"],
        32,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generate_matches_transformers(setup, name):
    from mllama_q.generate import generate

    messages, photos, n_new = CASES[name]
    images = [_photo(p) for p in photos]
    n_prompt, ref = _hf_reply(setup, messages, images, n_new)
    m = setup["model"]
    res = generate(
        m,
        messages=messages,
        images=images or None,
        temperature=0,
        max_new_tokens=n_new,
        chat_kwargs={"date_string": DATE},
    )
    stops = set(m.stop_ids)
    cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
    assert res.prompt_tokens == n_prompt
    assert res.tokens == ref[:cut]
    assert res.text == m.tokenizer.decode(ref[:cut], skip_special_tokens=True)
    # streaming gives the same text, piece by piece
    st = generate(
        m,
        messages=messages,
        images=images or None,
        temperature=0,
        max_new_tokens=n_new,
        chat_kwargs={"date_string": DATE},
        stream=True,
    )
    assert "".join(st) == res.text and st.result.tokens == res.tokens


def test_sampling_is_seeded(setup):
    from mllama_q.generate import generate

    m = setup["model"]
    msgs = [{"role": "user", "content": "Tell me something."}]
    a = generate(m, messages=msgs, max_new_tokens=12, seed=7, temperature=1.0, top_k=20, top_p=0.95)
    b = generate(m, messages=msgs, max_new_tokens=12, seed=7, temperature=1.0, top_k=20, top_p=0.95)
    assert a.tokens == b.tokens and a.completion_tokens >= 1
    assert np.isfinite(a.timings["prefill_s"])


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_with_an_image_matches_transformers(setup, penalty):
    """The prompt holds <|image|> = vocab_size, an id with no logit: transformers' processor
    gives it no penalty; ours raised IndexError (issue 8)."""
    messages, photos, n_new = CASES["two_photos"]
    images = [_photo(p) for p in photos]
    m = setup["model"]
    assert m.image_token_id == m.text_hparams["vocab_size"]  # as in the real 11B (128256)
    _, ref = _hf_reply(setup, messages, images, 24, repetition_penalty=penalty)
    res = m.generate(
        messages=messages,
        images=images,
        temperature=0,
        max_new_tokens=24,
        repetition_penalty=penalty,
        chat_kwargs={"date_string": DATE},
    )
    cut = next((i for i, t in enumerate(ref) if t in set(m.stop_ids)), len(ref))
    assert res.tokens == ref[:cut]
    plain = m.generate(
        messages=messages, images=images, temperature=0, max_new_tokens=24, chat_kwargs={"date_string": DATE}
    )
    assert plain.tokens != res.tokens  # the penalty changed the reply: the comparison means something
