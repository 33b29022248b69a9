"""Synthetic GGUF files (mllama_q.synthetic) against the converter and gguf-py.

References:
  * layout: what `convert.converter.convert` writes for a transformers-saved tiny checkpoint
    with the same dimensions (tests/tiny_models.py), i.e. the converter's real output, not a
    list our synthetic code computes;
  * values: gguf-py's `gguf.quants.dequantize` (ggml's block layouts) for the random blocks.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from mllama_q import gguf_keys as K
from mllama_q.cli.synthetic import CONFIGS, WEIGHT_STD, random_blocks, write_synthetic_gguf


@pytest.fixture(scope="module")
def converted_tiny(tiny_checkpoint, tiny_gguf):
    """The converter's q4_k_m output for the default tiny checkpoint (same dims as CONFIGS['tiny'])."""
    return gguf.GGUFReader(str(tiny_gguf(tiny_checkpoint(seed=0), "q4_k_m")))


@pytest.fixture(scope="module")
def synthetic_like_converted(converted_tiny, tmp_path_factory):
    """CONFIGS['tiny'] with the converted checkpoint's vocabulary size (its tokenizer is smaller)."""
    vocab = int(converted_tiny.fields[K.VOCAB_SIZE].contents())
    cfg = dataclasses.replace(CONFIGS["tiny"], vocab_size=vocab)
    path = write_synthetic_gguf(tmp_path_factory.mktemp("syn") / "s.gguf", cfg, "q4_k_m", progress=False)
    return gguf.GGUFReader(str(path))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_synthetic_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", "tiny", "q4_k_m", progress=False)
    return gguf.GGUFReader(str(path))


def test_same_tensors_as_the_converter(converted_tiny, synthetic_like_converted):
    conv = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type) for t in converted_tiny.tensors}
    syn = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type) for t in synthetic_like_converted.tensors}
    assert sorted(syn) == sorted(conv)
    for name in conv:
        assert syn[name] == conv[name], name
    # the mix really has the K-quants and the F32 small tensors (not a trivially uniform file)
    types = {t for _, t in conv.values()}
    assert {T.Q4_K, T.Q6_K, T.Q8_0, T.F32} <= types


def test_same_hyperparameters_as_the_converter(converted_tiny, synthetic_like_converted):
    """Every hyper-parameter key of the converter's file exists with the same value
    (tokenizer content, names and sampling defaults legitimately differ)."""
    skip_prefixes = ("tokenizer.", "general.name", "general.sampling.")
    for key, field in converted_tiny.fields.items():
        if key.startswith("GGUF.") or key.startswith(skip_prefixes):
            continue
        assert key in synthetic_like_converted.fields, key
        a = field.contents()
        b = synthetic_like_converted.fields[key].contents()
        if isinstance(a, list) or isinstance(a, float):
            np.testing.assert_allclose(
                np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64), rtol=1e-6, err_msg=key
            )
        else:
            assert b == a, key
    # and the tokenizer keys the runtime needs are all present
    for key in (
        K.TOKENIZER_MODEL,
        K.TOKENIZER_PRE,
        K.TOKENIZER_TOKENS,
        K.TOKENIZER_TOKEN_TYPE,
        K.TOKENIZER_MERGES,
        K.TOKENIZER_BOS_ID,
        K.TOKENIZER_EOS_ID,
        K.TOKENIZER_CHAT_TEMPLATE,
    ):
        assert key in synthetic_like_converted.fields, key


def test_tiny_vocabulary_and_special_ids(tiny):
    tokens = tiny.fields[K.TOKENIZER_TOKENS].contents()
    vocab = int(tiny.fields[K.VOCAB_SIZE].contents())
    assert len(tokens) == vocab + 1
    assert tokens[vocab] == "<|image|>"
    assert int(tiny.fields[K.Q_IMAGE_TOKEN_ID].contents()) == vocab
    bos = int(tiny.fields[K.TOKENIZER_BOS_ID].contents())
    assert tokens[bos] == "<|begin_of_text|>"
    stops = [tokens[i] for i in tiny.fields[K.Q_STOP_TOKEN_IDS].contents()]
    assert stops == ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
    emb = next(t for t in tiny.tensors if t.name == K.TOKEN_EMBD)
    assert int(emb.shape[1]) == vocab + 8  # gguf ne order: [D, V + 8]


def test_real_11b_vocabulary_layout():
    """The 11B synthetic vocabulary puts Llama 3's specials at their real ids."""
    from mllama_q.cli.synthetic import _vocab

    tokens, types, merges, ids = _vocab(CONFIGS["11b"])
    assert len(tokens) == 128257 and len(set(tokens)) == len(tokens)
    assert ids == {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|image|>": 128256,
    }
    assert tokens[128005] == "<|reserved_special_token_2|>" and tokens[128011] == "<|reserved_special_token_3|>"
    assert types[127999] == gguf.TokenType.NORMAL and types[128000] == gguf.TokenType.CONTROL
    # every merge joins two existing tokens into an existing token
    vocab = set(tokens)
    for m in merges[::97]:
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab


def test_quantized_blocks_dequantize_to_the_intended_scale(tiny):
    seen = set()
    for t in tiny.tensors:
        if t.tensor_type not in (T.Q4_K, T.Q6_K, T.Q8_0, T.F16):
            continue
        x = dequantize(t.data, t.tensor_type)
        assert np.isfinite(x).all(), t.name
        # std within 25 % of the target; mean near zero relative to it
        assert 0.75 * WEIGHT_STD < float(x.std()) < 1.25 * WEIGHT_STD, (t.name, float(x.std()))
        assert abs(float(x.mean())) < 0.1 * WEIGHT_STD, (t.name, float(x.mean()))
        seen.add(t.tensor_type)
    assert seen == {T.Q4_K, T.Q6_K, T.Q8_0, T.F16}


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0])
def test_random_blocks_decode_like_ggml(qtype):
    """Blocks are valid for ggml's decoder: dequantize (gguf-py) matches the values implied by
    the fields we set, per block: Q8_0 y = d*q, Q4_K zero-mean sub-blocks, Q6_K |y| <= 32*127*d."""
    rng = np.random.default_rng(1)
    blocks = random_blocks(qtype, 64, rng)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    y = dequantize(blocks.reshape(-1), qtype).reshape(64, block)
    assert np.isfinite(y).all()
    if qtype == T.Q8_0:
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        np.testing.assert_allclose(y, d * q, rtol=1e-6)
    elif qtype == T.Q4_K:
        # dmin = 7.5 d and m_j = sc_j: each 32-value sub-block spans d*sc*(q - 7.5), q in 0..15,
        # so its values are symmetric around 0 on a grid of step d*sc.
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
        sub = y.reshape(64, 8, 32)
        lo, hi = sub.min(-1), sub.max(-1)
        assert np.all(lo < 0) and np.all(hi > 0)
        assert np.all(np.abs(lo) <= 7.5 * 63 * d[:, None] * 1.01)
    else:
        d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
        assert np.all(np.abs(y) <= 32 * 127 * d + 1e-9)
    assert 0.7 * WEIGHT_STD < float(y.std()) < 1.3 * WEIGHT_STD


def test_chat_template_is_the_real_one(tiny, real_chat_template):
    """The synthetic file carries Llama 3.2 Vision Instruct's template (the hub text, as the
    converter copies it), not a shortened stand-in."""
    assert tiny.fields[K.TOKENIZER_CHAT_TEMPLATE].contents() == real_chat_template
