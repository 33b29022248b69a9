"""Tokenizer: HF dir -> GGUF metadata (convert/tokenizer.py) -> rebuilt tokenizer (mllama_q/tokenizer.py)
must give the ids of transformers' tokenizer for the real Llama 3 vocabulary."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from mllama_q.convert.tokenizer import add_tokenizer_metadata
from mllama_q.tokenizer import Tokenizer

CORPUS = [
    "Hello world!",
    "",
    " ",
    "   leading and trailing spaces   ",
    "Tabs\tand\nnewlines\r\n\r\nand\n\n\n   runs of   whitespace\t\t ",
    "Numbers: 0 7 42 123 1234 12345 3.14159 -2e10 1,000,000 ٣٤٥ ١٢",
    "Contractions: I'm you're he'll they'd it's we've DON'T I'M",
    "Français : « déjà vu », naïve café, œuvre, Ærø.",
    "Deutsch: Größenordnung, Straße, Übermäßig.",
    "Русский текст с пунктуацией — и тире.",
    "日本語のテキストと漢字、カタカナ。中文：你好，世界！한국어 문장입니다.",
    "العربية: مرحبا بالعالم. עברית: שלום עולם",
    "हिन्दी में वाक्य। ไทย ภาษาไทย",
    "Emoji 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️ 🤖 and symbols ∑∫√∞ ≠ ≤ ≥ → ← ✓",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\nclass A:\n\tpass\n",
    'SELECT * FROM t WHERE id=5; -- sql\n<html><body class="x">&amp;</body></html>',
    "URLs https://example.com/path?q=1&r=two#frag and e-mails a.b@c.org",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe.<|eot_id|>",
    "<|image|><|image|>Two images then text<|eom_id|><|python_tag|>x<|finetune_right_pad_id|>",
    "text<|reserved_special_token_5|>more<|image|>",
    "Unicode edge: \u00a0nbsp \u200bzwsp \ufeffbom e\u0301 combining, \U0001f600\U0001f600",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    '!!!???...,,,;;;:::\'\'"""```~~~^^^',
    "MiXeD CaSe WoRdS and CamelCaseIdentifiers snake_case_names kebab-case-names",
]


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def reader(tokenizer_gguf):
    return gguf.GGUFReader(str(tokenizer_gguf))


@pytest.fixture(scope="module")
def tok(tokenizer_gguf) -> Tokenizer:
    from mllama_q.gguf_file import open_gguf

    return Tokenizer.from_gguf(open_gguf(tokenizer_gguf))


def test_metadata_matches_llama_cpp_layout(reader, tokenizer_dir, real_chat_template):
    f = lambda k: reader.fields[k].contents()  # noqa: E731
    assert f("tokenizer.ggml.model") == "gpt2"
    assert f("tokenizer.ggml.pre") == "llama-bpe"
    tokens = f("tokenizer.ggml.tokens")
    assert len(tokens) == 128257
    assert tokens[128256] == "<|image|>" and tokens[128000] == "<|begin_of_text|>" and tokens[9906] == "Hello"
    types = f("tokenizer.ggml.token_type")
    assert types[:128000] == [gguf.TokenType.NORMAL] * 128000
    assert types[128000:] == [gguf.TokenType.CONTROL] * 257
    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert f("tokenizer.ggml.merges") == merges
    assert f("tokenizer.ggml.bos_token_id") == 128000
    assert f("tokenizer.ggml.eos_token_id") == 128009
    assert f("tokenizer.ggml.padding_token_id") == 128004
    assert f("tokenizer.ggml.eot_token_id") == 128009
    assert f("tokenizer.ggml.eom_token_id") == 128008
    assert f("tokenizer.ggml.add_bos_token") is True
    assert f("tokenizer.ggml.add_eos_token") is False
    assert f("tokenizer.chat_template") == real_chat_template


def test_hello_world(tok, hf_tok):
    assert tok.encode("Hello world!", add_special_tokens=False) == [9906, 1917, 0]
    assert tok.encode("Hello world!") == [128000, 9906, 1917, 0] == hf_tok("Hello world!").input_ids


@pytest.mark.parametrize("add_special", [False, True])
def test_ids_equal_transformers(tok, hf_tok, add_special):
    for text in CORPUS:
        ours = tok.encode(text, add_special_tokens=add_special)
        ref = hf_tok(text, add_special_tokens=add_special).input_ids
        assert ours == ref, text


def test_processor_style_prompts(tok, hf_tok):
    # MllamaProcessor prepends BOS text after leading <|image|> tokens, then the tokenizer adds
    # its own BOS: HF really produces [BOS, <|image|>, BOS, ...].
    text = "<|image|><|begin_of_text|>If I had to write a haiku for this one"
    assert tok.encode(text) == hf_tok(text).input_ids
    assert tok.encode(text)[:3] == [128000, 128256, 128000]


def test_decode_round_trip(tok, hf_tok):
    for text in CORPUS:
        ids = hf_tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
        assert tok.decode(ids) == hf_tok.decode(ids, clean_up_tokenization_spaces=False)
        assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


def test_stream_decoder_is_valid_utf8_and_complete(tok):
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        dec = tok.stream_decoder()
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == text
        for p in pieces:
            p.encode("utf-8")  # every piece is a complete string (no lone surrogates)
        assert not any("\ufffd" in p for p in pieces), text


def test_stream_decoder_splits_multibyte_characters(tok):
    # A 4-byte emoji is several byte-level tokens: nothing may come out before the last byte.
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    dec = tok.stream_decoder()
    out = [dec.push(i) for i in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == "😀"


def test_token_bytes_match_hf_vocab(tok, hf_tok):
    rng = np.random.default_rng(0)
    for i in rng.integers(0, 128000, size=300).tolist():
        raw = tok.token_bytes(i)
        # decoding a single token with HF gives the same text whenever the bytes are valid UTF-8
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert text == hf_tok.decode([i], clean_up_tokenization_spaces=False)


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(ValueError):
        tok.decode([128257])
    with pytest.raises(ValueError):
        tok.encode(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokenizer.json"):
        add_tokenizer_metadata(gguf.GGUFWriter(str(tmp_path / "x.gguf"), arch="mllama"), tmp_path)


# ------------------------------------------------------------------ chat template (mllama_q.chat)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}],
    [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image"},
                {"type": "text", "text": " and "},
                {"type": "image"},
            ],
        },
    ],
    [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog on grass."}]},
        {"role": "user", "content": "And its colour? ünïcødé 😀"},
    ],
    [
        {"role": "system", "content": "  Be nice.  "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_apply_chat_template(tok, hf_tok, conv, gen):
    from mllama_q.chat import ChatTemplate

    chat = ChatTemplate(tok.chat_template, tok)
    ours = chat.render(conv, add_generation_prompt=gen, date_string="26 Jul 2024")
    ref = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, date_string="26 Jul 2024")
    assert ours == ref
    ref_ids = hf_tok.apply_chat_template(
        conv, tokenize=True, add_generation_prompt=gen, date_string="26 Jul 2024", return_dict=False
    )
    assert tok.encode(ours, add_special_tokens=False) == list(ref_ids)


def test_chat_template_default_date_and_images_in_items(tok, hf_tok):
    """Without date_string the template calls strftime_now(); image items may carry the image."""
    from PIL import Image

    from mllama_q.chat import ChatTemplate, message_images

    img = Image.new("RGB", (4, 4))
    conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Hi"}]}]
    plain = [{"role": "user", "content": "no image"}]
    chat = ChatTemplate(tok.chat_template, tok)
    assert chat.render(plain) == hf_tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    assert chat.render(conv) == hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert message_images(conv) == [img]


def test_chat_template_errors(tok):
    from mllama_q.chat import ChatTemplate, ChatTemplateError

    chat = ChatTemplate(tok.chat_template, tok)
    with pytest.raises(ValueError):
        chat.render([])
    with pytest.raises(ValueError):
        chat.render([{"content": "no role"}])
    with pytest.raises(ValueError):
        chat.render([{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(ChatTemplateError, match="single tool-calls"):
        chat.render(
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": {}}}] * 2},
            ]
        )
    with pytest.raises(ChatTemplateError, match="compile"):
        ChatTemplate("{% if %}", tok)


def test_stream_decoder_equals_decode_on_invalid_utf8(tok, hf_tok):
    """Random byte tokens make invalid UTF-8: streaming must replace exactly as HF's decode does."""
    rng = np.random.default_rng(5)
    byte_ids = [i for i in range(256) if len(tok.token_bytes(i)) == 1]
    for _ in range(200):
        ids = rng.choice(byte_ids, size=int(rng.integers(1, 12))).tolist()
        if rng.random() < 0.5:
            ids += tok.encode("é😀", add_special_tokens=False)
        dec = tok.stream_decoder()
        streamed = "".join([dec.push(i) for i in ids] + [dec.flush()])
        assert streamed == hf_tok.decode(ids, clean_up_tokenization_spaces=False)
