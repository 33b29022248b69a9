"""Fuzz family `inputs`: every untrusted input of the runtime and the converter except GGUF files.

    generate(seed, n) -> Iterator[case]      n cases, deterministic in seed
    run(case) -> None                        one case; a clean refusal raises ValueError

A case is a small JSON-able dict {"kind", "seed", ...}; run() rebuilds its data (image bytes,
arrays, JSON files) from the seed, so a failing case is reproduced from its printed dict alone.
Kinds:

    image      odd images through the processor: random bytes, truncated / bit-flipped files
               (PNG, JPEG, GIF, BMP, TIFF, WebP), decompression bombs (a huge declared size in a
               small file), zero and extreme sizes, huge EXIF, every PIL mode (1, L, LA, P, PA,
               RGBA, CMYK, I, I;16, F, YCbCr)
    sampling   bad / extreme SamplingParams and Sampler inputs (NaN logits, odd shapes, ids
               outside the vocabulary in the history)
    generate   Model.generate on a tiny synthetic model with bad parameters, messages, prompts
               and image counts
    tokens     token, aspect-ratio, mask and pixel arrays of every dtype, shape and range to
               Model.forward / eval / encode_images and _core.MllamaModel.step
    quants     quants.quantize / dequantize / row_bytes and _core.quantize / dequantize with odd
               shapes (zero-size next to huge extents), types, dtypes, strides
    backend    _core.Backend("cpu") ops and _core.matmul with odd sizes and ids
    chat       hostile chat templates (huge repetition, nested loops, recursion, format widths,
               filters with huge arguments) and odd message data
    config     the converter (`mllama-q convert` main) on a tiny checkpoint whose config.json,
               preprocessor_config.json, generation_config.json or tokenizer.json is mutated
               (wrong types, extreme values, deleted keys, truncation, deep nesting, bytes);
               it must print one `error:` line, leave no file, or write a file that loads

Clean: ValueError and its subclasses (ModelFileError, ImageError, HParamError,
ChatTemplateError, ConvertError), and pybind11's TypeError for an argument of the wrong Python
type ("incompatible function arguments"), which run() re-raises as CleanTypeError (a
ValueError). Anything else propagating from run() is unclean; a crash or a hang is the
runner's to see (each case should finish in well under a second; a chat template is cut off
after RENDER_TIMEOUT_S = 0.2 s here).

Needs numpy, PIL, mllama_q; the `config` kind also torch + transformers (it builds its tiny
checkpoint once with tests/tiny_models.py, cached under $MLLAMA_Q_CACHE) and is left out of
generate() without them.

Run by the common runner (tools/fuzz/runner.py), which counts ok / clean / unclean / crash /
hang per kind (kind_of) and builds the config checkpoint first in a child (prepare):
    python -m tools.fuzz --family inputs -n 10000 --seed 0
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

KINDS = ("image", "sampling", "generate", "tokens", "quants", "backend", "chat", "config")
WEIGHTS = {"image": 5, "sampling": 2, "generate": 2, "tokens": 3, "quants": 3, "backend": 3, "chat": 3, "config": 2}


class CleanTypeError(ValueError):
    """pybind11 refused an argument of the wrong Python type (its documented TypeError)."""


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def generate(seed: int, n: int, kinds=None) -> Iterator[dict]:
    """n cases for `seed`, kinds drawn by WEIGHTS (the `config` kind only with torch)."""
    kinds = [k for k in (kinds or KINDS) if k != "config" or _has_torch()]
    rng = random.Random(seed)
    pool = [k for k in kinds for _ in range(WEIGHTS[k])]
    for i in range(n):
        yield {"kind": rng.choice(pool), "seed": rng.getrandbits(48), "index": i}


def kind_of(case: dict) -> str:
    """The runner's per-kind breakdown."""
    return case["kind"]


def prepare() -> None:
    """Once per run, before the cases (the runner calls it in a child of its own): the tiny
    checkpoint of the config cases, so that the children do not race to build it."""
    if _has_torch():
        fuzz_checkpoint()
    from mllama_q.cli.synthetic import cached_synthetic

    cached_synthetic("tiny", "q8_0", progress=False)


def run(case: dict) -> None:
    rng = random.Random(case["seed"])
    try:
        _RUN[case["kind"]](rng)
    except TypeError as e:
        if "incompatible function arguments" in str(e) or "incompatible constructor arguments" in str(e):
            raise CleanTypeError(str(e).splitlines()[0]) from None
        raise


# ---------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------
EXTREME_INTS = [
    0,
    1,
    -1,
    2,
    3,
    7,
    255,
    256,
    2**15,
    2**16 + 1,
    2**31 - 1,
    2**31,
    2**32,
    2**32 + 5,
    2**40,
    2**62,
    2**63 - 1,
    -(2**63),
    2**64,
    10**9,
    10**30,
    -(10**9),
]
EXTREME_FLOATS = [
    0.0,
    -0.0,
    1e-45,
    1e-30,
    1e-6,
    0.5,
    1.0,
    1.5,
    2.0,
    1e6,
    1e30,
    1e300,
    -1.0,
    -1e30,
    float("nan"),
    float("inf"),
    float("-inf"),
]


def odd_value(rng: random.Random) -> Any:
    """Something a well-formed config or call would not hold."""
    r = rng.random()
    if r < 0.35:
        return rng.choice(EXTREME_INTS)
    if r < 0.6:
        return rng.choice(EXTREME_FLOATS)
    return rng.choice(
        [
            None,
            True,
            False,
            "",
            "abc",
            "40",
            "1e9",
            "nan",
            [],
            [1, 2],
            [[1, 2]],
            {},
            {"a": 1},
            "x" * 10000,
            [None],
            [float("nan")] * 3,
            [2**40] * 3,
            [-1],
            list(range(300)),
        ]
    )


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int, valid_stream: bool = True, mode: str = "L") -> bytes:
    """A small PNG that declares width x height pixels (8-bit grey or RGB). valid_stream: the
    IDAT holds the whole zlib-compressed (zero) image, streamed so nothing big is ever in
    memory (20000 x 20000 grey: ~0.4 MB); else a short, broken stream."""
    color = {"L": 0, "RGB": 2}[mode]
    ch = {"L": 1, "RGB": 3}[mode]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    if valid_stream:
        key = (width, height, mode)
        if key not in _bomb_cache:
            _bomb_cache[key] = _png(ihdr, _zero_rows(width * ch, height))
        return _bomb_cache[key]
    return _png(ihdr, zlib.compress(b"\0" * 1000)[:-4])


_bomb_cache: dict = {}


def _zero_rows(row_bytes: int, height: int) -> bytes:
    """zlib stream of `height` zero rows (filter byte + row_bytes), compressed piecewise."""
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + row_bytes)
    parts, rows_per = [], max(1, (1 << 20) // len(row))
    for y0 in range(0, height, rows_per):
        parts.append(comp.compress(row * min(rows_per, height - y0)))
    parts.append(comp.flush())
    return b"".join(parts)


def _png(ihdr: bytes, idat: bytes) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _random_pil(rng: random.Random, mode: str, w: int, h: int):
    from PIL import Image

    nrng = np.random.default_rng(rng.getrandbits(32))
    rgb = Image.fromarray(nrng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGB":
        return rgb
    if mode == "RGBA":
        return Image.fromarray(nrng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "I;16":
        return Image.frombytes("I;16", (w, h), nrng.integers(0, 65536, (h, w), dtype="<u2").tobytes())
    if mode == "PA":
        return rgb.convert("P").convert("PA")
    if mode == "P_transparency":
        p = rgb.convert("P")
        p.info["transparency"] = int(nrng.integers(0, 256))
        return p
    return rgb.convert(mode)


FORMATS = {  # PIL format: modes it can save
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "P_transparency"],
    "JPEG": ["L", "RGB", "CMYK"],
    "GIF": ["L", "P", "RGB"],
    "BMP": ["1", "L", "P", "RGB"],
    "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"],
    "WEBP": ["RGB", "RGBA"],
}


def _encoded(rng: random.Random, fmt: str, mode: str, w: int, h: int, exif: bytes | None = None) -> bytes:
    img = _random_pil(rng, mode, w, h)
    buf = io.BytesIO()
    kw = {"exif": exif} if exif is not None else {}
    if fmt == "PNG" and mode == "P_transparency":
        kw["transparency"] = img.info["transparency"]
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _image_case(rng: random.Random):
    """(image object for load_image, description)."""
    from PIL import Image

    v = rng.random()
    sizes = [(1, 1), (1, 2), (2, 1), (3, 700), (700, 3), (57, 56), (56, 57), (1, 1500), (1500, 1), (200, 120)]
    w, h = rng.choice(sizes)
    fmt = rng.choice(list(FORMATS))
    mode = rng.choice(FORMATS[fmt])
    if v < 0.12:
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 8, 64, 1000]))), "random bytes"
    if v < 0.2:
        valid = rng.random() < 0.3  # a complete stream costs the generator ~1 s per 10^8 pixels: few sizes
        w, h = (
            rng.choice([(9500, 9500), (20000, 20000)])
            if valid
            else (rng.choice([9500, 12000, 20000, 65535]), rng.choice([9500, 20000, 65535]))
        )
        return bomb_png(w, h, valid_stream=valid), "bomb"
    if v < 0.24:  # headers claiming 2**31 - 1 pixels a side, PNG and GIF
        if rng.random() < 0.5:
            return bomb_png(2**31 - 1, rng.choice([1, 2**31 - 1]), valid_stream=False), "bomb header"
        gif = _encoded(rng, "GIF", "P", 8, 8)
        return gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:], "gif huge screen"
    data = _encoded(rng, fmt, mode, w, h)
    if v < 0.45:
        return data[: rng.randrange(0, max(1, len(data)))], f"truncated {fmt} {mode}"
    if v < 0.62:
        b = bytearray(data)
        for _ in range(rng.choice([1, 2, 8, 64])):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        return bytes(b), f"bit-flipped {fmt} {mode}"
    if v < 0.67:
        exif = b"Exif\0\0II*\0" + bytes(rng.getrandbits(8) for _ in range(rng.choice([100, 60000])))
        return _encoded(rng, "JPEG", "RGB", w, h, exif=exif), "huge exif"
    if v < 0.75:
        return _random_pil(
            rng,
            rng.choice(["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr", "P_transparency"]),
            w,
            h,
        ), "PIL image"
    if v < 0.8:
        shape = rng.choice([(0, 5, 3), (5, 0), (4, 4, 2), (4, 4, 5), (3, 3, 3, 3), (6, 7), (6, 7, 4), (2, 2, 3)])
        dt = rng.choice([np.uint8, np.uint8, np.float32, np.int64, np.bool_])
        return np.zeros(shape, dt), f"array {shape} {np.dtype(dt)}"
    if v < 0.83:
        return rng.choice([None, 5, 3.5, "", "/nonexistent/x.png", "/dev/null", "/", ["a"], {"a": 1}]), "odd object"
    if v < 0.87:
        return Image.new(rng.choice(["RGB", "L"]), rng.choice([(0, 0), (0, 5), (5, 0)])), "zero-size PIL"
    return data, f"{fmt} {mode} {w}x{h}"


def _run_image(rng: random.Random) -> None:
    from mllama_q.processor import ProcessorSettings, preprocess_images

    obj, _what = _image_case(rng)
    small = ProcessorSettings(tile_size=56) if rng.random() < 0.8 else ProcessorSettings()
    if isinstance(obj, (bytes, bytearray)) and rng.random() < 0.5:  # as a file too
        with tempfile.TemporaryDirectory(prefix="fuzz-img-") as d:
            p = Path(d) / "x.img"
            p.write_bytes(obj)
            preprocess_images([p], small)
        return
    preprocess_images([obj], small)


# ---------------------------------------------------------------------------------------------
# sampling and generate
# ---------------------------------------------------------------------------------------------
def _sampling_kwargs(rng: random.Random) -> dict:
    good = {
        "temperature": rng.choice([0, 0.6, 1.0, 1.7]),
        "top_k": rng.choice([0, 1, 5, 50]),
        "top_p": rng.choice([0.1, 0.9, 1.0]),
        "min_p": rng.choice([0.0, 0.05, 0.5]),
        "repetition_penalty": rng.choice([1.0, 1.3, 0.7]),
        "seed": rng.choice([None, 0, 7]),
    }
    for k in rng.sample(list(good), rng.randrange(0, 3)):
        good[k] = odd_value(rng)
    return good


def _run_sampling(rng: random.Random) -> None:
    from mllama_q.sampling import Sampler, SamplingParams, probabilities

    params = SamplingParams(**_sampling_kwargs(rng))
    nrng = np.random.default_rng(rng.getrandbits(32))
    V = rng.choice([1, 2, 10, 1000, 32000])
    logits = (nrng.standard_normal(V) * rng.choice([0.1, 1, 30, 1e30])).astype(np.float32)
    if rng.random() < 0.2:
        logits[nrng.integers(0, V, size=max(1, V // rng.choice([1, 2, 10])))] = rng.choice([np.nan, np.inf, -np.inf])
    if rng.random() < 0.1:
        logits = logits.reshape(1, -1) if rng.random() < 0.5 else logits[:0]
    history = [int(x) for x in nrng.integers(0, V + 9, size=rng.choice([0, 1, 30]))]
    if rng.random() < 0.2:
        history += [rng.choice([V, V + 1, 2**40, -1])]
    s = Sampler(params)
    try:
        tok = s(logits, history)
    except RuntimeError as e:  # documented: logits with no finite value (a broken model)
        if "no finite logit" in str(e) and not np.isfinite(logits).any():
            raise ValueError(str(e)) from None
        raise
    if not 0 <= tok < logits.size:
        raise AssertionError(f"sampled id {tok} outside [0, {logits.size})")
    if logits.ndim == 1 and np.isfinite(logits).any():  # NaN / inf entries included
        p = probabilities(logits, history, params)
        if not (np.isfinite(p).all() and abs(float(p.sum(dtype=np.float64)) - 1) < 1e-3):
            raise AssertionError("probabilities are not a distribution")


_MODEL = None


def tiny_model():
    """A tiny synthetic model (no torch), loaded once per process."""
    global _MODEL
    if _MODEL is None:
        import mllama_q
        from mllama_q.cli.synthetic import cached_synthetic

        _MODEL = mllama_q.Model(cached_synthetic("tiny", "q8_0", progress=False), n_ctx=128, kv_type="f32")
    return _MODEL


def _tiny_image(rng: random.Random):
    from PIL import Image

    w, h = rng.choice([(8, 8), (60, 20), (20, 60), (56, 56)])
    return Image.fromarray(np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _run_generate(rng: random.Random) -> None:
    m = tiny_model()
    kw = _sampling_kwargs(rng)
    kw["max_new_tokens"] = rng.choice([1, 2, 3]) if rng.random() < 0.85 else odd_value(rng)
    if isinstance(kw["max_new_tokens"], int) and kw["max_new_tokens"] > 200:
        kw["max_new_tokens"] = 4  # a legal huge value only runs to n_ctx: slow, not interesting here
    if rng.random() < 0.2:
        kw["stop"] = rng.choice(["", ["a", 5], [None], "x" * 1000, ["", "b"], 3, ["hello"], ["\n"]])
    n_img = rng.choice([0, 0, 1, 2, 3, 17, 200])
    images = [_tiny_image(rng) for _ in range(min(n_img, 3))] + [None] * max(0, n_img - 3)
    v = rng.random()
    if v < 0.4:
        kw["prompt"] = rng.choice(
            [
                "hi",
                "",
                "<|image|>" * max(n_img, rng.choice([0, 1])) + "what?",
                "x" * 5000,
                "\0\ud800"[:1],
                "<|begin_of_text|><|eot_id|>",
            ]
        )
        if n_img:
            kw["images"] = images
    elif v < 0.85:
        content = [{"type": "image"}] * n_img + [{"type": "text", "text": rng.choice(["hi", "", "x" * 300])}]
        msgs = [{"role": "user", "content": content if rng.random() < 0.8 else "plain"}]
        if rng.random() < 0.3:
            msgs = rng.choice(
                [
                    [],
                    None,
                    [{}],
                    [{"role": 1}],
                    [{"role": "user", "content": 5}],
                    "hi",
                    [{"role": "user", "content": [{"type": "video"}]}],
                    [{"role": "user", "content": _nested(rng.choice([10, 40, 2000]))}],
                ]
            )
        kw["messages"] = msgs
        if n_img:
            kw["images"] = images
    else:
        kw["prompt"] = odd_value(rng)
        if rng.random() < 0.5:
            kw["messages"] = [{"role": "user", "content": "x"}]
    if rng.random() < 0.1:
        kw["chat_kwargs"] = rng.choice([{"date_string": 5}, {"tools": [{"a": 1}]}, {"x": _nested(50)}])
    stream = rng.random() < 0.3
    r = m.generate(stream=stream, **kw)
    if stream:
        for _ in r:
            pass
        r = r.result
    if not isinstance(r.text, str) or r.completion_tokens != len(r.tokens):
        raise AssertionError("inconsistent GenerationResult")


def _nested(depth: int):
    x: Any = "leaf"
    for _ in range(depth):
        x = [x]
    return x


# ---------------------------------------------------------------------------------------------
# caller arrays: tokens, masks, pixels
# ---------------------------------------------------------------------------------------------
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]


def _odd_int_array(rng: random.Random, shape, lo: int, hi: int) -> np.ndarray:
    nrng = np.random.default_rng(rng.getrandbits(32))
    a = nrng.integers(lo, hi + 1, size=shape).astype(np.int64)
    r = rng.random()
    if r < 0.3 and a.size:
        a.flat[rng.randrange(a.size)] = rng.choice([2**32 + lo, 2**32 + 5, -1, hi + 1, 2**63 - 1, -(2**31)])
    dt = rng.choice(INT_DTYPES + [np.float32, np.float64] if r > 0.85 else INT_DTYPES[2:4])
    with np.errstate(all="ignore"):
        return a.astype(dt)


def _run_tokens(rng: random.Random) -> None:
    m = tiny_model()
    V = m.text_hparams["vocab_size"] + 8
    vh = m.vision_hparams
    T, S = vh["max_num_tiles"], vh["image_size"]
    L = rng.choice([1, 2, 5, 40])
    shape = rng.choice([(L,), (1, L), (2, L), (), (0,), (L, 1, 1)])
    toks = _odd_int_array(rng, shape, 0, V - 1)
    v = rng.random()
    if v < 0.3:
        m.forward(toks)
        return
    if v < 0.45:
        m.reset()  # gives the low-level slot back: the raw step below may use any slot
        slot = rng.choice([0, 0, 0, m._core.n_seq, -1, 2**31])
        m._core.step([(slot, toks, None, rng.choice([0, 1, 1, 2, -1]), None)])
        return
    n_img = rng.choice([1, 1, 2, 0, 17])
    px_shape = rng.choice(
        [
            (1, n_img, T, 3, S, S),
            (n_img, T, 3, S, S),
            (1, n_img, T, 3, S, S - 1),
            (1, n_img, T + 1, 3, S, S),
            (n_img, T, 3, S),
            (1, 1, n_img, T, 3, S, S),
        ]
    )
    nrng = np.random.default_rng(rng.getrandbits(32))
    px = nrng.standard_normal(px_shape).astype(rng.choice([np.float32, np.float32, np.float64, np.float16]))
    if rng.random() < 0.25 and px.size:
        px.flat[rng.randrange(px.size)] = rng.choice([np.nan, np.inf, -np.inf, 1e30])
    ids = _odd_int_array(rng, rng.choice([(1, n_img), (n_img,), (1, n_img + 1)]), 1, vh["max_aspect_ratio_id"])
    msk = _odd_int_array(rng, rng.choice([(1, n_img, T), (n_img, T), (1, n_img, T - 1)]), 0, 1)
    tokens = np.concatenate([[0], np.full(n_img, m.image_token_id), nrng.integers(0, V, 3)]).astype(np.int64)
    cam = _odd_int_array(
        rng, rng.choice([(1, len(tokens), n_img, T), (len(tokens), n_img, T), (1, len(tokens), n_img, T + 1)]), 0, 1
    )
    if v < 0.8:
        m.forward(tokens, px, ids, msk, cam)
    else:
        m.reset()
        m.encode_images(px, ids, msk)
        m.eval(tokens, cam)
        m.eval(toks if toks.size else [1], None)


# ---------------------------------------------------------------------------------------------
# quants and backend ops
# ---------------------------------------------------------------------------------------------
QTYPES = ["f32", "f16", "bf16", "q8_0", "q4_k", "q6_k", "q8_k", "Q4_K", "q5_0", "", "f64"]


def _odd_extent(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 31, 32, 256, 512, 2**20, 2**31, 2**40, 2**62, 2**63 - 1, -1, -256])


def _run_quants(rng: random.Random) -> None:
    from mllama_q import _core, quants

    qt = rng.choice(QTYPES)
    nrng = np.random.default_rng(rng.getrandbits(32))
    v = rng.random()
    if v < 0.3:
        shape = tuple(rng.choice([0, 1, 3, 32, 256, 512]) for _ in range(rng.choice([1, 2, 3])))
        if math.prod(shape) > 1 << 18:
            shape = shape[-2:]
        x = nrng.standard_normal(shape).astype(rng.choice([np.float32, np.float32, np.float64, np.float16]))
        if rng.random() < 0.2 and x.size:
            x.flat[0] = rng.choice([np.nan, np.inf])
        if rng.random() < 0.15 and x.ndim >= 1 and x.shape[-1] > 1:
            x = x[..., ::2]
        (quants.quantize if rng.random() < 0.7 else lambda a, t: _core.quantize(a, t))(x, qt)
        return
    if v < 0.8:
        shape = tuple(
            _odd_extent(rng) if rng.random() < 0.4 else rng.choice([0, 1, 2, 256]) for _ in range(rng.choice([1, 2, 3]))
        )
        nbytes = rng.choice([0, 1, 34, 144, 210, 1024, 4096])
        data = nrng.integers(0, 256, nbytes, dtype=np.uint8)
        if rng.random() < 0.2:
            data = data.view(np.uint16) if nbytes % 2 == 0 else data
        if rng.random() < 0.5:
            quants.dequantize(data, qt, shape if rng.random() < 0.9 else odd_value(rng))
        else:
            _core.dequantize(data, qt, shape[0] if shape else 0, shape[-1] if shape else 0)
        return
    quants.row_bytes(qt, rng.choice([_odd_extent(rng), odd_value(rng)]))


def _run_backend(rng: random.Random) -> None:
    from mllama_q import _core, quants

    b = _core.Backend("cpu")
    nrng = np.random.default_rng(rng.getrandbits(32))
    op = rng.choice(
        [
            "get_rows",
            "matmul",
            "core_matmul",
            "rms_norm",
            "layer_norm",
            "elementwise",
            "rope",
            "attention",
            "store_rows_f16",
        ]
    )
    f = lambda *s: nrng.standard_normal(s).astype(np.float32)  # noqa: E731
    if op == "get_rows":
        rows, cols = rng.choice([(4, 32), (0, 32), (2**62, 4), (4, 0), (2**40, 0), (-1, 32), (3, 31)])
        qt = rng.choice(["f32", "q8_0", "f16"])
        table = np.zeros(max(0, min(rows, 8)) * (cols * 4 if cols > 0 else 0), np.uint8)
        if rng.random() < 0.7 and 0 < rows < 100 and cols >= 0:
            table = np.zeros(rows * quants.row_bytes(qt, cols) if cols % 32 == 0 or qt != "q8_0" else 0, np.uint8)
        ids = _odd_int_array(rng, (rng.choice([0, 1, 5]),), 0, max(0, min(rows, 8) - 1))
        b.get_rows(table, qt, rows, cols, ids)
    elif op in ("matmul", "core_matmul"):
        n, k = rng.choice([(4, 32), (0, 32), (2**61, 32), (4, 0), (2**40, 2**40), (-3, 32), (4, 33), (3, 256)])
        M = rng.choice([0, 1, 3])
        qt = rng.choice(["f32", "q8_0", "q4_k", "q8_k", "bf16"])
        x = f(M, max(k, 0)) if 0 <= k <= 256 else f(M, 32)
        w = np.zeros(rng.choice([0, 34 * 4, 4 * 128, 3 * 144]), np.uint8)
        if op == "matmul":
            b.matmul(x, w, qt, n, k, f(n) if rng.random() < 0.3 and 0 <= n < 10 else None)
        else:
            _core.matmul(x, w, qt, n, k)
    elif op in ("rms_norm", "layer_norm"):
        x = f(*rng.choice([(2, 8), (0, 8), (2, 0), (8,), (1, 1, 8)]))
        w = f(rng.choice([8, 0, 7]))
        eps = rng.choice([1e-5, 0.0, float("nan"), float("inf"), -1.0])
        (b.rms_norm(x, w, eps) if op == "rms_norm" else b.layer_norm(x, w, f(w.size), eps))
    elif op == "elementwise":
        a = f(*rng.choice([(5,), (0,), (2, 3)]))
        b.elementwise(
            rng.choice(["add", "add_scaled", "silu_mul", "gelu", "nope", ""]),
            a,
            f(*rng.choice([a.shape, (a.size + 1,)])) if rng.random() < 0.7 else None,
            rng.choice([0.0, float("nan"), 1e30]),
        )
    elif op == "rope":
        shape = rng.choice([(2, 2, 8), (0, 2, 8), (1, 2**33, 0), (2, 2, 7), (2, 8)])
        x = np.zeros(shape, np.float32)
        pos = _odd_int_array(rng, (shape[0] if shape else 1,), 0, 100)
        b.rope(x, pos, f(rng.choice([4, 3, 0])))
    elif op == "attention":
        nq, nk, nh, nkv, hd = (
            rng.choice([1, 3, 0]),
            rng.choice([1, 5, 0]),
            rng.choice([2, 4, 0, 3]),
            rng.choice([1, 2, 0]),
            rng.choice([8, 0, 2]),
        )
        if rng.random() < 0.15:
            nh, hd = 2**40, 0
        q = np.zeros((nq, nh, hd), np.float32)
        kv_t = rng.choice([np.float32, np.float16, np.float64])
        k = np.zeros((nk, nkv, hd), kv_t)
        mask = f(nq, nk) if rng.random() < 0.3 else None
        b.attention(
            q,
            k,
            k.copy(),
            rng.choice([1.0, float("nan")]),
            mask,
            rng.random() < 0.5,
            rng.choice([0, -3, 2**40, -(2**40)]),
        )
    else:
        b.store_rows_f16(f(*rng.choice([(2, 4), (0, 4), (4,)])))


# ---------------------------------------------------------------------------------------------
# chat templates
# ---------------------------------------------------------------------------------------------
CHAT_PIECES = [
    "{{ 'x' * N }}",
    "{{ [0] * N }}",
    "{{ 'ab' ~ 'c' * N }}",
    "{% for i in range(N) %}x{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set b = [0] * 100000 %}{% for i in b %}{% for j in b %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(v=3) %}{% for i in range(64) %}{% set ns.v = ns.v * ns.v %}{% endfor %}",
    "{{ 3 ** N }}",
    "{{ 'x'|center(N) }}",
    "{{ 'x'.ljust(N) }}",
    "{{ '{:>N}'.format(1) }}",
    "{{ '%Ns' % 'a' }}",
    "{{ ('x' * 100000).replace('x', 'y' * 1000) }}",
    "{{ (['x' * 100000] * 1000)|join }}",
    "{{ ('a\n' * 100000)|indent('x' * 1000) }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ messages|tojson(indent=N) }}",
    "{{ raise_exception('no') }}",
    "{{ messages[0].__class__ }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ range(10)|batch(N)|list }}",
    "{{ (messages * N)|length }}",
    "{{ 'x'.zfill(N) }}",
    "{{ ('\t' * 1000).expandtabs(N) }}",
    "{{ messages[N] }}",
    "{{ 1 / 0 }}",
    "{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}",
    "{{ bos_token }}{{ undefined_x.y }}",
    "{% if ",
    "{{ namespace(_x=1) }}",
    "{{ strftime_now('%Y' * N) }}",
    "{{ 'x'|wordwrap(N) }}",
    "{{ lipsum(N) }}",
    "{{ (range(100)|list) * N }}",
    "{{ cycler(*range(N)) }}",
]


def _run_chat(rng: random.Random) -> None:
    from mllama_q import chat

    chat.RENDER_TIMEOUT_S = 0.2  # keeps each case short; the limit itself is what is tested
    n = rng.choice([1, 10, 1000, 100000, 10**6, 10**9, 2**31, 10**18])
    tmpl = "".join(rng.choice(CHAT_PIECES).replace("N", str(n)) for _ in range(rng.choice([1, 1, 2, 3])))
    msgs = [{"role": "user", "content": rng.choice(["hi", "x" * 1000, [{"type": "text", "text": "t"}]])}]
    if rng.random() < 0.2:
        msgs = rng.choice(
            [
                [{"role": "user", "content": _nested(rng.choice([5, 40, 3000]))}],
                [{"role": "user", "content": "a", "extra": {"deep": _nested(100)}}],
                [],
                [5],
            ]
        )
    chat.render(tmpl, msgs, add_generation_prompt=rng.random() < 0.5, special_tokens={"bos_token": "<s>"})


# ---------------------------------------------------------------------------------------------
# converter configs
# ---------------------------------------------------------------------------------------------
FUZZ_CKPT_CONFIG = dict(  # as small as a complete checkpoint gets: conversions take ~0.2 s
    seed=5,
    dtype="float32",
    max_shard_size=None,
    text_config=dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        cross_attention_layers=[1],
    ),
    vision_config=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        image_size=28,
        intermediate_layers_indices=[0, 1],
    ),
)
CKPT_VERSION = 1


def fuzz_checkpoint() -> Path:
    """The tiny checkpoint the config cases mutate: built once with tests/tiny_models.py, cached."""
    from mllama_q.cli.synthetic import default_cache_dir

    d = default_cache_dir() / f"fuzz-inputs-ckpt-v{CKPT_VERSION}"
    if (d / "done").is_file():
        return d
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix=d.name + ".", dir=d.parent if d.parent.is_dir() else None))
    kw = {k: v for k, v in FUZZ_CKPT_CONFIG.items() if v is not None}
    make_tiny_checkpoint(tmp / "ck", **kw)
    (tmp / "ck" / "done").write_text("ok")
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp / "ck", d)
    except OSError:  # another process got there first
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return d


def _paths(x, prefix=()):
    """Every (path, value) in a JSON tree, at most a few hundred (tokenizer vocabularies are cut,
    and so is the depth)."""
    out = [(prefix, x)]
    if len(prefix) > 12:
        return out
    if isinstance(x, dict):
        for k, v in list(x.items())[:60]:
            out += _paths(v, prefix + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x[:20]):
            out += _paths(v, prefix + (i,))
    return out


def _mutate_json(rng: random.Random, text: str) -> str:
    v = rng.random()
    if v < 0.12:  # textual damage
        b = text.encode()
        choice = rng.randrange(5)
        if choice == 0:
            return b[: rng.randrange(len(b))].decode("utf-8", "ignore")
        if choice == 1:
            return "[" * rng.choice([1000, 100000]) + "]" * rng.choice([0, 1000, 100000])
        if choice == 2:
            return '{"a": ' * rng.choice([50, 5000]) + "1" + "}" * rng.choice([50, 5000])
        if choice == 3:
            return "\ufeff" + text
        return rng.choice(["", "null", "[]", "1e999", "NaN", '"x"', "9" * 5000, '{"a": 1, "a": [}'])
    data = json.loads(text)
    for _ in range(rng.choice([1, 1, 2, 3])):
        paths = [p for p, _ in _paths(data) if p]
        if not paths:
            break
        path = rng.choice(paths)
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        if rng.random() < 0.2:
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent.pop(path[-1])
        else:
            parent[path[-1]] = odd_value(rng) if rng.random() < 0.85 else f"__NESTED_{rng.choice([100, 3000])}__"
    text = json.dumps(data)
    for depth in (100, 3000):  # deep nesting, written as text (json.dumps itself would recurse)
        text = text.replace(f'"__NESTED_{depth}__"', "[" * depth + "]" * depth)
    return text


def _run_config(rng: random.Random) -> None:
    from mllama_q.convert.cli import main

    base = fuzz_checkpoint()
    with tempfile.TemporaryDirectory(prefix="fuzz-cfg-") as tmp:
        ck = Path(tmp) / "ck"
        ck.mkdir()
        for f in base.iterdir():
            if f.suffix == ".json" or f.name.endswith(".jinja"):
                shutil.copy(f, ck / f.name)
            elif f.name != "done":
                os.symlink(f, ck / f.name)
        targets = [
            n
            for n in (
                "config.json",
                "preprocessor_config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
            )
            if (ck / n).exists()
        ]
        for name in rng.sample(targets, rng.choice([1, 1, 2])):
            p = ck / name
            if rng.random() < 0.05:
                p.unlink() if rng.random() < 0.5 else p.write_bytes(bytes(rng.getrandbits(8) for _ in range(300)))
            else:
                p.write_text(_mutate_json(rng, p.read_text(encoding="utf-8")), encoding="utf-8")
        out_dir = Path(tmp) / "out"
        out_dir.mkdir()
        out = out_dir / "o.gguf"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([str(ck), "-o", str(out), "--type", rng.choice(["q8_0", "f16", "q4_k_m"]), "-q"])
        left = sorted(p.name for p in out_dir.iterdir())
        if rc == 1:
            lines = err.getvalue().strip().splitlines()
            if len(lines) != 1 or not lines[0].startswith("mllama-q convert: error: "):
                raise AssertionError(f"converter output is not one error line: {err.getvalue()[:500]!r}")
            if left:
                raise AssertionError(f"converter failed but left {left}")
            raise ValueError(lines[0])  # clean refusal
        if rc != 0 or left != ["o.gguf"]:
            raise AssertionError(f"converter rc {rc}, files {left}")
        import mllama_q

        m = mllama_q.Model(out, n_ctx=16)  # what it wrote must load (or be a clean ModelFileError)
        m.forward([0, 1])


_RUN = {
    "image": _run_image,
    "sampling": _run_sampling,
    "generate": _run_generate,
    "tokens": _run_tokens,
    "quants": _run_quants,
    "backend": _run_backend,
    "chat": _run_chat,
    "config": _run_config,
}
