"""Image + text preprocessing for mllama, a numpy/PIL twin of transformers' MllamaProcessor.

No torch. Every step mirrors the PIL backend of transformers 5 (`image_processing_pil_mllama.py`,
`image_transforms.py`, `processing_mllama.py`), because the model was trained on exactly those pixels:

    PIL image --convert_to_rgb--> uint8 (H, W, 3)
      --pick tile canvas (rows, cols)--> resize (bilinear, PIL) so it fits the canvas
      --pad bottom/right with 0--> uint8 (3, rows*T, cols*T)          T = tile size (560)
      --rescale (x * 1/255, float64 -> float32), normalise ((x - mean) / std, float32)-->
      --split into tiles--> float32 (rows*cols, 3, T, T)

Padding happens BEFORE normalisation (as in HF), so padded pixels are (0 - mean) / std, not 0.

Outputs (one sequence, batch dimension 1, like `MllamaProcessor(..., return_tensors="np")`):
    input_ids            int64 [1, L]
    attention_mask       int64 [1, L]
    pixel_values         float32 [1, n_images, max_tiles, 3, T, T]   (unused tiles are 0)
    aspect_ratio_ids     int64 [1, n_images]      1-based index into supported_aspect_ratios
    aspect_ratio_mask    int64 [1, n_images, max_tiles]
    cross_attention_mask int64 [1, L, n_images, max_tiles]
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import hparams
from .hparams import all_aspect_ratios  # noqa: F401  (re-exported: HF's get_all_supported_aspect_ratios)

# CLIP's normalisation constants (OpenAI CLIP), used by the Llama 3.2 Vision checkpoints'
# preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ProcessorSettings:
    """Everything the preprocessing depends on; defaults are Llama-3.2-11B-Vision(-Instruct)'s."""

    tile_size: int = 560
    max_num_tiles: int = 4
    # (rows, cols) grids, 1-based ids follow this order. HF computes it from max_num_tiles; the
    # GGUF stores the config's list (identical for every published checkpoint).
    supported_aspect_ratios: tuple[tuple[int, int], ...] = field(default_factory=lambda: all_aspect_ratios(4))
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1.0 / 255.0
    resample: int = 2  # PIL.Image.BILINEAR
    image_token: str = "<|image|>"
    image_token_id: int = 128256
    bos_token: str = "<|begin_of_text|>"

    max_images: int = hparams.MAX_IMAGES_PER_PROMPT  # per prompt, checked before any image is decoded

    def __post_init__(self):
        # Range rules: mllama_q/hparams.py (HParamError is a ValueError naming the setting).
        hparams.check_image(
            self.tile_size, self.max_num_tiles, self.image_mean, self.image_std, self.rescale_factor, self.resample
        )
        hparams.check_aspect_ratios(self.supported_aspect_ratios, self.max_num_tiles)
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 1:
            raise ValueError(f"max_images must be a positive integer, got {self.max_images!r}")

    @classmethod
    def from_gguf(cls, reader, tokenizer=None, vision_reader=None) -> "ProcessorSettings":
        """Read the settings from a GGUFFile (mllama_q.gguf_file); keys that are absent fall back to
        11B values.

        `tokenizer` (our Tokenizer) supplies the `<|image|>` id and the BOS text when given.
        `vision_reader`: the file holding the mllama.vision.* keys when it is another one (the
        projector blob of Ollama's two-file layout).
        """
        from .gguf_file import field_value

        def get(const_name, literal):
            r = vision_reader if vision_reader is not None and literal.startswith("mllama.vision.") else reader
            return field_value(r, _key(const_name, literal))

        kw: dict[str, Any] = {}
        v = get("Q_IMG_TILE_SIZE", "mllama_q.image.tile_size")
        if v is None:
            v = get("V_IMAGE_SIZE", "mllama.vision.image_size")  # Ollama's files
        if v is not None:
            kw["tile_size"] = int(v)
        v = get("Q_IMG_MAX_TILES", "mllama_q.image.max_image_tiles")
        if v is None:
            v = get("V_MAX_NUM_TILES", "mllama.vision.max_num_tiles")
        if v is not None:
            kw["max_num_tiles"] = int(v)
        if "max_num_tiles" in kw:  # before all_aspect_ratios is sized from it
            hparams.check_int(kw["max_num_tiles"], "image.max_num_tiles", "max_image_tiles")
        v = get("Q_V_ASPECT_RATIOS", "mllama_q.vision.supported_aspect_ratios")
        if v is not None:
            if len(v) > 2 * len(all_aspect_ratios(kw.get("max_num_tiles", cls.max_num_tiles))):
                raise ValueError(f"{len(v)} aspect-ratio values: more grids than max_num_tiles allows")
            flat = [int(x) for x in v]
            if len(flat) % 2:
                raise ValueError(f"supported aspect ratios must be (rows, cols) pairs, got {len(flat)} values")
            kw["supported_aspect_ratios"] = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
        elif "max_num_tiles" in kw:
            kw["supported_aspect_ratios"] = all_aspect_ratios(kw["max_num_tiles"])
        v = get("Q_IMG_MEAN", "mllama_q.image.mean")
        if v is not None:
            kw["image_mean"] = tuple(float(x) for x in v)
        v = get("Q_IMG_STD", "mllama_q.image.std")
        if v is not None:
            kw["image_std"] = tuple(float(x) for x in v)
        v = get("Q_IMG_RESCALE_FACTOR", "mllama_q.image.rescale_factor")
        if v is not None:
            kw["rescale_factor"] = float(v)
        v = get("Q_IMG_RESAMPLE", "mllama_q.image.resample")
        if v is not None:
            kw["resample"] = int(v)
        v = get("Q_IMAGE_TOKEN_ID", "mllama_q.image_token_id")
        if v is not None:
            kw["image_token_id"] = int(v)
        if tokenizer is not None:
            tid = tokenizer.token_to_id("<|image|>")
            if "image_token_id" not in kw and tid is not None:
                kw["image_token_id"] = tid
            if "image_token_id" in kw:
                if not 0 <= kw["image_token_id"] < len(tokenizer.tokens):
                    raise ValueError(
                        f"image token id {kw['image_token_id']} is not one of the tokenizer's "
                        f"{len(tokenizer.tokens)} tokens"
                    )
                kw["image_token"] = tokenizer.id_to_token(kw["image_token_id"])
            if tokenizer.bos_token is not None:
                kw["bos_token"] = tokenizer.bos_token
        return cls(**kw)


def _key(const_name: str, default: str) -> str:
    """A metadata key name from mllama_q.gguf_keys (owned by the converter) when it defines it."""
    try:
        from . import gguf_keys
    except ImportError:
        return default
    return getattr(gguf_keys, const_name, default)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

# Largest image decoded: PIL's own default Image.MAX_IMAGE_PIXELS (89,478,485, a 0.25 GB 24-bit
# image; PIL only warns up to twice that, and its global can be switched off). Checked from the
# header, before any pixel is decoded, so a small file claiming 20000 x 20000 pixels (a
# decompression bomb) costs nothing. The model never needs this much: the largest canvas is
# max_num_tiles x 560 px on its long side.
MAX_IMAGE_PIXELS = 89_478_485


class ImageError(ValueError):
    """An image that cannot be used: unreadable, corrupt, truncated, zero-size or too large."""


def _check_size(width: int, height: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has zero size: {width}x{height}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{what} is {width}x{height} = {width * height:,} pixels, more than the "
            f"{MAX_IMAGE_PIXELS:,} this reader decodes (a decompression bomb?); downscale it first"
        )


def _decode(src, what: str) -> Image.Image:
    """Decode one image file (path or file object) fully, refusing bombs before decoding."""
    try:
        with Image.open(src) as f:
            _check_size(f.width, f.height, what)  # header only: nothing decoded yet
            f.load()  # decode now so a truncated file fails here, not later
            return f.copy()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"cannot read {what}: {e}") from None
    except Exception as e:  # noqa: BLE001  third-party decoders on untrusted bytes: ValueError,
        # struct.error, EOFError, zlib.error, IndexError, ... all mean a corrupt file
        raise ImageError(f"cannot decode {what}: {type(e).__name__}: {e}") from None


def load_image(image) -> Image.Image | np.ndarray:
    """Open a path / bytes / PIL image; uint8 numpy arrays pass through. ImageError (a
    ValueError) if unusable: missing, not an image, corrupt or truncated, zero-size, or more
    than MAX_IMAGE_PIXELS pixels."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        img = _decode(path, f"image {path}")
    elif isinstance(image, (bytes, bytearray, memoryview)):
        img = _decode(io.BytesIO(bytes(image)), "image bytes")
    elif isinstance(image, np.ndarray):
        # (H, W) grey or (H, W, 3|4) uint8, channels last; kept as an array (see to_rgb).
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ImageError(
                f"numpy images must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {image.dtype} {image.shape}"
            )
        _check_size(image.shape[1], image.shape[0], "image array")
        return image
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}: pass a path, bytes, PIL image or uint8 array")
    _check_size(img.width, img.height, "image")
    return img


def to_rgb(img: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3). Transparency is composited onto WHITE, like transformers'
    image_transforms.convert_to_rgb: any mode with an alpha band (RGBA, LA, PA, ...) or a
    palette/colour-key `transparency` goes through RGBA + alpha_composite; everything else
    (L, P, CMYK, I;16, YCbCr, ...) uses PIL's own convert("RGB"). numpy arrays follow that
    function's array branch: grey is repeated, RGBA is blended in float64 and rounded."""
    if isinstance(img, np.ndarray):
        if img.ndim == 2:
            return np.repeat(img[:, :, None], 3, axis=2)
        if img.shape[2] == 3:
            return img
        alpha = img[..., 3:4] / 255
        return np.round(alpha * img[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        rgb = img.convert("RGB")
    return np.asarray(rgb)


def optimal_canvas(height: int, width: int, settings: ProcessorSettings) -> tuple[int, int]:
    """(canvas_h, canvas_w) in pixels: the tile grid needing the least upscaling, else the least
    downscaling; ties go to the smallest area.

    transformers: image_processing_mllama.get_optimal_tiled_canvas (same float64 maths, so the
    exact-equality tie test picks the same grid)."""
    grids = np.array(settings.supported_aspect_ratios, dtype=np.int64) * settings.tile_size  # [n, 2] (h, w)
    scale_h = grids[:, 0] / height
    scale_w = grids[:, 1] / width
    scales = np.where(scale_w > scale_h, scale_h, scale_w)  # the image must fit both sides
    up = scales[scales >= 1]
    chosen = np.min(up) if len(up) > 0 else np.max(scales[scales < 1])
    candidates = grids[scales == chosen]
    best = candidates[np.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(best[0]), int(best[1])


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """(new_h, new_w) keeping the aspect ratio, each side clamped to [tile, canvas].

    transformers: image_processing_mllama.get_image_size_fit_to_canvas."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h = target_h / height
    scale_w = target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def preprocess_image(image, settings: ProcessorSettings) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> (tiles float32 [rows*cols, 3, T, T], (rows, cols))."""
    img = load_image(image)
    try:
        rgb = to_rgb(img)  # uint8 (H, W, 3); a caller's lazily opened PIL image decodes here
    except Exception as e:  # noqa: BLE001  PIL on untrusted bytes (a truncated file: OSError)
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None
    h, w = rgb.shape[:2]
    t = settings.tile_size
    canvas_h, canvas_w = optimal_canvas(h, w, settings)
    rows, cols = canvas_h // t, canvas_w // t
    new_h, new_w = fit_to_canvas(h, w, canvas_h, canvas_w, t)

    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=settings.resample))  # (new_h, new_w, 3)
    padded = np.zeros((3, rows * t, cols * t), dtype=np.uint8)
    padded[:, :new_h, :new_w] = resized.transpose(2, 0, 1)

    # transformers image_transforms.rescale: upcast to float64, multiply, downcast to float32;
    # normalize: float32 (x - mean) / std per channel.
    x = (padded.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    mean = np.asarray(settings.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(settings.image_std, dtype=np.float32)[:, None, None]
    x = (x - mean) / std

    # (3, rows*T, cols*T) -> (rows*cols, 3, T, T), tiles in row-major order.
    tiles = x.reshape(3, rows, t, cols, t).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
    return np.ascontiguousarray(tiles), (rows, cols)


def preprocess_images(images: Sequence, settings: ProcessorSettings) -> dict[str, Any]:
    """Several images of ONE prompt -> pixel_values [1, n, max_tiles, 3, T, T], aspect_ratio_ids
    [1, n], aspect_ratio_mask [1, n, max_tiles] and num_tiles (list of ints)."""
    if len(images) == 0:
        raise ValueError("no images given")
    hparams.check_image_count(len(images), settings.max_images)  # before any image is decoded
    t, mt = settings.tile_size, settings.max_num_tiles
    n = len(images)
    pixel_values = np.zeros((1, n, mt, 3, t, t), dtype=np.float32)
    ids = np.zeros((1, n), dtype=np.int64)
    mask = np.zeros((1, n, mt), dtype=np.int64)
    mask[:, :, 0] = 1  # HF: the first tile is always marked valid
    num_tiles = []
    for j, image in enumerate(images):
        tiles, grid = preprocess_image(image, settings)
        k = tiles.shape[0]
        pixel_values[0, j, :k] = tiles
        ids[0, j] = settings.supported_aspect_ratios.index(grid) + 1
        mask[0, j, :k] = 1
        num_tiles.append(k)
    return {"pixel_values": pixel_values, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask, "num_tiles": num_tiles}


# ---------------------------------------------------------------------------------------------
# Cross-attention mask
# ---------------------------------------------------------------------------------------------


def image_token_spans(input_ids: Sequence[int], image_token_id: int) -> list[list[int]]:
    """[start, end) token range each image is visible to (end -1 = to the end).

    transformers: processing_mllama.get_cross_attention_token_mask. An image is seen from its
    own `<|image|>` token until the next one; the last image until the end; a run of adjacent
    image tokens all see what the last of the run sees."""
    locs = [i for i, tok in enumerate(input_ids) if tok == image_token_id]
    if not locs:
        return []
    if len(locs) == 1:
        return [[locs[0], -1]]
    spans = [[a, b] for a, b in zip(locs[:-1], locs[1:])]
    spans.append([locs[-1], len(input_ids)])
    last_end = spans[-1][1]
    for span in reversed(spans):
        if span[0] == span[1] - 1:  # directly followed by another image token
            span[1] = last_end
        last_end = span[1]
    return spans


def cross_attention_mask(
    input_ids: Sequence[int], image_token_id: int, num_tiles: Sequence[int], max_num_tiles: int
) -> np.ndarray:
    """int64 [1, L, n_images, max_num_tiles]: 1 where token l may attend to tile t of image i.

    transformers: processing_mllama.convert_sparse_cross_attention_mask_to_dense (one sample)."""
    length = len(input_ids)
    spans = image_token_spans(input_ids, image_token_id)
    out = np.zeros((1, length, len(num_tiles), max_num_tiles), dtype=np.int64)
    for i, ((start, end), k) in enumerate(zip(spans, num_tiles)):
        end = min(end, length)
        if end == -1:
            end = length
        out[0, start:end, i, :k] = 1
    return out


# ---------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------


class Processor:
    """`processor(text=..., images=[...])` -> dict of numpy arrays, as MllamaProcessor returns
    with `return_tensors="np"` for one prompt."""

    def __init__(self, tokenizer=None, settings: ProcessorSettings | None = None):
        self.tokenizer = tokenizer
        self.settings = settings or ProcessorSettings()

    @classmethod
    def from_gguf(cls, reader, tokenizer=None) -> "Processor":
        """Processor with the settings stored in a gguf.GGUFReader (11B values where absent)."""
        return cls(tokenizer, ProcessorSettings.from_gguf(reader, tokenizer))

    def preprocess_images(self, images: Sequence) -> dict[str, Any]:
        return preprocess_images(images, self.settings)

    def _with_bos(self, text: str) -> str:
        """transformers: processing_mllama.build_string_from_input. Adds the BOS text after any
        leading `<|image|>` tokens unless the prompt already contains it anywhere."""
        s = self.settings
        if s.bos_token in text:
            return text
        n = 0
        while text.startswith(s.image_token):
            text = text[len(s.image_token) :]
            n += 1
        return s.image_token * n + s.bos_token + text

    def __call__(
        self, text: str | None = None, images: Sequence | None = None, add_special_tokens: bool = True
    ) -> dict[str, Any]:
        """add_special_tokens=False is HF's `processor(..., add_special_tokens=False)`, used for
        prompts rendered by the chat template (which writes BOS itself)."""
        s = self.settings
        if text is None and images is None:
            raise ValueError("give text, images or both")
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if text is not None and not isinstance(text, str):
            raise ValueError(f"text must be one string (one sequence), got {type(text).__name__}")
        if text is not None and images is not None:
            n_tok = text.count(s.image_token)
            if n_tok != len(images):
                raise ValueError(
                    f"the prompt has {n_tok} {s.image_token} token(s) but {len(images)} image(s) were given"
                )
        out: dict[str, Any] = {}
        if text is not None:
            if self.tokenizer is None:
                raise ValueError("this Processor has no tokenizer")
            # BOS text as MllamaProcessor adds it, then the tokenizer's own BOS rule
            ids = self.tokenizer.encode(self._with_bos(text), add_special_tokens=add_special_tokens)
            out["input_ids"] = np.asarray([ids], dtype=np.int64)
            out["attention_mask"] = np.ones((1, len(ids)), dtype=np.int64)
        if images is not None and len(images) > 0:
            img = self.preprocess_images(images)
            num_tiles = img.pop("num_tiles")
            if text is not None:
                out["cross_attention_mask"] = cross_attention_mask(
                    out["input_ids"][0].tolist(), s.image_token_id, num_tiles, s.max_num_tiles
                )
            out.update(img)
        return out
