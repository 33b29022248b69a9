"""Sampling (vs transformers' logits processors) and the generate loop (with a fake model that
implements the low-level model API and records what generate() asks of it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mllama_q.generate import GenerationStream, build_prompt, generate
from mllama_q.processor import Processor, ProcessorSettings
from mllama_q.sampling import Sampler, SamplingParams, probabilities

EOT, EOM, EOS = 128009, 128008, 128001


# ------------------------------------------------------------------ sampling vs transformers


def _hf_scores(logits: np.ndarray, history: list[int], p: SamplingParams) -> np.ndarray:
    """transformers' logits processors, in generate()'s order: float32 scores [V], -inf = filtered."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        procs.append(MinPLogitsWarper(p.min_p))
    ids = torch.tensor([history], dtype=torch.long)
    return procs(ids, torch.from_numpy(logits.copy())[None])[0].numpy()


def _hf_probs(logits: np.ndarray, history: list[int], p: SamplingParams) -> np.ndarray:
    """The distribution transformers samples from: softmax of its processed scores, computed in
    float64 (exact to ~1e-16, so no float32 summation error of torch's kernel enters the test)."""
    z = _hf_scores(logits, history, p).astype(np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


# Tolerance of our float32 probabilities, derived (not tuned). Ours (sampling._softmax) computes,
# for the n surviving float32 scores z (bit-identical to transformers' processed scores: the
# penalty and the temperature are the same single IEEE float32 operations, asserted below),
#     d_i = fl(z_i - m)        m = max z;  |error| <= u |z_i - m|                     (u = 2^-24)
#     e_i = fl(exp(d_i))       numpy's SIMD float32 exp is within EXP_ULPS ulp and 1 ulp <= 2u of
#                              the value, so e_i = exp(z_i - m)(1 + eps_i), |eps_i| <= u|z_i - m| + 2 EXP_ULPS u
#     S   = fl(sum_j e_j)      numpy's pairwise summation: each term passes at most k(n) roundings
#                              (_pairwise_roundings), so |S / sum_j e_j - 1| <= k(n) u, and
#                              sum_j e_j = sum_j exp(z_j - m) (1 + sum_j p_j eps_j)
#     p_i = fl(e_i / S)        one more rounding: u
# hence, to first order,  |ours_i - p_i| / p_i <= u (|z_i - m| + E_p|z - m| + 4 EXP_ULPS + k(n) + 1)
# with E_p the mean under the exact distribution p. Below the smallest normal float32 (2^-126)
# gradual underflow loses relative accuracy: that much absolute error is allowed. For the
# 128,256-token case the bound is ~3e-6 for the likely tokens. The former flat rtol = 1e-5 against
# torch's float32 softmax failed on an AVX2-only machine: torch's kernel sums the vocabulary
# lane by lane, sequentially (relative error ~1.2e-5 there, common to every token), which is why
# the reference is now transformers' processed scores with the softmax taken in float64.
U = 2.0**-24
EXP_ULPS = 4  # numpy documents <= 2.52 ulp for its AVX2 / AVX-512F float32 exp; checked on the inputs


def _pairwise_roundings(n: int) -> int:
    """Most roundings any term sees in numpy's float32 pairwise sum of n values
    (numpy/_core/src/umath/loops_utils.h.src, pairwise_sum: below 8 values a plain loop; up to
    PW_BLOCKSIZE = 128 eight accumulators of n // 8 values each, combined by a 3-level tree, then
    the n % 8 rest added one by one; above, two halves split at a multiple of 8, then added)."""
    if n < 8:
        return max(n - 1, 0)
    if n <= 128:
        return (n // 8 - 1) + 3 + n % 8
    n2 = n // 2
    n2 -= n2 % 8
    return 1 + max(_pairwise_roundings(n2), _pairwise_roundings(n - n2))


def _check_probs(ours: np.ndarray, logits: np.ndarray, history: list[int], params: SamplingParams) -> None:
    """ours against transformers within the derived bound (AssertionError otherwise)."""
    from mllama_q.sampling import apply_repetition_penalty, filter_logits

    scores = _hf_scores(logits, history, params)
    keep = np.isfinite(scores)
    z32 = scores[keep]
    exact = _hf_probs(logits, history, params)[keep]
    # support: no filtered token has probability, every kept one has (unless float32 underflows)
    assert not np.any(ours[~keep] > 0), "a token transformers filtered has probability"
    assert np.all(ours[keep][exact >= 2.0**-126] > 0), "a token transformers kept has none"
    # the survivors and their scaled logits are bit-identical to transformers' processed scores
    ids, v = filter_logits(apply_repetition_penalty(logits, history, params.repetition_penalty), params)
    order = np.argsort(ids)
    np.testing.assert_array_equal(ids[order], np.flatnonzero(keep))
    np.testing.assert_array_equal(v[order], z32)
    # the exp accuracy the bound assumes, on these very arguments
    d = z32 - z32.max()
    e32, e64 = np.exp(d), np.exp(d.astype(np.float64))
    normal = e64 >= 2.0**-126
    ulps = np.abs(e32[normal] - e64[normal]) / np.spacing(e64[normal].astype(np.float32))
    assert ulps.max(initial=0) <= EXP_ULPS, f"numpy's float32 exp is off by {ulps.max()} ulp here"
    gap = float(z32.max()) - z32.astype(np.float64)
    rtol = U * (gap + float(np.sum(exact * gap)) + 4 * EXP_ULPS + _pairwise_roundings(int(keep.sum())) + 1)
    err = np.abs(ours[keep].astype(np.float64) - exact)
    worst = int(np.argmax(err - rtol * exact))
    assert np.all(err <= rtol * exact + 2.0**-126), (
        f"p = {exact[worst]:.6g}, ours {ours[keep][worst]:.6g}: relative error {err[worst] / exact[worst]:.3g} "
        f"> bound {rtol[worst]:.3g}"
    )


PARAMS = [
    SamplingParams(temperature=1.0, top_p=1.0),
    SamplingParams(temperature=0.6, top_p=0.9),
    SamplingParams(temperature=0.8, top_k=40),
    SamplingParams(temperature=1.3, top_k=100, top_p=0.5),
    SamplingParams(temperature=0.7, top_p=1.0, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.1, repetition_penalty=1.3),
    SamplingParams(temperature=0.5, top_p=0.8, repetition_penalty=0.7),
    SamplingParams(temperature=2.0, top_k=1),
]


def _core_probs(logits, history, params):
    """The compiled sampler's distribution (csrc/cpu/sampling.cpp: what Backend.sample draws from)."""
    from mllama_q import _core
    from mllama_q.sampling import core_params

    return _core.sample_probs(logits, np.asarray(history, np.int32), core_params(params, 0.0))


def _cases():
    """(logits, history): flat and peaked distributions; top-p takes both its shortcut (the
    1024 most likely tokens hold top_p of the mass) and its full-sort path on these seeds."""
    rng = np.random.default_rng(0)
    for trial in range(5):
        vocab = 128256 if trial == 4 else 32000
        logits = (rng.standard_normal(vocab) * (6.0 if trial == 4 else rng.uniform(0.5, 4))).astype(np.float32)
        yield logits, rng.integers(0, vocab, size=60).tolist()


@pytest.mark.parametrize("impl", ["python", "core"])
@pytest.mark.parametrize("params", PARAMS)
def test_probabilities_match_transformers(params, impl):
    # "python" is mllama_q.sampling (the reference path), "core" the compiled sampler the
    # scheduler uses; both within the bound derived from float32 error (_check_probs).
    dist = probabilities if impl == "python" else _core_probs
    for logits, history in _cases():
        _check_probs(dist(logits, history, params), logits, history, params)


def test_probability_check_still_catches_real_errors():
    """The derived bound is tight enough to see real mistakes: a temperature 16 float32 ulps
    off, a repetition penalty off by 1e-4, or one logit nudged by 1e-5 each fail it."""
    import dataclasses

    logits, history = list(_cases())[4]  # the 128,256-token case
    history = history + [int(np.argmax(logits))]  # the penalty reaches the top token
    p = SamplingParams(temperature=2.0, top_p=0.95, repetition_penalty=0.95)  # 12,431 survivors
    _check_probs(probabilities(logits, history, p), logits, history, p)  # as is: passes
    assert (probabilities(logits, history, p) > 0).sum() > 1000
    wrong_t = dataclasses.replace(p, temperature=float(np.float32(2.0) * np.float32(1 + 2.0**-19)))
    wrong_r = dataclasses.replace(p, repetition_penalty=0.95 * (1 + 1e-4))
    nudged = logits.copy()
    nudged[int(np.argmax(logits))] += 1e-5
    for bad in (
        probabilities(logits, history, wrong_t),
        probabilities(logits, history, wrong_r),
        probabilities(nudged, history, p),
    ):
        with pytest.raises(AssertionError):
            _check_probs(bad, logits, history, p)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.7, top_k=50, repetition_penalty=0.6),
    ],
)
def test_repetition_penalty_ignores_ids_past_the_logits_like_transformers(params):
    # mllama's <|image|> id is the vocabulary size (the 11B: 128256 with 128256 logits): it was an
    # IndexError. transformers' RepetitionPenaltyLogitsProcessor clamps such ids to a padded
    # column it drops, so they take no penalty and change nothing else.
    rng = np.random.default_rng(5)
    V = 1000
    logits = rng.standard_normal(V).astype(np.float32) * 3
    history = [V, 5, V, 17, 999, V + 7] + rng.integers(0, V, size=20).tolist()
    _check_probs(probabilities(logits, history, params), logits, history, params)
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=params.repetition_penalty))
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    want = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(
        torch.tensor([history]), torch.from_numpy(logits.copy())[None]
    )
    assert s(logits, history) == int(want.argmax())


def test_overflowing_temperature_and_nan_logits_give_a_distribution():
    """Found by the inputs fuzzer: temperature 1e-45 overflows x / T to inf and inf - inf made
    every probability NaN; a NaN logit poisoned the softmax (and was numpy's argmax). Now the
    tiny temperature gives the right (here: greedy, ties shared) distribution, +inf logits share
    the mass, and NaN scores are never drawn."""
    x = np.array([-1e30, 9e29, 3.0, 9e29, 9.0e29 * (1 - 1e-6)], np.float32)
    p = SamplingParams(temperature=1e-45, top_p=1.0)
    np.testing.assert_array_equal(probabilities(x, [], p), [0, 0.5, 0, 0.5, 0])
    assert Sampler(p)(x, []) in (1, 3)
    huge = SamplingParams(temperature=0.6, top_k=5, top_p=0.1, repetition_penalty=2.0**31)
    np.testing.assert_array_equal(probabilities(np.array([-2.2e29], np.float32), [0], huge), [1.0])  # was NaN
    inf = np.array([1.0, np.inf, 2.0, np.inf], np.float32)
    np.testing.assert_array_equal(probabilities(inf, [], SamplingParams(temperature=0.7, top_p=1.0)), [0, 0.5, 0, 0.5])
    y = np.array([0.5, np.nan, 2.0, -1.0], np.float32)
    ref = np.exp(np.array([0.5, 2.0, -1.0]) - 2.0)
    ref /= ref.sum()
    np.testing.assert_allclose(
        probabilities(y, [], SamplingParams(temperature=1.0, top_p=1.0))[[0, 2, 3]], ref, rtol=1e-6
    )
    assert probabilities(y, [], SamplingParams(temperature=1.0, top_p=1.0))[1] == 0
    assert Sampler(SamplingParams(temperature=0))(y, []) == 2
    assert {Sampler(SamplingParams(temperature=1.0, top_p=1.0, seed=s))(y, []) for s in range(200)} == {0, 2, 3}


@pytest.mark.parametrize("params", PARAMS + [SamplingParams(temperature=0, repetition_penalty=1.5)])
def test_core_sampler_draws_like_the_python_sampler(params):
    """Backend.sample (one row per sequence of a batched step) with the draws u of a seeded numpy
    RNG picks what mllama_q.sampling.Sampler picks with the same RNG (Sampler's draw is
    verified against the distribution above): same seed, same tokens, either path."""
    from mllama_q import _core
    from mllama_q.sampling import core_params

    be = _core.Backend("cpu")
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((6, 5000)) * 3).astype(np.float32)
    hist = [rng.integers(0, 5000, size=40).astype(np.int32) for _ in range(6)]
    ref = Sampler(SamplingParams(**{**params.__dict__, "seed": 11}))
    draws = np.random.default_rng(11)
    for _ in range(30):
        want = [ref(logits[r], hist[r].tolist()) for r in range(6)]
        us = [0.0 if params.greedy else draws.random() for _ in range(6)]
        got = be.sample(logits, hist, [core_params(params, u) for u in us])
        assert got.tolist() == want
    with pytest.raises(ValueError, match="top_p"):
        be.sample(logits[:1], hist[:1], [(1.0, 0, 0.0, 0.0, 1.0, 0.5)])
    with pytest.raises(ValueError, match="draw"):
        be.sample(logits[:1], hist[:1], [(1.0, 0, 1.0, 0.0, 1.0, 1.0)])


def test_greedy_is_argmax_after_repetition_penalty():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = rng.standard_normal(1000).astype(np.float32)
        hist = rng.integers(0, 1000, size=30).tolist()
        ref = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([hist]), torch.from_numpy(logits.copy())[None])
        s = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5))
        assert s(logits, hist) == int(ref.argmax())


def test_sampling_follows_the_distribution_and_seed():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05, 1e-9], dtype=np.float32))
    params = SamplingParams(temperature=1.0, top_p=1.0, seed=42)
    draws = [Sampler(params)(logits, []) for _ in range(1)]  # a fresh sampler with the seed...
    s = Sampler(params)
    many = np.array([s(logits, []) for _ in range(6000)])
    freq = np.bincount(many, minlength=5) / many.size
    np.testing.assert_allclose(freq[:4], [0.5, 0.3, 0.15, 0.05], atol=0.025)
    s2 = Sampler(params)
    assert [s2(logits, []) for _ in range(50)] == many[:50].tolist()  # same seed, same draws
    assert draws[0] == many[0]
    # top_p=0.7 keeps only the two most likely tokens (HF's rule: drop while cumulative <= 0.3)
    s3 = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=1))
    assert set(s3(logits, []) for _ in range(300)) == {0, 1}


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": -0.1},
        {"min_p": 2},
        {"repetition_penalty": 0},
        {"seed": -3},
        {"seed": 1.5},
        {"temperature": True},
    ],
)
def test_invalid_sampling_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


# ------------------------------------------------------------------ generate loop with a fake model


class FakeModel:
    """Implements the low-level API. Logits: a scripted reply (one token per step, then EOT), or
    fixed random logits. Records every call."""

    def __init__(self, tokenizer, script=None, n_ctx=4096, vocab=128256, tile=28):
        self.tokenizer = tokenizer
        self.processor = Processor(tokenizer, ProcessorSettings(tile_size=tile))
        self.stop_ids = [EOS, EOM, EOT]
        self.n_ctx = n_ctx
        self.n_past = 0
        self.vocab = vocab
        self.script = list(script or [])
        self.calls = []
        self.images = None

    def reset(self):
        self.n_past = 0
        self.images = None
        self.calls.append(("reset",))

    def encode_images(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        self.images = (pixel_values.copy(), aspect_ratio_ids.copy(), aspect_ratio_mask.copy())
        self.calls.append(("encode_images",))

    def eval(self, tokens, cross_attention_mask):
        assert tokens.dtype == np.int32 and tokens.ndim == 1
        if cross_attention_mask is not None:
            assert cross_attention_mask.shape[0] == tokens.shape[0]
        if self.n_past + tokens.size > self.n_ctx:
            raise ValueError("context full")
        step = sum(1 for c in self.calls if c[0] == "eval")
        mask = None if cross_attention_mask is None else cross_attention_mask.copy()
        self.calls.append(("eval", tokens.copy(), mask))
        self.n_past += tokens.size
        logits = np.zeros(self.vocab, dtype=np.float32)
        tok = self.script[step] if step < len(self.script) else EOT
        logits[tok] = 10.0
        return logits


def test_greedy_scripted_reply_stops_on_eot(tokenizer):
    reply = "The dog is brown. Ünïcode 😀 ok"
    script = tokenizer.encode(reply, add_special_tokens=False)
    m = FakeModel(tokenizer, script=script)
    res = generate(m, messages=[{"role": "user", "content": "Hi"}], temperature=0, max_new_tokens=100)
    assert res.text == reply and res.tokens == script and res.stop_reason == "stop_token"
    assert res.completion_tokens == len(script)
    evals = [c for c in m.calls if c[0] == "eval"]
    prompt_ids = evals[0][1]
    ref_text = m.processor.tokenizer.decode(prompt_ids)
    assert ref_text.startswith("<|begin_of_text|><|start_header_id|>system") and ref_text.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert (prompt_ids == 128000).sum() == 1  # the template's BOS only
    assert res.prompt_tokens == prompt_ids.size
    # decode steps feed back exactly the sampled tokens, one at a time
    assert [int(c[1][0]) for c in evals[1:]] == script
    assert m.calls[0] == ("reset",) and not any(c[0] == "encode_images" for c in m.calls)
    for key in ("prepare_s", "image_encode_s", "prefill_s", "decode_s", "decode_tokens_per_s", "time_to_first_token_s"):
        assert key in res.timings


@pytest.mark.parametrize("stop_id", [EOS, EOM, EOT])
def test_every_stop_id_stops(tokenizer, stop_id):
    m = FakeModel(tokenizer, script=[9906, 1917, stop_id, 0, 0])
    res = generate(m, prompt="x", temperature=0)
    assert res.tokens == [9906, 1917] and res.text == "Hello world" and res.stop_reason == "stop_token"


def test_streaming_pieces_are_valid_and_complete(tokenizer):
    reply = "日本語😀👩‍👩‍👧 and ascii"
    script = tokenizer.encode(reply, add_special_tokens=False)
    m = FakeModel(tokenizer, script=script)
    st = generate(m, prompt="hi", temperature=0, stream=True)
    assert isinstance(st, GenerationStream)
    pieces = list(st)
    assert "".join(pieces) == reply == st.result.text
    assert all(p and "\ufffd" not in p for p in pieces)
    assert len(pieces) < len(script)  # multi-byte characters spanned several tokens


def test_stop_strings_cut_and_never_leak(tokenizer):
    reply = "Answer: 42\nUSER: next question"
    script = tokenizer.encode(reply, add_special_tokens=False)
    for stream in (False, True):
        m = FakeModel(tokenizer, script=script)
        out = generate(m, prompt="q", temperature=0, stop=["\nUSER:", "never"], stream=stream)
        if stream:
            text = "".join(out)
            res = out.result
            assert text == res.text
        else:
            res = out
        assert res.text == "Answer: 42" and res.stop_reason == "stop_string"


def test_max_new_tokens_and_context_limit(tokenizer):
    script = tokenizer.encode(" a" * 50, add_special_tokens=False)
    m = FakeModel(tokenizer, script=script)
    res = generate(m, prompt="x", temperature=0, max_new_tokens=5)
    assert res.completion_tokens == 5 and res.stop_reason == "length"
    n_prompt = len(m.processor(text="x")["input_ids"][0])
    m = FakeModel(tokenizer, script=script, n_ctx=n_prompt + 3)
    res = generate(m, prompt="x", temperature=0, max_new_tokens=100)
    # a full context is its own stop reason (issue 9), distinct from max_new_tokens' "length"
    assert res.stop_reason == "context_full" and m.n_past <= m.n_ctx and res.completion_tokens == 4
    with pytest.raises(ValueError, match="context"):
        generate(FakeModel(tokenizer, n_ctx=n_prompt), prompt="x")


def test_images_and_cross_attention_mask_of_decode_tokens(tokenizer):
    rng = np.random.default_rng(0)
    imgs = [
        Image.fromarray(rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (70, 20, 3), dtype=np.uint8)),
    ]
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": imgs[0]},
                {"type": "text", "text": "and"},
                {"type": "image", "image": imgs[1]},
                {"type": "text", "text": "?"},
            ],
        }
    ]
    script = tokenizer.encode("two images", add_special_tokens=False)
    m = FakeModel(tokenizer, script=script)
    res = generate(m, messages=msgs, temperature=0)
    assert res.text == "two images"
    p = build_prompt(m, messages=msgs)
    ref = m.processor(text=p.text, images=imgs, add_special_tokens=False)
    np.testing.assert_array_equal(m.images[0], ref["pixel_values"])
    np.testing.assert_array_equal(m.images[1], ref["aspect_ratio_ids"])
    np.testing.assert_array_equal(m.images[2], ref["aspect_ratio_mask"])
    evals = [c for c in m.calls if c[0] == "eval"]
    np.testing.assert_array_equal(evals[0][2], ref["cross_attention_mask"][0])
    last_row = ref["cross_attention_mask"][0, -1:]
    assert last_row.sum() > 0
    for c in evals[1:]:
        np.testing.assert_array_equal(c[2], last_row)
    # the same images passed separately give the same prompt
    msgs_plain = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "and"},
                {"type": "image"},
                {"type": "text", "text": "?"},
            ],
        }
    ]
    p2 = build_prompt(m, messages=msgs_plain, images=imgs)
    np.testing.assert_array_equal(p2.input_ids, p.input_ids)
    np.testing.assert_array_equal(p2.pixel_values, ref["pixel_values"])


def test_text_only_prompt_has_no_mask(tokenizer):
    m = FakeModel(tokenizer, script=[9906])
    generate(m, prompt="Hello", temperature=0)
    assert all(c[2] is None for c in m.calls if c[0] == "eval")


def test_bad_requests(tokenizer, tmp_path):
    m = FakeModel(tokenizer)
    img = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="image"):
        generate(m, prompt="<|image|> x <|image|>", images=[img])
    with pytest.raises(ValueError, match="image"):
        generate(m, messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
    with pytest.raises(ValueError, match="image"):
        generate(m, prompt="no image token", images=[img])
    with pytest.raises(ValueError):
        generate(m, prompt="<|image|>x", images=[tmp_path / "missing.jpg"])
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError):
        generate(m, prompt="<|image|>x", images=[tmp_path / "empty.png"])
    with pytest.raises(ValueError):
        generate(m, prompt="x", messages=[{"role": "user", "content": "y"}])
    with pytest.raises(ValueError):
        generate(m)
    for kw in (
        {"max_new_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"stop": [""]},
        {"top_k": -2},
        {"repetition_penalty": -1.0},
        {"min_p": 3},
    ):
        with pytest.raises(ValueError):
            generate(m, prompt="x", **kw)


def test_defaults_come_from_model(tokenizer):
    m = FakeModel(tokenizer, script=[9906])
    m.generation_defaults = {"temperature": 0.0}
    res = generate(m, prompt="x")  # greedy because of the model's default
    assert res.tokens == [9906]


# ------------------------------------------------------------------ CLI (run, chat) with the fake model


@pytest.fixture
def fake_model_module(tokenizer, monkeypatch):
    """Installs a stand-in mllama_q.model whose Model answers with a scripted reply."""
    import sys
    import types

    made = []

    class Model(FakeModel):
        def __init__(
            self, path, device="cpu", n_ctx=4096, n_threads=None, vision=True, projector=None, ollama_converter=None
        ):
            if not str(path).endswith(".gguf"):
                raise ValueError(f"{path}: not a GGUF file")
            super().__init__(tokenizer, script=tokenizer.encode("Fine, thanks.", add_special_tokens=False), n_ctx=n_ctx)
            self.kw = dict(
                path=path,
                device=device,
                n_ctx=n_ctx,
                n_threads=n_threads,
                vision=vision,
                projector=projector,
                ollama_converter=ollama_converter,
            )
            self.load_time_s, self.vision_hparams = 0.25, {"image_size": 560} if vision else None
            made.append(self)

        def eval(self, tokens, cross_attention_mask):
            if tokens.size > 1:  # a new prompt: replay the script from its start
                self.calls = [c for c in self.calls if c[0] != "eval"]
            return super().eval(tokens, cross_attention_mask)

    mod = types.ModuleType("mllama_q.model")
    mod.Model = Model
    monkeypatch.setitem(sys.modules, "mllama_q.model", mod)
    return made


def test_cli_run_streams_answer(fake_model_module, capsys, tmp_path):
    from mllama_q.cli import main

    img = tmp_path / "a.png"
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(img)
    rc = main(
        [
            "run",
            "-m",
            "x.gguf",
            "-i",
            str(img),
            "-p",
            "How are you?",
            "--temperature",
            "0",
            "--threads",
            "2",
            "-c",
            "2048",
            "-v",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0 and cap.out == "Fine, thanks.\n"
    assert "prompt tokens" in cap.err
    assert "[loaded x.gguf in 0.25 s]" in cap.err  # -v reports the load time
    assert "loading" not in cap.err  # the status line is for terminals only
    m = fake_model_module[-1]
    assert m.kw == dict(
        path="x.gguf", device="cpu", n_ctx=2048, n_threads=2, vision=True, projector=None, ollama_converter="auto"
    )
    assert any(c[0] == "encode_images" for c in m.calls)
    prompt = m.tokenizer.decode([c for c in m.calls if c[0] == "eval"][0][1])
    assert "<|start_header_id|>user<|end_header_id|>\n\n<|image|>How are you?<|eot_id|>" in prompt


def test_cli_loading_status_on_a_terminal(fake_model_module, monkeypatch):
    """On a terminal, "loading FILE ..." shows while the model loads and is erased after."""
    import io
    import sys

    from mllama_q.cli import main

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["run", "-m", "dir/x.gguf", "-p", "hi", "--temperature", "0"]) == 0
    text = err.getvalue()
    # drawn at once (before the load returns), then wiped: spaces over it and a carriage return
    assert text.startswith("\rloading x.gguf  0 s") and text.endswith("\r" + " " * len("loading x.gguf  0 s") + "\r")
    assert "[loaded" not in text


def test_cli_run_errors_are_one_line(fake_model_module, capsys, tmp_path):
    from mllama_q.cli import main

    assert main(["run", "-m", "x.gguf", "-i", str(tmp_path / "nope.jpg"), "-p", "hi"]) == 1
    assert "error" in capsys.readouterr().err
    assert main(["run", "-m", "x.bin", "-p", "hi"]) == 1
    assert "not a GGUF" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # an argument error: argparse's status 2, in CLI words
        main(["run", "-m", "x.gguf", "-p", "hi", "--top-p", "0"])
    assert e.value.code == 2 and "--top-p must be in (0, 1]" in capsys.readouterr().err
    assert not fake_model_module  # reported before any model was made


def test_cli_run_json(fake_model_module, capsys):
    import json

    from mllama_q.cli import main

    assert main(["run", "-m", "x.gguf", "-p", "hi", "--temperature", "0", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (
        d["text"] == "Fine, thanks."
        and d["stop_reason"] == "stop_token"
        and d["completion_tokens"]
        == len(fake_model_module[-1].tokenizer.encode("Fine, thanks.", add_special_tokens=False))
    )


def test_cli_chat_keeps_history_and_images(fake_model_module, capsys, tmp_path):
    from mllama_q.cli.run import chat_main

    img = tmp_path / "b.png"
    Image.fromarray(np.full((30, 40, 3), 10, np.uint8)).save(img)
    lines = iter(
        ["/image " + str(img), "What is it?", "/image /no/such/file.png", "And now?", "/reset", "Hello", "/quit"]
    )
    rc = chat_main(["-m", "x.gguf", "--temperature", "0"], input_fn=lambda _: next(lines))
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("Fine, thanks.") == 3 and "image attached" in out and "not found" in out
    m = fake_model_module[-1]
    evals = [c for c in m.calls if c[0] == "eval" and c[1].size > 1]
    prompt = m.tokenizer.decode(evals[-1][1])
    # after /reset: no image, no earlier turns
    assert "<|image|>" not in prompt and "What is it?" not in prompt and prompt.count("Hello") == 1


def _bomb_png(path, w=20000, h=20000):
    import importlib.util
    from pathlib import Path as _P

    spec = importlib.util.spec_from_file_location(
        "fuzz_inputs", _P(__file__).resolve().parents[1] / "tools" / "fuzz" / "inputs.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path.write_bytes(mod.bomb_png(w, h))
    return path


def test_cli_run_decompression_bomb_is_one_error_line(fake_model_module, capsys, tmp_path):
    from mllama_q.cli import main

    bomb = _bomb_png(tmp_path / "bomb.png")
    assert main(["run", "-m", "x.gguf", "-i", str(bomb), "-p", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mllama-q run: error: ") and "pixels" in err, err
    assert not fake_model_module  # refused before the model was loaded
    many = ["-i", str(tmp_path / "nope.png")] * 17  # the per-prompt cap, before any file is read
    assert main(["run", "-m", "x.gguf", *many, "-p", "hi"]) == 1
    assert "17 images in one prompt" in capsys.readouterr().err


def test_cli_chat_survives_bad_images(fake_model_module, capsys, tmp_path):
    """A bomb (or a file that breaks later) is an error line; the conversation goes on.
    Regression: DecompressionBombError was not a ValueError and ended chat with a traceback."""
    from mllama_q.cli.run import chat_main

    bomb = _bomb_png(tmp_path / "bomb.png")
    good = tmp_path / "ok.png"
    Image.fromarray(np.full((30, 40, 3), 10, np.uint8)).save(good)
    late = tmp_path / "late.png"
    Image.fromarray(np.full((30, 40, 3), 99, np.uint8)).save(late)

    def break_late():
        late.write_bytes(b"\x89PNG broken")  # replaced after it was attached
        return "Look at this."

    lines = iter(
        ["First?", "/image " + str(bomb), "/image " + str(late), break_late, "/image " + str(good), "Second?", "/quit"]
    )
    rc = chat_main(
        ["-m", "x.gguf", "--temperature", "0"], input_fn=lambda _: (lambda x: x() if callable(x) else x)(next(lines))
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("Fine, thanks.") == 2
    assert "pixels" in out and "decompression bomb" in out  # the bomb, at /image
    assert "cannot" in out and "attached image(s) dropped" in out  # the broken file, at its turn
    m = fake_model_module[-1]
    last = [m.tokenizer.decode(c[1]) for c in m.calls if c[0] == "eval" and c[1].size > 1][-1]
    assert "First?" in last and "Look at this." not in last and last.count("<|image|>") == 1


def test_cli_chat_second_turn_sees_history(fake_model_module, tmp_path):
    from mllama_q.cli.run import chat_main

    img = tmp_path / "c.png"
    Image.fromarray(np.full((30, 40, 3), 10, np.uint8)).save(img)
    lines = iter(["/image " + str(img), "First?", "Second?"])

    def fake_input(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert chat_main(["-m", "x.gguf", "--temperature", "0"], input_fn=fake_input) == 0
    m = fake_model_module[-1]
    # the last prompt holds both turns, the first answer and the image once
    last_prompt = None
    for c in m.calls:
        if c[0] == "eval" and c[1].size > 1:
            last_prompt = m.tokenizer.decode(c[1])
    assert last_prompt.count("<|image|>") == 1
    assert "First?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nFine, thanks.<|eot_id|>" in last_prompt
    assert last_prompt.endswith("Second?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
