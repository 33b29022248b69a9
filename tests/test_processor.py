"""mllama_q.processor vs transformers' MllamaImageProcessor / MllamaProcessor with the
Llama-3.2-11B-Vision-Instruct preprocessor_config.json (PIL backend: torchvision is not needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllama_q.processor import (
    Processor,
    ProcessorSettings,
    all_aspect_ratios,
    image_token_spans,
    preprocess_images,
)
from mllama_q.tokenizer import Tokenizer

REF_DIR = Path(__file__).resolve().parents[1] / ".." / ".." / "shared" / "reference" / "llama-3.2-11b-vision-instruct"
PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"height": 560, "width": 560},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_pad": True,
    "max_image_tiles": 4,
}


def _resources() -> Path:
    import llama_models

    return Path(llama_models.__file__).parent / "resources"


@pytest.fixture(scope="module")
def hf_image_processor():
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(**PREPROCESSOR_CONFIG)


def _hf_images(proc, images):
    out = proc(images=[images], return_tensors="np")
    return {k: np.asarray(out[k]) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}, out["num_tiles"]


def _assert_same(ours, ref):
    for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert ours[k].shape == ref[k].shape, k
        assert ours[k].dtype == ref[k].dtype, k
    np.testing.assert_array_equal(ours["aspect_ratio_ids"], ref["aspect_ratio_ids"])
    np.testing.assert_array_equal(ours["aspect_ratio_mask"], ref["aspect_ratio_mask"])
    np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)


def _make_image(rng, mode: str, w: int, h: int) -> Image.Image:
    """A random-ish image in `mode`: smooth gradients plus noise, so resizing matters."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
    rgb = np.clip(base + rng.integers(-40, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "RGB":
        return img
    if mode == "RGBA":
        a = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        return Image.fromarray(np.dstack([rgb, a]))
    if mode == "LA":
        return img.convert("RGBA").convert("LA").copy()
    if mode == "LA_rand":
        la = np.dstack([rgb[..., 0], rng.integers(0, 256, size=(h, w), dtype=np.uint8)])
        return Image.fromarray(la, "LA") if hasattr(Image, "fromarray") else None
    if mode == "P_transparency":
        p = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        p.info["transparency"] = 3
        return p
    if mode == "I;16":
        v = (rgb[..., 0].astype(np.uint16) * 257 + rng.integers(0, 200, size=(h, w))).astype("<u2")
        return Image.frombytes("I;16", (w, h), v.tobytes())
    if mode == "1":
        return img.convert("1")
    return img.convert(mode)  # L, P, CMYK, YCbCr, I, F ...


# (mode, width, height): every tile grid, tiny and extreme sizes, all PIL modes the brief names.
# HF only resizes an image that exceeds its canvas or is smaller than a tile on both sides, so
# the list mixes sizes that are resized (up and down) with sizes that are only padded.
CASES = [
    ("RGB", 560, 560),
    ("RGB", 1, 1),
    ("RGB", 3, 700),
    ("RGB", 2000, 45),
    ("RGB", 333, 1200),
    ("RGB", 1120, 1120),
    ("RGB", 561, 559),
    ("RGB", 100, 150),
    ("RGB", 1600, 900),
    ("RGB", 900, 1600),
    ("RGBA", 640, 480),
    ("RGBA", 37, 91),
    ("RGBA", 1900, 1300),
    ("L", 2000, 500),
    ("L", 13, 13),
    ("LA", 1300, 1777),
    ("LA_rand", 500, 260),
    ("P", 420, 1300),
    ("P_transparency", 1500, 2100),
    ("CMYK", 256, 512),
    ("I;16", 300, 300),
    ("I;16", 1200, 610),
    ("I", 90, 400),
    ("1", 2500, 640),
    ("YCbCr", 1700, 560),
    ("F", 128, 64),
]


@pytest.mark.parametrize("mode,w,h", CASES)
def test_single_image_matches_transformers(hf_image_processor, mode, w, h):
    rng = np.random.default_rng(hash((mode, w, h)) % 2**32)
    img = _make_image(rng, mode, w, h)
    ours = preprocess_images([img], ProcessorSettings())
    ref, ref_tiles = _hf_images(hf_image_processor, [img])
    _assert_same(ours, ref)
    assert ours["num_tiles"] == ref_tiles[0]


def test_random_sizes_and_several_images(hf_image_processor):
    rng = np.random.default_rng(1234)
    modes = ["RGB", "RGBA", "L", "P", "CMYK", "LA"]
    for _ in range(6):
        n = int(rng.integers(1, 4))
        imgs = [
            _make_image(
                rng, modes[int(rng.integers(len(modes)))], int(rng.integers(1, 1800)), int(rng.integers(1, 1800))
            )
            for _ in range(n)
        ]
        ours = preprocess_images(imgs, ProcessorSettings())
        ref, ref_tiles = _hf_images(hf_image_processor, imgs)
        _assert_same(ours, ref)
        assert ours["num_tiles"] == ref_tiles[0]


@pytest.mark.parametrize("name", ["dog.jpg", "pasta.jpeg"])
def test_real_photos(hf_image_processor, name):
    path = _resources() / name
    ours = preprocess_images([str(path)], ProcessorSettings())
    ref, _ = _hf_images(hf_image_processor, [Image.open(path)])
    _assert_same(ours, ref)


def test_settings_match_checkpoint_config():
    cfg = json.loads((REF_DIR / "config.json").read_text()) if (REF_DIR / "config.json").is_file() else None
    s = ProcessorSettings()
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

    assert list(s.supported_aspect_ratios) == get_all_supported_aspect_ratios(4) == list(all_aspect_ratios(4))
    if cfg is not None:
        assert [tuple(x) for x in cfg["vision_config"]["supported_aspect_ratios"]] == list(s.supported_aspect_ratios)
    pre = PREPROCESSOR_CONFIG
    assert list(s.image_mean) == pre["image_mean"] and list(s.image_std) == pre["image_std"]
    assert s.tile_size == 560 and s.resample == pre["resample"] and s.max_num_tiles == 4


def test_custom_settings_match_transformers():
    """Other tile sizes / tile counts (tiny test checkpoints use them)."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    rng = np.random.default_rng(7)
    for tile, max_tiles in ((224, 4), (32, 6), (14, 2)):
        cfg = dict(PREPROCESSOR_CONFIG, size={"height": tile, "width": tile}, max_image_tiles=max_tiles)
        hf = MllamaImageProcessorPil(**cfg)
        s = ProcessorSettings(
            tile_size=tile, max_num_tiles=max_tiles, supported_aspect_ratios=all_aspect_ratios(max_tiles)
        )
        imgs = [_make_image(rng, "RGB", int(rng.integers(5, 400)), int(rng.integers(5, 400))) for _ in range(3)]
        ours = preprocess_images(imgs, s)
        ref, _ = _hf_images(hf, imgs)
        _assert_same(ours, ref)


# ------------------------------------------------------------------ full processor (text + images)


@pytest.fixture(scope="module")
def hf_processor(tokenizer_dir, hf_image_processor):
    from transformers import AutoTokenizer, MllamaProcessor

    return MllamaProcessor(
        image_processor=hf_image_processor, tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir))
    )


@pytest.fixture(scope="module")
def our_processor(tokenizer_gguf):
    from mllama_q.gguf_file import open_gguf

    reader = open_gguf(tokenizer_gguf)
    tok = Tokenizer.from_gguf(reader)
    return Processor.from_gguf(reader, tok)


PROMPTS = [
    ("<|image|>If I had to write a haiku for this one", 1),
    (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        1,
    ),
    ("Compare <|image|> with <|image|> please.", 2),
    ("<|image|><|image|>Two adjacent images, then text <|image|> and a third.", 3),
    ("Text only, no images at all.", 0),
    ("Before <|image|>", 1),
]


@pytest.mark.parametrize("add_special", [True, False])
@pytest.mark.parametrize("text,n_images", PROMPTS)
def test_processor_matches_mllama_processor(hf_processor, our_processor, text, n_images, add_special):
    rng = np.random.default_rng(n_images * 17 + len(text))
    sizes = [(1280, 400), (300, 300), (700, 1500)]
    imgs = [_make_image(rng, "RGB", *sizes[i % 3]) for i in range(n_images)]
    kwargs = {"images": [imgs]} if n_images else {}
    ref = hf_processor(text=text, return_tensors="np", add_special_tokens=add_special, **kwargs)
    ours = our_processor(text=text, images=imgs if n_images else None, add_special_tokens=add_special)
    assert sorted(ours) == sorted(k for k in ref.keys())
    for k in ours:
        r = np.asarray(ref[k])
        assert ours[k].shape == r.shape and ours[k].dtype == r.dtype, k
        if k == "pixel_values":
            np.testing.assert_allclose(ours[k], r, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(ours[k], r, err_msg=k)


def test_image_token_spans_match_transformers():
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    rng = np.random.default_rng(3)
    for _ in range(300):
        ids = rng.choice([1, 2, 3, 99], size=int(rng.integers(0, 14)), p=[0.3, 0.2, 0.2, 0.3]).tolist()
        assert image_token_spans(ids, 99) == get_cross_attention_token_mask(ids, 99)


def test_bad_images(our_processor, tmp_path):
    s = ProcessorSettings()
    with pytest.raises(ValueError, match="not found"):
        preprocess_images([tmp_path / "missing.png"], s)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read"):
        preprocess_images([bad], s)
    good = tmp_path / "trunc.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(good)
    (tmp_path / "trunc2.png").write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError):
        preprocess_images([tmp_path / "trunc2.png"], s)
    with pytest.raises(ValueError, match="zero size"):
        preprocess_images([np.zeros((0, 5, 3), np.uint8)], s)
    with pytest.raises(ValueError, match="zero size"):
        preprocess_images([Image.new("RGB", (0, 0))], s)
    with pytest.raises(ValueError, match="token"):
        our_processor(text="<|image|> and <|image|>", images=[Image.new("RGB", (9, 9))])
    with pytest.raises(ValueError):
        preprocess_images([], s)


def test_settings_from_gguf_keys(tmp_path):
    """Custom preprocessing stored under the converter's mllama_q.* keys is what the processor uses
    (checked against transformers with the same settings); Ollama-style files fall back to 11B."""
    import gguf
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    path = tmp_path / "s.gguf"
    w = gguf.GGUFWriter(str(path), arch="mllama")
    w.add_uint32("mllama_q.image.tile_size", 112)
    w.add_uint32("mllama_q.image.max_image_tiles", 2)
    w.add_array("mllama_q.vision.supported_aspect_ratios", [1, 1, 1, 2, 2, 1])
    w.add_array("mllama_q.image.mean", [0.5, 0.4, 0.3])
    w.add_array("mllama_q.image.std", [0.2, 0.25, 0.3])
    w.add_float32("mllama_q.image.rescale_factor", 1 / 255)
    w.add_uint32("mllama_q.image.resample", 2)
    w.add_uint32("mllama_q.image_token_id", 128256)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from mllama_q.gguf_file import open_gguf

    s = ProcessorSettings.from_gguf(open_gguf(path))
    assert s.tile_size == 112 and s.max_num_tiles == 2 and s.supported_aspect_ratios == ((1, 1), (1, 2), (2, 1))
    cfg = dict(
        PREPROCESSOR_CONFIG,
        size={"height": 112, "width": 112},
        max_image_tiles=2,
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    )
    rng = np.random.default_rng(5)
    imgs = [_make_image(rng, "RGB", 300, 90), _make_image(rng, "RGBA", 50, 200)]
    ref, _ = _hf_images(MllamaImageProcessorPil(**cfg), imgs)
    _assert_same(preprocess_images(imgs, s), ref)

    path2 = tmp_path / "ollama.gguf"
    w = gguf.GGUFWriter(str(path2), arch="mllama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert ProcessorSettings.from_gguf(open_gguf(path2)) == ProcessorSettings()


def test_numpy_images_match_transformers(hf_image_processor):
    """uint8 HWC arrays (RGB and RGBA) take transformers' array branch of convert_to_rgb."""
    rng = np.random.default_rng(11)
    arrays = [
        rng.integers(0, 256, size=(300, 700, 3), dtype=np.uint8),
        rng.integers(0, 256, size=(1300, 500, 4), dtype=np.uint8),
        rng.integers(0, 256, size=(45, 60, 4), dtype=np.uint8),
    ]
    ours = preprocess_images(arrays, ProcessorSettings())
    ref, _ = _hf_images(hf_image_processor, arrays)
    _assert_same(ours, ref)
