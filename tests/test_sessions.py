"""Sessions, prefix reuse and batched decoding (mllama_q/session.py, csrc/model/mllama.cpp).

References: a fresh run of the same tokens (what reuse must not change: at F32 the logits
are bit-identical, the CPU kernels being batch-invariant), each sequence run alone (what
batching must not change), transformers' generate (via the first turn, which test_model.py
and test_generate_model.py compare), and transformers' processor functions for the
cross-attention masks.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")
from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

import mllama_q  # noqa: E402

MAX_TILES, TILE = 4, 56  # tiny_models' vision config
RATIOS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]


@pytest.fixture(scope="module")
def files(tiny_checkpoint, tiny_gguf):
    ckpt = tiny_checkpoint(seed=0, dtype="float32")
    return {"f32": tiny_gguf(ckpt, "f32"), "q4_k": tiny_gguf(ckpt, "q4_k_s")}


def load(files, wtype="f32", **kw):
    kw.setdefault("kv_type", "f32")
    return mllama_q.Model(files[wtype], **kw)


def pixels(rng, grids):
    """MllamaProcessor-style arrays for images of the given tile grids."""
    n = len(grids)
    px = np.zeros((1, n, MAX_TILES, 3, TILE, TILE), np.float32)
    ids = np.zeros((1, n), np.int64)
    msk = np.zeros((1, n, MAX_TILES), np.int64)
    for i, g in enumerate(grids):
        nt = g[0] * g[1]
        px[0, i, :nt] = rng.standard_normal((nt, 3, TILE, TILE))
        ids[0, i] = RATIOS.index(g) + 1
        msk[0, i, :nt] = 1
    return px, ids, msk


def xmask(tokens, img, grids):
    """transformers' cross-attention mask [n, n_img, max_tiles] for these tokens (int32)."""
    spans = get_cross_attention_token_mask(list(tokens), img)
    m = convert_sparse_cross_attention_mask_to_dense([spans], [[g[0] * g[1] for g in grids]], MAX_TILES, len(tokens))
    return np.ascontiguousarray(m[0], dtype=np.int32)


def photo(seed, h=40, w=90):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def chat(text, n_images=0):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return {"role": "user", "content": content if n_images else text}


# ----------------------------------------------------------------------------------- core level
def test_prefix_reuse_equals_a_fresh_run_exactly(files):
    """Slot 0 evaluates a two-image prompt in two chunks, decodes five tokens one at a time
    (mask row repeated, as transformers' generate), extends with six more; slot 1 evaluates
    the same 30 tokens in one step. At F32 every logit row is bit-identical. Then slot 0
    keeps a 9-token prefix (truncation, no recompute) and takes a different suffix: again
    identical to a fresh run of the new sequence. Rows before the first image see no
    image (they attend to every key, transformers' rule), some rows see two images."""
    m = load(files, max_sessions=2)
    core, img = m._core, m.image_token_id
    rng = np.random.default_rng(3)
    grids = [(2, 2), (1, 2), (3, 1)]
    px, ids, msk = pixels(rng, grids)
    handles = m._image_handles(px, ids, msk)
    seq = [0, 50, 51, img, img, 52, 53, 54, img, 55, 56] + [int(t) for t in rng.integers(1, 300, 19)]
    mask = xmask(seq, img, grids)
    for s in (0, 1):
        core.seq_set_images(s, handles)
    got = [
        core.step([(0, np.int32(seq[:4]), mask[:4], 2, None)])[0][0],
        core.step([(0, np.int32(seq[4:19]), mask[4:19], 2, None)])[0][0],
    ]
    got += [core.step([(0, np.int32(seq[i : i + 1]), None, 1, None)])[0][0][None] for i in range(19, 24)]
    got.append(core.step([(0, np.int32(seq[24:]), mask[24:], 2, None)])[0][0])
    got = np.concatenate(got)
    fresh = core.step([(1, np.int32(seq), mask, 2, None)])[0][0]
    assert got.shape == fresh.shape == (30, m.text_hparams["vocab_size"])
    assert np.array_equal(got, fresh)
    # divergence after 9 tokens (the three images are in the prefix): the cache is
    # truncated, not rebuilt, and the new suffix gives a fresh run's logits
    new = seq[:9] + [7, 8, 9, 10, 11, 12, 13]
    mask_new = xmask(new, img, grids)
    core.seq_truncate(0, 9)
    tail = core.step([(0, np.int32(new[9:]), mask_new[9:], 2, None)])[0][0]
    core.seq_truncate(1, 0)
    fresh2 = core.step([(1, np.int32(new), mask_new, 2, None)])[0][0]
    assert np.array_equal(tail, fresh2[9:])
    # transformers' rule for rows that see no image: they attend to every image of the
    # prompt, so a prompt with a 4th image changes the rows before the first one (the
    # scheduler therefore reuses nothing when the image list changes; see session.py)
    px2, ids2, msk2 = pixels(np.random.default_rng(4), [(1, 1)])
    handles2 = handles + m._image_handles(px2, ids2, msk2)
    more = new + [img, 14]
    core.seq_truncate(1, 0)
    core.seq_set_images(1, handles2)
    fresh3 = core.step([(1, np.int32(more), xmask(more, img, grids + [(1, 1)]), 2, None)])[0][0]
    assert not np.array_equal(fresh3[:3], fresh2[:3])
    m.close()


@pytest.mark.parametrize("wtype", ["f32", "q4_k"])
def test_batched_steps_equal_each_sequence_alone(files, wtype):
    """Four sequences of different lengths -- two text only, one image, two images -- started
    at different steps, decoded together (one forward pass per step, each with its own
    positions, KV cache, cross-attention keys or none), next to newcomers' prefill chunks
    (with and without images: a step's rows are then prompt / decode / prompt). Every logit
    row is bit-identical to the same sequence run alone (its prompt in one step, then one
    decode step per token), at F32 and for Q4_K: decode rows take the per-row kernels and
    prompt rows the panel GEMM whatever the step's size (Backend::matmul_rows), so the
    8-bit activation kernels' two float orders never mix within a row's history."""
    m = load(files, wtype, max_sessions=5)
    core, img = m._core, m.image_token_id
    rng = np.random.default_rng(9)
    px, ids, msk = pixels(rng, [(2, 2), (1, 1)])
    h = m._image_handles(px, ids, msk)
    seqs = {
        "A": ([0, 17, 250, 33, 9, 120, 61, 200, 5, 77, 300, 42], [], None),
        "B": ([0, 20, 21, img, 30, 31, 32, 33, 34], [h[0]], [(2, 2)]),
        "C": ([0, 60, img, 61, img, 62, 63, 64, 65, 66, 67, 68], h, [(2, 2), (1, 1)]),
        "D": ([0] + [int(t) for t in rng.integers(1, 300, 19)], [], None),
    }
    decode = {k: [int(t) for t in rng.integers(1, 300, 6)] for k in seqs}

    def rows(k):  # tokens and mask rows of the full sequence (prompt + decoded)
        toks, _, grids = seqs[k]
        full = toks + decode[k]
        return full, (None if grids is None else xmask(full, img, grids))

    alone = {}
    for k, (toks, hs, _) in seqs.items():
        core.seq_truncate(4, 0)
        core.seq_set_images(4, hs)
        full, mk = rows(k)
        n = len(toks)
        lg = [core.step([(4, np.int32(full[:n]), None if mk is None else mk[:n], 2, None)])[0][0]]
        for i in range(n, len(full)):
            e = (4, np.int32(full[i : i + 1]), None if mk is None else mk[i : i + 1], 2, None, True)
            lg.append(core.step([e])[0][0])
        alone[k] = np.concatenate(lg)
    slot = {"A": 0, "B": 1, "C": 2, "D": 3}
    for k, s in slot.items():
        core.seq_truncate(s, 0)
        core.seq_set_images(s, seqs[k][1])
    pos = {k: 0 for k in seqs}
    # (sequence, tokens this step) per step: A starts alone, B joins at step 1 with a prefill
    # chunk, C at step 2, D (text) at step 3 while C's prompt ends; each decodes one token per
    # step once its prompt is in.
    plan = [
        {"A": 12},
        {"A": 1, "B": 5},
        {"A": 1, "B": 4, "C": 7},
        {"A": 1, "B": 1, "C": 5, "D": 3},
        {"A": 1, "B": 1, "C": 1, "D": 17},
        {"A": 1, "B": 1, "C": 1, "D": 1},
        {"B": 1, "C": 1, "D": 1},
        {"C": 1, "D": 1},
        {"D": 1},
        {"D": 1},
    ]
    for step in plan:
        entries, keys = [], []
        for k, n in step.items():
            full, mk = rows(k)
            a, b = pos[k], pos[k] + n
            dec = a >= len(seqs[k][0])
            entries.append((slot[k], np.int32(full[a:b]), None if mk is None else mk[a:b], 2, None, dec))
            keys.append((k, a, b))
        out = core.step(entries)
        for (k, a, b), (lg, _) in zip(keys, out):
            assert np.array_equal(lg, alone[k][a:b]), (k, a, b)
            pos[k] = b
    assert all(pos[k] > len(seqs[k][0]) for k in seqs)  # every sequence decoded
    m.close()


def test_entries_default_to_their_row_class(files):
    """A one-token entry without the decode flag is a decode row (Model.eval's next token keeps
    the per-row kernels: on the panel GEMM a lone row would cost a 16-row panel), a longer one
    prompt rows; the flag overrides both. At Q4_K the two classes give different bits, so the
    logits tell which kernels ran."""
    m = load(files, "q4_k", max_sessions=2)
    core = m._core
    prompt = np.int32([0, 17, 250, 33, 9])

    def run(entry_tail, toks):
        core.seq_truncate(0, 0)
        core.step([(0, prompt, None, 0, None)])
        return core.step([(0, np.int32(toks), None, 2, None, *entry_tail)])[0][0]

    one_default, one_dec, one_prompt = run((), [120]), run((True,), [120]), run((False,), [120])
    assert np.array_equal(one_default, one_dec) and not np.array_equal(one_dec, one_prompt)
    two_default, two_dec, two_prompt = run((), [120, 61]), run((True,), [120, 61]), run((False,), [120, 61])
    assert np.array_equal(two_default, two_prompt) and not np.array_equal(two_dec, two_prompt)
    m.close()
    m = load(files, "q4_k")  # the low-level API on a model of its own
    m.eval(prompt)
    assert np.array_equal(m.eval([120]), one_dec[0])
    m.close()


def test_core_step_checks_its_entries(files):
    m = load(files, max_sessions=2)
    core = m._core
    with pytest.raises(ValueError, match="slot"):
        core.step([(5, np.int32([1, 2]), None, 1, None)])
    with pytest.raises(ValueError, match="twice"):
        core.step([(0, np.int32([1]), None, 1, None), (0, np.int32([2]), None, 1, None)])
    with pytest.raises(ValueError, match="out of range"):
        core.step([(0, np.int32([1, 10**6]), None, 1, None)])
    with pytest.raises(ValueError, match="logits"):
        core.step([(0, np.int32([1]), None, 3, None)])
    with pytest.raises(ValueError, match="top_p"):
        core.step([(0, np.int32([1]), None, 0, (1.0, 0, 1.5, 0.0, 1.0, 0.5))])
    with pytest.raises(ValueError, match="n_ctx"):
        core.step([(0, np.zeros(m.n_ctx + 1, np.int32), None, 0, None)])
    with pytest.raises(ValueError, match="decode must be"):
        core.step([(0, np.int32([1]), None, 1, None, 1)])
    with pytest.raises(ValueError, match="entries are"):
        core.step([(0, np.int32([1]), None, 1, None, True, 0)])
    with pytest.raises(ValueError, match="seq_truncate"):
        core.seq_truncate(0, 3)
    assert core.seq_len(0) == 0 and core.seq_len(1) == 0  # nothing was committed
    m.close()


# ------------------------------------------------------------------------------- session level
def test_second_turn_reuses_the_first(files):
    """Turn 2 of a chat about one image prefills only what turn 1 did not cache, never
    encodes the image again, and generates what a fresh one-shot call generates (F32)."""
    m = load(files, max_sessions=2, n_ctx=256)
    img = photo(1)
    msgs = [chat("Describe the picture", 1)]
    with m.session() as s:
        r1 = s.generate(messages=msgs, images=[img], max_new_tokens=8, temperature=0)
        assert (r1.cached_tokens, r1.images_encoded, r1.images_cached) == (0, 1, 0)
        # the time to first token splits into the caller's preparation (image resize,
        # template, tokenizer), the wait for the engine, the image encode and the prefill
        phases = [r1.timings[k] for k in ("prepare_s", "queue_s", "image_encode_s", "prefill_s")]
        assert min(phases) >= 0 and phases[0] > 0 and phases[2] > 0
        assert sum(phases) == pytest.approx(r1.timings["time_to_first_token_s"], abs=1e-6)
        n1 = len(s.tokens)
        assert n1 == r1.prompt_tokens + r1.completion_tokens - (r1.stop_reason == "length")
        msgs2 = msgs + [{"role": "assistant", "content": r1.text}, chat("And the colours?")]
        r2 = s.generate(messages=msgs2, images=[img], max_new_tokens=8, temperature=0)
        assert r2.images_encoded == 0 and r2.images_cached == 1
        assert r1.prompt_tokens <= r2.cached_tokens < r2.prompt_tokens
        fresh = m.generate(messages=msgs2, images=[img], max_new_tokens=8, temperature=0)
        assert fresh.tokens == r2.tokens and fresh.cached_tokens == 0
        assert fresh.images_cached == 1  # the shared image cache
    m.close()


def test_session_tokens_and_divergent_prompts(files):
    m = load(files, n_ctx=128, max_sessions=2)
    with m.session() as s:
        r = s.generate(prompt="<|begin_of_text|>one two three four five", max_new_tokens=3, temperature=0)
        toks = s.tokens
        assert isinstance(toks, tuple) and len(toks) == r.prompt_tokens + 2  # the last token is not fed
        assert toks[: r.prompt_tokens] == tuple(m.processor(text="one two three four five")["input_ids"][0])
        r2 = s.generate(prompt="<|begin_of_text|>one two six", max_new_tokens=3, temperature=0)
        assert 0 < r2.cached_tokens < r.prompt_tokens  # the common prefix only
        assert s.tokens[: r2.cached_tokens] == toks[: r2.cached_tokens]
        fresh = m.generate(prompt="<|begin_of_text|>one two six", max_new_tokens=3, temperature=0)
        assert fresh.tokens == r2.tokens
        s.reset()
        assert s.tokens == ()
        assert s.generate(prompt="<|begin_of_text|>one two six", max_new_tokens=3, temperature=0).cached_tokens == 0
    m.close()


def test_sessions_driven_from_threads_match_sequential_runs(files):
    """Four sessions in four threads, started at different times (text only, one image, two
    images, sampled with a seed): every reply equals the same request run alone."""
    m = load(files, max_sessions=4, n_ctx=256)
    reqs = [
        dict(messages=[chat("Hello there, who are you?")], max_new_tokens=12, temperature=0),
        dict(messages=[chat("What is this?", 1)], images=[photo(2)], max_new_tokens=10, temperature=0),
        dict(messages=[chat("Compare them", 2)], images=[photo(3), photo(4, 70, 20)], max_new_tokens=9, temperature=0),
        dict(messages=[chat("Tell me a story")], max_new_tokens=11, temperature=1.0, top_k=20, seed=7),
    ]
    alone = [m.generate(**r).tokens for r in reqs]
    results = [None] * len(reqs)
    started = [threading.Event() for _ in reqs]

    def worker(i):
        if i:
            started[i - 1].wait(30)  # start once the previous one is producing text
        with m.session() as s:
            st = s.generate(stream=True, **reqs[i])
            for n, _ in enumerate(st):
                if n == 1:
                    started[i].set()
            started[i].set()
            results[i] = st.result

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.tokens for r in results] == alone
    m.close()


def test_too_many_sessions_and_one_shot_calls(files):
    m = load(files, max_sessions=2, n_ctx=64)
    a, b = m.session(), m.session()
    with pytest.raises(RuntimeError, match="max_sessions"):
        m.session()
    with pytest.raises(RuntimeError, match="max_sessions"):
        m.generate(prompt="x", max_new_tokens=2)
    b.close()
    assert m.generate(prompt="x", max_new_tokens=2, temperature=0).completion_tokens >= 1
    # the low-level API's slot is taken back by a session that needs it
    m.eval([1, 2, 3])
    assert m.n_past == 3
    with m.session() as c:
        # one token is sampled, whether or not it is a stop token (the tiny model's choice)
        r = c.generate(prompt="x", max_new_tokens=1, seed=0)
        assert r.prompt_tokens == 3 and (r.completion_tokens, r.stop_reason) in ((1, "length"), (0, "stop_token"))
    assert m.n_past == 0
    a.close()
    with pytest.raises(RuntimeError, match="closed"):
        a.generate(prompt="x")
    m.close()


def test_interrupting_an_image_encode_or_a_prefill_leaves_the_session_as_before(files):
    """Ctrl-C (a KeyboardInterrupt raised in the caller's thread, here by the progress
    callback) stops the image encode or the prefill at the next unit, and the session is
    exactly as before the turn: the next turn gives what a fresh run gives."""
    m = load(files, max_sessions=2, n_ctx=256, n_batch=8, prefill_chunk=4)
    msgs = [chat("Hello there")]
    with m.session() as s:
        r1 = s.generate(messages=msgs, max_new_tokens=4, temperature=0)
        before = s.tokens
        seen = []

        def stop_at(phase, limit):
            def cb(ph, done, total):
                seen.append((ph, done, total))
                if ph == phase and done >= limit:
                    raise KeyboardInterrupt

            return cb

        msgs2 = msgs + [{"role": "assistant", "content": r1.text}, chat("Look at this", 1)]
        with pytest.raises(KeyboardInterrupt):
            s.generate(
                messages=msgs2, images=[photo(5)], max_new_tokens=4, temperature=0, progress=stop_at("image_encode", 3)
            )
        assert s.tokens == before and s.n_images == 0
        assert [p for p in seen if p[0] == "image_encode"][-1][1] == 3
        seen.clear()
        with pytest.raises(KeyboardInterrupt):  # the encode runs to its end this time, the prefill is cut
            s.generate(
                messages=msgs2, images=[photo(5)], max_new_tokens=4, temperature=0, progress=stop_at("prefill", 8)
            )
        # Progress events reach the caller asynchronously: on this tiny model the scheduler may
        # have finished the first encode before the interrupt reached it, and the image is
        # then in the shared cache (not in the session) and is not encoded again.
        enc = [p for p in seen if p[0] == "image_encode"]
        assert not enc or enc[-1][1] == enc[-1][2]
        assert [p for p in seen if p[0] == "prefill"][-1][1] == 8
        assert s.tokens == before and s.n_images == 0
        # a stream closed during the prefill: cancelled, session as before
        st = s.generate(messages=msgs2, images=[photo(5)], max_new_tokens=4, temperature=0, stream=True)
        st.close()
        assert st.result.stop_reason in ("cancelled", "length", "stop_token")
        if st.result.stop_reason == "cancelled" and not st.result.tokens:
            assert s.tokens == before
        r2 = s.generate(messages=msgs2, images=[photo(5)], max_new_tokens=4, temperature=0)
        fresh = m.generate(messages=msgs2, images=[photo(5)], max_new_tokens=4, temperature=0)
        assert r2.tokens == fresh.tokens and r2.images_cached == 1
    m.close()


def test_progress_reports_units_and_chunks(files):
    m = load(files, n_ctx=256, n_batch=16)
    seen = []
    m.generate(
        messages=[chat("What is in this picture? Describe it carefully.", 1)],
        images=[photo(6)],
        max_new_tokens=2,
        progress=lambda *a: seen.append(a),
    )
    enc = [p for p in seen if p[0] == "image_encode"]
    pre = [p for p in seen if p[0] == "prefill"]
    vh = m.vision_hparams
    units = 1 + vh["num_layers"] + vh["num_global_layers"] + 2  # embed, layers, projector, K/V
    assert [p[1] for p in enc] == list(range(1, units + 1)) and {p[2] for p in enc} == {units}
    assert len(pre) >= 2 and pre[-1][1] == pre[-1][2] and all(a[1] < b[1] for a, b in zip(pre, pre[1:]))
    m.close()


def test_image_cache_is_shared_and_bounded(files):
    m = load(files, max_sessions=2, n_ctx=256, image_cache=1)
    a, b = m.session(), m.session()
    r = a.generate(messages=[chat("Hi", 1)], images=[photo(7)], max_new_tokens=1)
    assert (r.images_encoded, r.images_cached) == (1, 0)
    r = b.generate(messages=[chat("Hi", 1)], images=[photo(7)], max_new_tokens=1)  # from the LRU
    assert (r.images_encoded, r.images_cached) == (0, 1)
    b.generate(messages=[chat("Hi", 1)], images=[photo(8)], max_new_tokens=1)  # evicts photo 7
    b.reset()
    r = b.generate(messages=[chat("Hi", 1)], images=[photo(7)], max_new_tokens=1)  # session a holds it
    assert (r.images_encoded, r.images_cached) == (0, 1)
    mem = m.memory()
    assert mem["image_cache_images"] == 1 and mem["image_cache_bytes"] == mem["image_bytes"] > 0
    a.close()
    b.close()
    m.close()


def test_processor_outputs_and_transformers_vocabulary(files):
    """model.generate(**model.processor(...)) as transformers users write it; do_sample=False is
    greedy; stop_strings is transformers' name, stop= its llama.cpp / OpenAI alias."""
    m = load(files, n_ctx=256)
    text = "<|image|>Describe the picture"
    img = photo(9)
    ref = m.generate(prompt=text, images=[img], max_new_tokens=6, temperature=0)
    enc = m.processor(text=text, images=[img])
    assert set(enc) >= {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "aspect_ratio_ids",
        "aspect_ratio_mask",
        "cross_attention_mask",
    }
    got = m.generate(**enc, max_new_tokens=6, do_sample=False)
    assert got.tokens == ref.tokens and got.prompt_tokens == enc["input_ids"].shape[1]
    with pytest.raises(ValueError, match="batch"):
        m.generate(**{**enc, "input_ids": np.repeat(enc["input_ids"], 2, axis=0)})
    with pytest.raises(ValueError, match="attention_mask"):
        m.generate(**{**enc, "attention_mask": np.zeros_like(enc["attention_mask"])})
    with pytest.raises(ValueError, match="cross_attention_mask"):
        m.generate(**{**enc, "cross_attention_mask": enc["cross_attention_mask"][:, :3]})
    no_image = np.where(enc["input_ids"] == m.image_token_id, 100, enc["input_ids"])
    with pytest.raises(ValueError, match="image token"):
        m.generate(
            input_ids=no_image,
            pixel_values=enc["pixel_values"],
            aspect_ratio_ids=enc["aspect_ratio_ids"],
            aspect_ratio_mask=enc["aspect_ratio_mask"],
        )
    with pytest.raises(ValueError, match="not both"):
        m.generate(prompt="x", stop="a", stop_strings="b")
    with pytest.raises(ValueError, match="not both"):
        m.generate(prompt="x", input_ids=enc["input_ids"])
    with pytest.raises(ValueError, match="progress"):
        m.generate(prompt="x", progress=3)
    with pytest.raises(ValueError, match="do_sample"):
        m.generate(prompt="x", do_sample="yes")
    with pytest.raises(ValueError, match=r"\[0, "):
        m.generate(input_ids=[[1, -4]])
    m.close()


def test_full_context_is_reported(files):
    m = load(files, n_ctx=24)
    res = m.generate(prompt="<|begin_of_text|>one two three", max_new_tokens=100, temperature=0)
    assert res.stop_reason == "context_full"
    # 24 tokens fill the cache (the prompt and the fed tokens); the last sampled one is not fed
    assert res.prompt_tokens + res.completion_tokens == 24 + 1
    m.close()


def test_memory_budget_is_explicit(files, monkeypatch):
    import mllama_q.model as model_mod

    m = load(files, max_sessions=3, n_ctx=100)
    mem = m.memory()
    th = m.text_hparams
    per = (th["n_layer"] - len(th["cross_attention_layers"])) * 2 * 100 * th["n_kv_head"] * th["head_dim"] * 4
    assert mem["kv_bytes_per_session"] == per and mem["kv_bytes_total"] == 3 * per
    m.close()
    monkeypatch.setattr(model_mod, "_available_memory", lambda: per)
    with pytest.raises(ValueError, match=r"n_ctx=100 x max_sessions=2 needs"):
        load(files, max_sessions=2, n_ctx=100)
    monkeypatch.undo()
    for kw in (
        {"max_sessions": 0},
        {"max_sessions": 1.5},
        {"n_batch": 0},
        {"n_batch": 513},
        {"prefill_chunk": 0},
        {"image_cache": -1},
        {"max_sessions": 8, "n_batch": 8},
    ):
        with pytest.raises(ValueError):
            load(files, **kw)


def test_close_releases_the_model(files):
    path = str(files["f32"])

    def mapped():
        with open(f"/proc/{os.getpid()}/maps") as f:
            return sum(path in line for line in f)

    m = load(files, max_sessions=2)
    s = m.session()
    s.generate(prompt="x", max_new_tokens=2)
    # the reopened model must give what this one gives (greedy: the tiny model may well pick a
    # stop token first, so a token count alone would be a coin toss under random sampling)
    want = m.generate(prompt="x", max_new_tokens=4, temperature=0)
    want_logits = m.forward([[1, 2, 3]])
    assert mapped() > 0
    m.close()
    assert mapped() == 0
    for call in (lambda: m.generate(prompt="x"), m.session, lambda: m.eval([1]), lambda: s.generate(prompt="x")):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    with load(files) as m2:
        got = m2.generate(prompt="x", max_new_tokens=4, temperature=0)
        assert (got.tokens, got.stop_reason, got.prompt_tokens) == (want.tokens, want.stop_reason, want.prompt_tokens)
        np.testing.assert_array_equal(m2.forward([[1, 2, 3]]), want_logits)
    assert mapped() == 0


def test_chat_cli_on_a_session(files, tmp_path, capsys, monkeypatch):
    """`mllama-q chat` on the tiny model: turn 2 reuses turn 1's tokens and image, a message of
    several lines is one message, Ctrl-C during an image encode drops that turn and its image."""
    from mllama_q.cli import progress as progress_mod
    from mllama_q.cli.run import chat_main

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    photo(11).save(a)
    photo(12, 70, 30).save(b)
    calls = {"n": 0}
    real_call = progress_mod.PhaseProgress.__call__

    def interrupt_second_image(self, phase, done, total):  # Ctrl-C during the 2nd image's encode
        if phase == "image_encode":
            calls["n"] += 1
            if calls["n"] > total + 1:
                raise KeyboardInterrupt
        return real_call(self, phase, done, total)

    monkeypatch.setattr(progress_mod.PhaseProgress, "__call__", interrupt_second_image)
    lines = iter(
        [
            "/image " + str(a),
            "What is it?",
            '"""',
            "And now,",
            'in two lines?"""',
            "/image " + str(b),
            "Compare",
            "Last one?",
            "/quit",
        ]
    )
    rc = chat_main(
        ["-m", str(files["f32"]), "--temperature", "0", "-n", "3", "-c", "512", "-v"], input_fn=lambda _: next(lines)
    )
    cap = capsys.readouterr()
    assert rc == 0
    reports = [ln for ln in cap.err.splitlines() if ln.startswith("[") and " prompt tokens" in ln]
    assert len(reports) == 3  # turns 1, 2 and 4 (turn 3 was interrupted)
    assert "0 image(s) reused, 1 encoded" in reports[0]
    # The progress the CLI shows lags the engine: on this tiny model the Ctrl-C may land after
    # turn 3's image and prompt were done. Then the session keeps them and so does the
    # conversation (turn 4 sees both images, reused); else turn 3 and its image are dropped.
    dropped = "(interrupted: message and its images dropped)" in cap.out
    assert dropped or "(interrupted)" in cap.out
    assert "1 image(s) reused, 0 encoded" in reports[1]
    assert ("1 image(s) reused, 0 encoded" if dropped else "2 image(s) reused, 0 encoded") in reports[2]
    prompt_tokens = [int(r[1:].split(" prompt")[0]) for r in reports]
    for prev, r in zip(prompt_tokens, reports[1:]):  # no image encoded again
        reused = int(r.split("cache: ")[1].split(" of ")[0])
        assert reused >= prev  # (at least) the whole previous prompt came from the cache


def test_start_with_a_sink_delivers_the_streamed_events(files):
    """Session.start (the server's path): the engine thread calls the sink with the pieces and
    the result of the same turn generate(stream=True) gives; its handle cancels; bad values are
    refused as generate refuses them."""
    m = load(files, max_sessions=1, n_ctx=256)
    msgs = [chat("Tell me about the sea", 1)]
    img = photo(3)
    with m.session() as s:
        st = s.generate(messages=msgs, images=[img], max_new_tokens=12, temperature=0, stream=True)
        pieces = list(st)
        s.reset()
        events, done = [], threading.Event()

        def sink(ev):
            events.append((ev, threading.get_ident()))
            if ev[0] in ("done", "error"):
                done.set()

        handle = s.start(sink, messages=msgs, images=[img], max_new_tokens=12, temperature=0)
        assert done.wait(60)
        assert handle.finished
        kinds = [ev[0] for ev, _ in events]
        assert kinds[-1] == "done" and "error" not in kinds
        assert [ev[1] for ev, _ in events if ev[0] == "piece"] == pieces
        assert events[-1][0][1].tokens == st.result.tokens and events[-1][0][1].text == st.result.text
        assert {tid for _, tid in events} == {m._scheduler._thread.ident}  # no thread of its own
        assert s._turn is None  # the session is free when the sink hears the end

        # cancelled from another thread, without waiting: the sink hears "cancelled"
        events.clear()
        done.clear()
        handle = s.start(sink, messages=[chat("Tell me about the sea")], max_new_tokens=200, temperature=0)
        handle.cancel()
        assert done.wait(60)
        assert events[-1][0][0] == "done" and events[-1][0][1].stop_reason == "cancelled"

        with pytest.raises(TypeError, match="progress"):
            s.start(sink, messages=msgs, images=[img], progress=print)
        with pytest.raises(ValueError):
            s.start(sink, messages=msgs, images=[img], temperature=-1.0)
        with pytest.raises(TypeError):
            s.start(sink, messages=msgs, images=[img], stream=True)
    m.close()
