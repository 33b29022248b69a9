"""Hostile or broken inputs outside the GGUF reader (issue 8, deliverable 3): each case is a
regression test for a crash, hang, unbounded allocation or silent garbage found by fuzzing,
and asserts a clear exception (a ValueError subclass naming the argument) instead.

GGUF files themselves are tests/test_bad_gguf.py's; converter inputs are in test_convert.py."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import mllama_q
from mllama_q import _core, quants


def _run_child(env: dict, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (a crash or a hang there must not take the test
    session with it); env from the child_env fixture."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tempfile.gettempdir(),
    )


# ------------------------------------------------------------------ _core sizes: checked arithmetic
def test_get_rows_huge_row_count_is_an_overflow_error_not_a_wrapped_size():
    # 2**62 rows of 4 floats: rows * row_bytes wrapped to 0 and matched the empty table, then the
    # kernel read far outside it (garbage or a segfault).
    b = _core.Backend("cpu")
    with pytest.raises(ValueError, match="overflows"):
        b.get_rows(np.zeros(0, np.uint8), "f32", 2**62, 4, np.array([5], np.int32))


def test_get_rows_ids_are_range_checked_before_narrowing():
    b = _core.Backend("cpu")
    table = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(b.get_rows(table, "f32", 4, 4, np.array([2], np.int64)), table[2:3])
    for bad in (np.array([2**32 + 1], np.int64), np.array([-1]), np.array([4])):
        with pytest.raises(ValueError, match="ids values must lie in"):
            b.get_rows(table, "f32", 4, 4, bad)
    with pytest.raises(ValueError, match="integer array"):
        b.get_rows(table, "f32", 4, 4, np.array([1.7]))


def test_dequantize_zero_size_with_huge_extent_returns_at_once():
    # (2**40, 0): zero bytes, so the size check passed, then 2**40 empty row decodes ran (never returned)
    out = quants.dequantize(np.zeros(0, np.uint8), "q8_0", (2**40, 0))
    assert out.shape == (2**40, 0) and out.dtype == np.float32
    assert _core.dequantize(np.zeros(0, np.uint8), "q8_0", 2**40, 0).shape == (2**40, 0)
    assert quants.dequantize(np.zeros(0, np.uint8), "q4_k", (0, 2**20 * 256)).shape == (0, 2**20 * 256)
    # a shape whose element count overflows int64: numpy's product wrapped, here it is exact
    with pytest.raises(ValueError, match="bytes"):
        quants.dequantize(np.zeros(34, np.uint8), "q8_0", (2**32, 2**32, 32))
    with pytest.raises(ValueError, match="overflows"):
        _core.dequantize(np.zeros(0, np.uint8), "f32", 2**62, 2**4)
    assert _core.quantize(np.zeros((2**20, 0), np.float32), "q8_0").shape == (2**20, 0)


def test_matmul_sizes_are_checked():
    x = np.zeros((2, 32), np.float32)
    with pytest.raises(ValueError, match="overflows"):
        _core.matmul(x, np.zeros(0, np.uint8), "q8_0", 2**61, 32)
    with pytest.raises(ValueError, match="overflows"):
        _core.Backend("cpu").matmul(x, np.zeros(0, np.uint8), "f32", 2**62, 32)
    assert _core.matmul(np.zeros((0, 32), np.float32), np.zeros((3, 34), np.uint8), "q8_0", 3, 32).shape == (0, 3)


def test_backend_zero_size_arrays_with_huge_extents():
    b = _core.Backend("cpu")
    q = np.zeros((1, 2**40, 0), np.float32)  # zero bytes, but int(2**40) narrowed to 0 heads
    with pytest.raises(ValueError, match="n_head"):
        b.attention(q, q, q, 1.0)
    with pytest.raises(ValueError, match="n_head"):
        b.rope(np.zeros((1, 2**33, 0), np.float32), np.array([0]), np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="pos values must lie in"):
        b.rope(np.zeros((1, 1, 2), np.float32), np.array([2**31]), np.ones(1, np.float32))
    with pytest.raises(ValueError, match="at least one key"):
        no_keys = np.zeros((0, 1, 2), np.float32)
        b.attention(np.zeros((1, 1, 2), np.float32), no_keys, no_keys, 1.0)


# ------------------------------------------------------------------ thread pool
def test_set_num_threads_while_kernels_run_is_safe(child_env):
    # Resizing destroyed the pool under kernels running in other threads: a hang (deadlock)
    # or a use-after-free. Now it resizes in place between loops; results stay exact.
    res = _run_child(
        child_env(),
        """
        import threading, numpy as np
        from mllama_q import _core, quants
        rng = np.random.default_rng(0)
        x = rng.standard_normal((64, 1024)).astype(np.float32)
        w = quants.quantize(rng.standard_normal((256, 1024)).astype(np.float32), "q8_0")
        ref = _core.matmul(x, w, "q8_0", 256, 1024)
        b = _core.Backend("cpu")
        stop, bad = False, []
        def work(f):
            while not stop:
                if not np.array_equal(f(), ref):
                    bad.append(1)
        ts = [threading.Thread(target=work, args=(lambda: _core.matmul(x, w, "q8_0", 256, 1024),)),
              threading.Thread(target=work, args=(lambda: b.matmul(x, w, "q8_0", 256, 1024),))]
        for t in ts: t.start()
        for i in range(300):
            _core.set_num_threads(1 + i % 4)
        stop = True
        for t in ts: t.join()
        print("done", len(bad), _core.num_threads())
    """,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["done", "0", "4"]


def test_set_num_threads_bounds():
    n = _core.num_threads()
    with pytest.raises(ValueError, match="1024"):
        _core.set_num_threads(100000)
    assert _core.num_threads() == n


# ------------------------------------------------------------------ a small model (synthetic, no torch)
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from mllama_q.cli.synthetic import write_synthetic_gguf

    path = tmp_path_factory.mktemp("bad_inputs") / "tiny.gguf"
    write_synthetic_gguf(path, "tiny", "q8_0", seed=1, progress=False)
    return mllama_q.Model(path, n_ctx=256, kv_type="f32")


def _image_inputs(m, n_img=1):
    vh = m.vision_hparams
    T, S = vh["max_num_tiles"], vh["image_size"]
    px = np.random.default_rng(0).standard_normal((1, n_img, T, 3, S, S)).astype(np.float32)
    ids = np.ones((1, n_img), np.int64)
    mask = np.zeros((1, n_img, T), np.int64)
    mask[..., 0] = 1
    return px, ids, mask


# ------------------------------------------------------------------ ids, masks and pixels from the caller
def test_token_ids_are_not_narrowed(tiny_model):
    m = tiny_model
    ref = m.forward([0, 5])
    # int64 2**32 + 5 was force-cast to int32 5 and silently gave the logits of token 5
    for bad in (
        [0, 2**32 + 5],
        np.array([0, 2**32 + 5], np.int64),
        np.array([0, 2**63 - 1], np.int64),
        np.array([0, 2**64 - 1], np.uint64),
        [0, -1],
    ):
        with pytest.raises(ValueError, match="out of range"):
            m.forward(bad)
        with pytest.raises(ValueError, match="out of range"):
            m._core.step([(0, np.asarray(bad), None, 1, None)])  # the binding checks before narrowing
    with pytest.raises(ValueError, match="integer"):
        m._core.step([(0, np.array([0.0, 5.0]), None, 1, None)])
    np.testing.assert_array_equal(m.forward(np.array([0, 5], np.uint16)), ref)  # any integer dtype is fine


def test_step_integers_are_checked_not_cast(tiny_model):
    """slot / logits / top_k past int32 were pybind11 'Unable to cast' RuntimeErrors (the fuzzer's
    case: top_k=2**32 through generate); now ValueErrors naming the field, and a legal huge top_k
    means 'keep every token' like 0."""
    m = tiny_model
    m.reset()
    for slot in (2**31, -1, m._core.n_seq, "0", 0.0):
        with pytest.raises(ValueError, match="slot"):
            m._core.step([(slot, np.array([0, 5]), None, 1, None)])
    for logits in (3, -1, 2**40):
        with pytest.raises(ValueError, match="logits"):
            m._core.step([(0, np.array([0, 5]), None, logits, None)])
    with pytest.raises(ValueError, match="top_k"):
        m._core.step([(0, np.array([0, 5]), None, 1, (1.0, 2**32, 1.0, 0.0, 1.0, 0.5))])
    kw = dict(prompt="hi", max_new_tokens=4, temperature=1.0, seed=3)
    assert m.generate(top_k=2**32, **kw).text == m.generate(top_k=0, **kw).text


def test_aspect_ratio_ids_masks_and_pixels_are_checked(tiny_model):
    m = tiny_model
    px, ids, mask = _image_inputs(m)
    tokens = [0, m.image_token_id, 5]
    cam = np.zeros((1, 3, 1, px.shape[2]), np.int64)
    cam[0, 1:, 0, 0] = 1
    ref = m.forward(tokens, px, ids, mask, cam)
    for bad_ids in (np.array([[2**32 + 1]]), np.array([[-1]]), np.array([[99]])):
        with pytest.raises(ValueError, match="aspect_ratio_ids values must lie in"):
            m.forward(tokens, px, bad_ids, mask, cam)
    bad_mask = mask.copy()
    bad_mask[0, 0, 0] = 2**32 + 1  # was read as 1
    with pytest.raises(ValueError, match="aspect_ratio_mask values must lie in"):
        m.forward(tokens, px, ids, bad_mask, cam)
    bad_cam = cam.copy()
    bad_cam[0, 2, 0, 0] = 2**32 + 1
    with pytest.raises(ValueError, match="cross_attention_mask values must lie in"):
        m.forward(tokens, px, ids, mask, bad_cam)
    for v in (np.nan, np.inf, -np.inf):
        bad_px = px.copy()
        bad_px[0, 0, 0, 1, 2, 3] = v  # NaN pixels made every logit NaN
        with pytest.raises(ValueError, match="non-finite"):
            m.forward(tokens, bad_px, ids, mask, cam)
    np.testing.assert_array_equal(m.forward(tokens, px, ids, mask, cam), ref)  # the model is unharmed


def test_image_count_is_capped_before_any_image_is_decoded(tiny_model, tmp_path):
    from mllama_q import hparams

    m = tiny_model
    n = 10_000  # ran for minutes and gigabytes
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"{n} images in one prompt; this model takes at most"):
        m.generate(
            prompt="<|image|>" * n + "hi", images=[tmp_path / f"missing{i}.png" for i in range(n)], max_new_tokens=1
        )
    assert time.perf_counter() - t0 < 5  # refused before any file was even looked at
    k = hparams.MAX_IMAGES_PER_PROMPT + 1
    px, ids, mask = _image_inputs(m, n_img=1)
    with pytest.raises(ValueError, match=f"{k} images"):
        m.encode_images(np.repeat(px, k, axis=1), np.repeat(ids, k, axis=1), np.repeat(mask, k, axis=1))


# ------------------------------------------------------------------ one Model, several threads
def test_threads_sharing_a_model_get_their_own_answers(tiny_model):
    """Two threads generating on one Model: each gets exactly its sequential greedy answer.
    Regression: their eval calls interleaved on the one KV cache (wrong text, or a mask error)."""
    import threading

    m = tiny_model
    px, ids, mask = _image_inputs(m)
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    jobs = [
        dict(prompt="hello there, how are", max_new_tokens=12, temperature=0),
        dict(prompt="<|image|>what is in the picture", images=[img], max_new_tokens=12, temperature=0),
        dict(prompt="one two three", max_new_tokens=12, temperature=0, stream=True),
    ]

    def run(job):
        r = m.generate(**job)
        if job.get("stream"):
            "".join(r)
            r = r.result
        return r.tokens

    expected = [run(j) for j in jobs]
    assert len({tuple(e) for e in expected}) == 3
    results, errors = {}, []

    def worker(i):
        try:
            for _ in range(3):
                got = run(jobs[i])
                results.setdefault(i, []).append(got)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for i, e in enumerate(expected):
        assert results[i] == [e, e, e]


def test_unfinished_stream_in_the_same_thread_is_a_clear_error(tiny_model):
    m = tiny_model
    s = m.generate(prompt="hello", max_new_tokens=8, temperature=0, stream=True)
    next(s)  # the stream now holds the model
    with pytest.raises(RuntimeError, match="unfinished stream"):
        m.generate(prompt="again", max_new_tokens=2, temperature=0)
    s.close()  # releases it
    assert m.generate(prompt="again", max_new_tokens=2, temperature=0).completion_tokens >= 1
    m.generate(prompt="hello", max_new_tokens=8, temperature=0, stream=True)  # never iterated: holds nothing
    assert m.forward([0, 1]).shape[0] == 2


# ------------------------------------------------------------------ hyper-parameter rules (mllama_q/hparams.py)
def test_all_aspect_ratios_match_transformers_and_refuse_huge_counts():
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

    from mllama_q import hparams

    for n in (1, 2, 3, 4, 7, 16, 64):
        assert list(hparams.all_aspect_ratios(n)) == [tuple(p) for p in get_all_supported_aspect_ratios(n)]
    t0 = time.perf_counter()
    for bad in (100000, 0, -1, 2**40, 4.0, "4", True):
        with pytest.raises(ValueError, match="max_num_tiles"):
            hparams.all_aspect_ratios(bad)
    assert time.perf_counter() - t0 < 1  # O(n^2) over 100000 tiles hung


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(max_num_tiles=100000), "max_num_tiles"),
        (dict(tile_size=20000), "tile_size"),
        (dict(tile_size=0), "tile_size"),
        (dict(image_std=(0.0, 0.3, 0.3)), "image_std"),
        (dict(image_std=(float("nan"), 0.3, 0.3)), "image_std"),
        (dict(image_mean=(0.5, 0.5)), "image_mean"),
        (dict(rescale_factor=float("inf")), "rescale_factor"),
        (dict(resample=99), "resample"),
        (dict(max_num_tiles=64, tile_size=2240), "pixels per image"),
        (dict(supported_aspect_ratios=((1, 1), (1, 1))), "repeats"),
        (dict(max_images=0), "max_images"),
    ],
)
def test_processor_settings_are_range_checked(kw, match):
    from mllama_q.processor import ProcessorSettings

    with pytest.raises(ValueError, match=match):
        ProcessorSettings(**kw)


# ------------------------------------------------------------------ images
def _inputs_family():
    """tools/fuzz/inputs.py (the fuzz family; also the maker of hostile images)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "fuzz" / "inputs.py"
    spec = importlib.util.spec_from_file_location("fuzz_inputs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A 20000 x 20000 grey PNG of 0.4 MB (decodes to 400 MB; PIL only refuses it above 2x its limit)."""
    p = tmp_path_factory.mktemp("bomb") / "bomb.png"
    p.write_bytes(_inputs_family().bomb_png(20000, 20000))
    return p


def test_decompression_bomb_is_refused_before_decoding(bomb, tmp_path):
    from mllama_q.processor import ImageError, ProcessorSettings, load_image, preprocess_images

    assert bomb.stat().st_size < 1 << 20
    for src in (bomb, bomb.read_bytes()):
        t0 = time.perf_counter()
        with pytest.raises(ImageError, match="decompression bomb|exceeds limit"):
            load_image(src)
        assert time.perf_counter() - t0 < 2
    # 10000 x 10000 (between PIL's warning and its error): ours refuses it too
    mid = tmp_path / "mid.png"
    mid.write_bytes(_inputs_family().bomb_png(10000, 9000, valid_stream=False))
    with pytest.raises(ImageError, match="90,000,000 pixels"):
        preprocess_images([mid], ProcessorSettings())


def test_corrupt_and_truncated_images_are_clear_errors(tmp_path):
    import io as _io

    from PIL import Image

    from mllama_q.processor import ImageError, ProcessorSettings, preprocess_images

    s = ProcessorSettings(tile_size=56)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        buf = _io.BytesIO()
        img.save(buf, format=fmt)
        data = buf.getvalue()
        for cut in (0, 5, len(data) // 3):
            with pytest.raises(ImageError):
                preprocess_images([data[:cut]], s)
        try:  # only a trailer missing: some decoders do not need it (the pixels are all there)
            preprocess_images([data[:-7]], s)
        except ImageError:
            pass
    with pytest.raises(ImageError):
        preprocess_images([tmp_path], s)  # a directory
    buf = _io.BytesIO()
    img.save(buf, format="PNG")
    lazy = Image.open(_io.BytesIO(buf.getvalue()[:200]))  # opened by the caller, not yet decoded
    with pytest.raises(ImageError, match="cannot decode"):  # was PIL's OSError
        preprocess_images([lazy], s)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="cannot"):
        preprocess_images([tmp_path / "empty.png"], s)


@pytest.mark.parametrize(
    "kind",
    [
        "16-bit grey PNG",
        "16-bit RGB PNG",
        "palette+alpha PNG",
        "CMYK JPEG",
        "huge EXIF JPEG",
        "LA PNG",
        "1-bit TIFF",
        "float TIFF",
    ],
)
def test_odd_image_files_match_transformers(kind, tmp_path):
    """Odd files are decoded by PIL exactly as transformers would get them (it is given the same
    PIL image), then processed identically."""
    from PIL import Image
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from mllama_q.processor import ProcessorSettings, preprocess_images

    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (130, 90, 3), dtype=np.uint8)
    p = tmp_path / "img"
    if kind == "16-bit grey PNG":
        Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(p.with_suffix(".png"))
    elif kind == "16-bit RGB PNG":  # PNG colour type 2, bit depth 16, written by hand
        import struct
        import zlib

        raw = b"".join(b"\0" + (rgb[y].astype(">u2") * 257).tobytes() for y in range(rgb.shape[0]))
        fam = _inputs_family()
        ihdr = struct.pack(">IIBBBBB", rgb.shape[1], rgb.shape[0], 16, 2, 0, 0, 0)
        p.with_suffix(".png").write_bytes(fam._png(ihdr, zlib.compress(raw)))
    elif kind == "palette+alpha PNG":
        Image.fromarray(rgb).convert("P").save(p.with_suffix(".png"), transparency=3)  # tRNS: palette alpha
    elif kind == "CMYK JPEG":
        Image.fromarray(rgb).convert("CMYK").save(p.with_suffix(".jpg"))
    elif kind == "huge EXIF JPEG":
        Image.fromarray(rgb).save(p.with_suffix(".jpg"), exif=b"Exif\0\0II*\0" + bytes(60000))
    elif kind == "LA PNG":
        Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA").save(p.with_suffix(".png"))
    elif kind == "1-bit TIFF":
        Image.fromarray(rgb).convert("1").save(p.with_suffix(".tif"))
    else:
        Image.fromarray(rgb[..., 0].astype(np.float32) / 255).save(p.with_suffix(".tif"))
    path = next(tmp_path.iterdir())
    settings = ProcessorSettings(tile_size=56)
    ours = preprocess_images([path], settings)
    hf = MllamaImageProcessorPil(
        size={"height": 56, "width": 56},
        max_image_tiles=4,
        do_convert_rgb=True,
        image_mean=list(settings.image_mean),
        image_std=list(settings.image_std),
    )
    with Image.open(path) as im:
        im.load()
        ref = hf(images=[[im]], return_tensors="np")
    np.testing.assert_allclose(ours["pixel_values"], np.asarray(ref["pixel_values"]), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ours["aspect_ratio_ids"], np.asarray(ref["aspect_ratio_ids"]))


# ------------------------------------------------------------------ the chat template is untrusted code
@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x' * 1000000000 }}",  # ate 4 GB
        "{% for i in range(10**9) %}x{% endfor %}",  # OverflowError traceback from the sandbox
        "{{ [0] * 10**9 }}",
        "{{ 3 ** 1000000000 }}",
        "{{ 'x'|center(1000000000) }}",
        "{{ 'x'.ljust(10**9) }}",
        "{{ '{:>1000000000}'.format(1) }}",
        "{{ '%1000000000s' % 'a' }}",
        "{{ ('x' * 10**6).replace('x', 'y' * 1000) }}",
        "{{ (['x' * 10**6] * 1000)|join }}",
        "{{ ''.join(['x' * 10**6] * 1000) }}",
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set t %}{{ns.s}}{{ns.s}}{% endset %}"
        "{% set ns.s = t %}{% endfor %}",
        "{% set ns = namespace(v=3) %}{% for i in range(40) %}{% set ns.v = ns.v * ns.v %}{% endfor %}",
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # time limit
        "{% set b = [0] * 3000000 %}{% for i in b %}{% for j in b %}{% endfor %}{% endfor %}",  # no calls inside
    ],
)
def test_hostile_chat_templates_fail_fast(template, monkeypatch):
    from mllama_q import chat

    monkeypatch.setattr(chat, "RENDER_TIMEOUT_S", 0.3)
    t0 = time.perf_counter()
    with pytest.raises(chat.ChatTemplateError):
        chat.render(template, [{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < 3


def test_chat_limits_leave_real_templates_alone():
    from mllama_q import chat

    long = "word " * 50000  # 250k characters: a long but real conversation
    msgs = [
        {"role": "user", "content": long},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]},
    ]
    out = chat.ChatTemplate(None).render(msgs, date_string="26 Jul 2024")
    assert long.strip() in out and out.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="nested deeper"):
        chat.render("{{ messages }}", [{"role": "user", "content": "x", "deep": _nested(5000)}])


def _nested(depth):
    x = "leaf"
    for _ in range(depth):
        x = [x]
    return x
