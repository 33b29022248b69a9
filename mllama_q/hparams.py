"""Range rules for every mllama hyper-parameter, in ONE place.

Used before anything is sized from a hyper-parameter by the runtime loader (mllama_q/model.py:
values from a GGUF file; mllama_q/processor.py: the image settings) and by the converter
(mllama_q.convert.hf: values from config.json / preprocessor_config.json). A value outside its
range is an `HParamError` (a ValueError) whose message names the key (the caller's spelling)
and the allowed range; callers re-raise it as their own error type with the file name.

Leaf module: standard library only (no numpy, no mllama_q imports).

Why these bounds: each is a generous multiple (8x-16x, more where the cost is negligible) of
the largest published Llama 3.2 Vision model, so every real or plausible future checkpoint
passes, while a corrupt or hostile value (a flipped byte, 2**31 layers, 100000 tiles, 20000-px
tiles, eps = inf) is refused before it turns into a loop of billions of steps, an allocation
of terabytes, or logits that are silently all equal. Real values (11B / 90B) from the
published config.json / preprocessor_config.json of meta-llama/Llama-3.2-11B-Vision-Instruct
and -90B-Vision-Instruct on the Hugging Face hub (the 90B differs only in the text sizes):

    text    vocab 128256, hidden 4096 / 8192, ffn 14336 / 28672, layers 40 / 100 (8 / 20 cross),
            heads 32 / 64, kv heads 8, head_dim 128, rms_eps 1e-5, rope_theta 500000,
            llama3 rope scaling (factor 8, low 1, high 4, original context 8192),
            max_position_embeddings 131072
    vision  hidden 1280, ffn 5120, 32 local + 8 global layers, 16 heads, 560-px tiles,
            14-px patches (1600 + 1 per tile), 3 channels, 4 tiles, 8 aspect ratios,
            norm_eps 1e-5, 5 intermediate layers, output 7680
    image   560-px tiles, at most 4, CLIP mean/std, rescale 1/255, bilinear (2)
"""

from __future__ import annotations

import math
import operator
from typing import Any, Iterable, Mapping


class HParamError(ValueError):
    """A hyper-parameter is missing its type or outside its allowed range."""


# ------------------------------------------------------------------ the bounds
# name: (lo, hi) inclusive; comment: real value, and why the bound is what it is.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    # text decoder
    "text.vocab_size": (1, 1 << 20),  # 128256; 8x. embed/output rows; every logit row is V floats
    "text.hidden_size": (1, 1 << 16),  # 4096 / 8192; 8x the 90B
    "text.intermediate_size": (1, 1 << 18),  # 14336 / 28672; 9x the 90B
    "text.n_layer": (1, 1000),  # 40 / 100; 10x. the converter plans ~9 tensors per layer
    "text.n_head": (1, 512),  # 32 / 64; 8x
    "text.n_kv_head": (1, 512),  # 8; also <= n_head and divides it
    "text.head_dim": (2, 1024),  # 128; 8x; even (RoPE rotates pairs)
    "text.context_length": (1, 1 << 24),  # 131072; 128x (n_ctx is the user's; this is metadata)
    "text.rope_original_context": (1, 1 << 24),  # 8192 (llama3 rope scaling)
    # vision tower
    "vision.hidden_size": (1, 1 << 14),  # 1280; 12.8x
    "vision.intermediate_size": (1, 1 << 16),  # 5120; 12.8x
    "vision.num_layers": (1, 512),  # 32; 16x
    "vision.num_global_layers": (0, 512),  # 8; 64x
    "vision.n_head": (1, 512),  # 16; 32x
    "vision.image_size": (1, 2240),  # 560 (the tile size); 4x. pixels per tile = size^2 x 3
    "vision.patch_size": (1, 2240),  # 14; <= image_size
    "vision.num_channels": (1, 16),  # 3 (RGB)
    "vision.max_num_tiles": (1, 64),  # 4; 16x. aspect-ratio grids grow as n log n
    "vision.out_dim": (1, 1 << 20),  # 7680 = hidden x (1 + 5 intermediate layers)
    # image preprocessing (preprocessor_config.json / mllama_q.image.*)
    "image.tile_size": (1, 2240),  # 560; = vision.image_size
    "image.max_num_tiles": (1, 64),  # 4; = vision.max_num_tiles
    "image.resample": (0, 5),  # 2 (PIL BILINEAR); PIL's filters are 0..5
}
# Pixels of one preprocessed image (max_num_tiles x tile_size^2): 11B 4 x 560^2 = 1.25 M
# (15 MB of float32 pixel_values). 16x: 20 M pixels, 240 MB per image.
MAX_PIXELS_PER_IMAGE = 16 * 4 * 560 * 560
# Patches per tile ((image_size / patch_size)^2): 11B 1600; 64x (the tower attends to all of
# them jointly across tiles, so the work is quadratic in this number).
MAX_PATCHES_PER_TILE = 64 * 1600
# Images in ONE prompt. Meta recommends one image per prompt (llama_models
# llama3_2/vision_prompt_format.md); each image costs about 0.3 GB at 11B (cross-attention K/V
# of 4 x 1601 vision tokens in 8 layers, in f16, plus the encoder's states), so 16 images are
# ~5 GB: the most a 8-24 GB machine can hold beside the weights. 10,000 images would run for
# minutes and gigabytes before failing.
MAX_IMAGES_PER_PROMPT = 16

# name: (lo, hi, lo_open). Every float must also be finite.
FLOAT_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "text.rms_eps": (0.0, 1.0, True),  # 1e-5; inf makes every logit equal, 0 divides by 0
    "text.rope_theta": (1.0, 1e12, True),  # 500000; <= 1 has no rotation (or an inverted one)
    "text.rope_factor": (0.0, 1e6, True),  # 8 (llama3 scaling)
    "text.rope_low_freq_factor": (0.0, 1e6, True),  # 1
    "text.rope_high_freq_factor": (0.0, 1e6, True),  # 4; != low_freq_factor
    "vision.norm_eps": (0.0, 1.0, True),  # 1e-5
    "image.rescale_factor": (0.0, 1e3, True),  # 1/255
    "image.mean": (-1e3, 1e3, False),  # CLIP 0.48, 0.46, 0.41
    "image.std": (1e-6, 1e3, False),  # CLIP 0.27, 0.26, 0.28; 0 divides by zero
}


def _label(rule: str, label: str | None) -> str:
    return label or rule.split(".", 1)[1]


def _as_int(value: Any, label: str, what: str = "an integer") -> int:
    """An int (or numpy integer); bools, floats (a 1e9 in JSON is a float) and strings refused."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise HParamError(f"{label} must be {what}, got {value!r}")


def check_int(value: Any, rule: str, label: str | None = None, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int within INT_BOUNDS[rule] (narrowed by lo / hi)."""
    name = _label(rule, label)
    v = _as_int(value, name)
    b_lo, b_hi = INT_BOUNDS[rule]
    b_lo = b_lo if lo is None else max(b_lo, lo)
    b_hi = b_hi if hi is None else min(b_hi, hi)
    if not b_lo <= v <= b_hi:
        raise HParamError(f"{name} = {v} is outside [{b_lo}, {b_hi}]")
    return v


def check_float(value: Any, rule: str, label: str | None = None) -> float:
    """`value` as a finite float within FLOAT_BOUNDS[rule]."""
    name = _label(rule, label)
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise HParamError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise HParamError(f"{name} must be a number, got {value!r}") from None
    lo, hi, lo_open = FLOAT_BOUNDS[rule]
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        raise HParamError(f"{name} = {v!r} must be finite and in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return v


def check_index_list(values: Any, n: int, label: str, distinct: bool = False) -> list[int]:
    """A list of integers, each in [0, n), at most n of them (distinct if asked)."""
    try:
        items = list(values)
    except TypeError:
        raise HParamError(f"{label} must be a list of integers, got {values!r}") from None
    if len(items) > n:
        raise HParamError(f"{label} has {len(items)} entries, more than the {n} layers")
    out = []
    for x in items:
        i = _as_int(x, label, "a list of integers")
        if not 0 <= i < n:
            raise HParamError(f"{label}: index {i} is outside [0, {n})")
        out.append(i)
    if distinct and len(set(out)) != len(out):
        raise HParamError(f"{label}: indices {out} are not distinct")
    return out


def _labels(labels: Mapping[str, str] | None):
    labels = labels or {}
    return lambda key: labels.get(key, key)


# ------------------------------------------------------------------ structures
TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "n_layer",
    "n_head",
    "n_kv_head",
    "head_dim",
    "rms_eps",
    "rope_theta",
    "cross_attention_layers",
)


def check_text(hp: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> None:
    """The text decoder's hyper-parameters, keyed as mllama_q.model.text_hparams' dict
    (TEXT_KEYS; optional: context_length, rope_scaling = {factor, low_freq_factor,
    high_freq_factor, original_context_length}). `labels` maps those keys to the caller's
    spelling (e.g. "n_layer" -> "num_hidden_layers") for the messages."""
    L = _labels(labels)
    for k in ("vocab_size", "hidden_size", "intermediate_size", "n_layer", "n_head", "n_kv_head", "head_dim"):
        check_int(hp[k], "text." + k, L(k))
    n_head, n_kv, hd = hp["n_head"], hp["n_kv_head"], hp["head_dim"]
    if n_head % n_kv:
        raise HParamError(f"{L('n_head')} = {n_head} is not a multiple of {L('n_kv_head')} = {n_kv}")
    if hd % 2:
        raise HParamError(f"{L('head_dim')} = {hd} must be even (RoPE rotates pairs)")
    check_float(hp["rms_eps"], "text.rms_eps", L("rms_eps"))
    check_float(hp["rope_theta"], "text.rope_theta", L("rope_theta"))
    check_index_list(hp["cross_attention_layers"], hp["n_layer"], L("cross_attention_layers"), distinct=True)
    if hp.get("context_length") is not None:
        check_int(hp["context_length"], "text.context_length", L("context_length"))
    rs = hp.get("rope_scaling")
    if rs:
        check_rope_scaling(rs, labels)


def check_rope_scaling(rs: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> None:
    """llama3 RoPE scaling: factor, low_freq_factor, high_freq_factor (finite, positive,
    high != low: transformers divides by their difference) and original_context_length."""
    L = _labels(labels)
    lo = check_float(rs["low_freq_factor"], "text.rope_low_freq_factor", L("low_freq_factor"))
    hi = check_float(rs["high_freq_factor"], "text.rope_high_freq_factor", L("high_freq_factor"))
    check_float(rs["factor"], "text.rope_factor", L("factor"))
    check_int(rs["original_context_length"], "text.rope_original_context", L("original_context_length"))
    if hi == lo:
        raise HParamError(f"{L('high_freq_factor')} must differ from {L('low_freq_factor')} (both {hi})")


VISION_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_global_layers",
    "n_head",
    "image_size",
    "patch_size",
    "num_channels",
    "max_num_tiles",
    "norm_eps",
    "intermediate_layers",
    "out_dim",
)


def check_vision(hp: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> None:
    """The vision tower's hyper-parameters, keyed as mllama_q.model.vision_hparams' dict
    (VISION_KEYS; optional: max_aspect_ratio_id)."""
    L = _labels(labels)
    for k in (
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_global_layers",
        "n_head",
        "image_size",
        "num_channels",
        "max_num_tiles",
        "out_dim",
    ):
        check_int(hp[k], "vision." + k, L(k))
    check_int(hp["patch_size"], "vision.patch_size", L("patch_size"), hi=hp["image_size"])
    if hp["hidden_size"] % hp["n_head"]:
        raise HParamError(
            f"{L('hidden_size')} = {hp['hidden_size']} is not a multiple of {L('n_head')} = {hp['n_head']}"
        )
    grid = hp["image_size"] // hp["patch_size"]
    if grid * grid > MAX_PATCHES_PER_TILE:
        raise HParamError(
            f"{L('image_size')} / {L('patch_size')} = {grid}: {grid * grid} patches per tile, "
            f"more than {MAX_PATCHES_PER_TILE}"
        )
    check_pixels(hp["image_size"], hp["max_num_tiles"], L("image_size"), L("max_num_tiles"))
    check_float(hp["norm_eps"], "vision.norm_eps", L("norm_eps"))
    check_index_list(hp["intermediate_layers"], hp["num_layers"], L("intermediate_layers"))
    if hp.get("max_aspect_ratio_id") is not None:
        n = len(all_aspect_ratios(hp["max_num_tiles"]))
        if not 1 <= hp["max_aspect_ratio_id"] <= n:
            raise HParamError(
                f"{hp['max_aspect_ratio_id']} aspect ratios; {hp['max_num_tiles']} tiles allow between 1 and {n}"
            )


def check_pixels(
    tile_size: int, max_tiles: int, tile_label: str = "tile_size", tiles_label: str = "max_num_tiles"
) -> None:
    if tile_size * tile_size * max_tiles > MAX_PIXELS_PER_IMAGE:
        raise HParamError(
            f"{tiles_label} = {max_tiles} tiles of {tile_label} = {tile_size} px are "
            f"{tile_size * tile_size * max_tiles} pixels per image, more than {MAX_PIXELS_PER_IMAGE}"
        )


def all_aspect_ratios(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, cols) tile grid with rows * cols <= max_num_tiles, in HF's order.

    transformers: image_processing_mllama.get_all_supported_aspect_ratios (outer loop over the
    first element; it tests all n^2 pairs, here only the n log n that fit). For 4 tiles:
    (1,1) (1,2) (1,3) (1,4) (2,1) (2,2) (3,1) (4,1). The count is checked first."""
    n = check_int(max_num_tiles, "vision.max_num_tiles", "max_num_tiles")
    return tuple((a, b) for a in range(1, n + 1) for b in range(1, n // a + 1))


def check_aspect_ratios(
    pairs: Iterable, max_num_tiles: int, label: str = "supported_aspect_ratios"
) -> tuple[tuple[int, int], ...]:
    """(rows, cols) pairs, each >= 1 with rows * cols <= max_num_tiles, distinct (so there are
    at most len(all_aspect_ratios(max_num_tiles)) of them). Returns them as int tuples."""
    allowed = set(all_aspect_ratios(max_num_tiles))
    out = []
    for p in pairs:
        try:
            r, c = (operator.index(x) for x in p)
        except (TypeError, ValueError):
            raise HParamError(f"{label} must be [rows, cols] integer pairs, got {p!r}") from None
        if (r, c) not in allowed:
            raise HParamError(f"{label}: {(r, c)} is not a grid of at most {max_num_tiles} tiles")
        out.append((r, c))
        if len(out) > len(allowed):
            break
    if not out:
        raise HParamError(f"{label} is empty")
    if len(set(out)) != len(out):
        raise HParamError(f"{label} repeats a grid: {out[:16]}")
    return tuple(out)


def check_image(
    tile_size: Any,
    max_num_tiles: Any,
    image_mean: Any,
    image_std: Any,
    rescale_factor: Any,
    resample: Any,
    labels: Mapping[str, str] | None = None,
    n_channels: int = 3,
) -> None:
    """The image preprocessing settings (MllamaImageProcessor's), in the processor's names."""
    L = _labels(labels)
    t = check_int(tile_size, "image.tile_size", L("tile_size"))
    n = check_int(max_num_tiles, "image.max_num_tiles", L("max_num_tiles"))
    check_pixels(t, n, L("tile_size"), L("max_num_tiles"))
    for key, rule, values in (("image_mean", "image.mean", image_mean), ("image_std", "image.std", image_std)):
        try:
            vals = list(values)
        except TypeError:
            raise HParamError(f"{L(key)} must be a list of {n_channels} numbers, got {values!r}") from None
        if len(vals) != n_channels:
            raise HParamError(f"{L(key)} must have {n_channels} values, got {len(vals)}")
        for v in vals:
            if rule == "image.std" and isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                v = -v  # a negative std only flips the sign; zero and tiny values are the danger
            check_float(v, rule, L(key))
    check_float(rescale_factor, "image.rescale_factor", L("rescale_factor"))
    check_int(resample, "image.resample", L("resample"))


def check_token_id(value: Any, n_embd_rows: int, label: str) -> int:
    """A token id that indexes the embedding table (vocab_size + 8 rows in mllama)."""
    v = _as_int(value, label)
    if not 0 <= v < n_embd_rows:
        raise HParamError(f"{label} = {v} is outside the {n_embd_rows} embedding rows")
    return v


def check_image_count(n: int, limit: int = MAX_IMAGES_PER_PROMPT) -> None:
    """Refuse a prompt with more images than the model takes, before any image is decoded."""
    if n > limit:
        raise HParamError(
            f"{n} images in one prompt; this model takes at most {limit} "
            "(each costs about 0.3 GB of cross-attention state; Meta recommends one)"
        )
