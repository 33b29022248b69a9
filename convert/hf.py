"""Read a Hugging Face Mllama checkpoint directory (configs + safetensors index), no torch.

Inputs: config.json, model.safetensors or model-0000N-of-0000M.safetensors (+ its
.index.json), tokenizer.json (read by convert/tokenizer.py), generation_config.json,
preprocessor_config.json.

Missing hyper-parameters take transformers' MllamaTextConfig / MllamaVisionConfig
defaults (configuration_mllama.py), since that is what HF itself would run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mllama_q import hparams as HP

from .errors import ConvertError
from .safetensors_io import SafetensorsFile, TensorEntry

# transformers MllamaTextConfig / MllamaVisionConfig defaults.
_TEXT_DEFAULTS = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
    bos_token_id=128000,
    eos_token_id=128001,
    pad_token_id=128004,
    tie_word_embeddings=False,
    hidden_act="silu",
)
_TEXT_DEFAULT_THETA = 500000.0  # MllamaTextConfig.default_theta
_VISION_DEFAULTS = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_global_layers=8,
    attention_heads=16,
    num_channels=3,
    image_size=448,
    patch_size=14,
    norm_eps=1e-5,
    max_num_tiles=4,
    intermediate_layers_indices=[3, 7, 15, 23, 30],
    vision_output_dim=7680,
    supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    hidden_act="gelu",
)
# MllamaImageProcessor defaults.
_IMAGE_DEFAULTS = dict(
    do_convert_rgb=True,
    do_resize=True,
    size={"height": 224, "width": 224},
    resample=2,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
    do_pad=True,
    max_image_tiles=4,
)

# config.json names of the hyper-parameters, for mllama_q.hparams' messages.
TEXT_LABELS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "head_dim": "head_dim (hidden_size / num_attention_heads)",
    "rms_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "cross_attention_layers": "cross_attention_layers",
    "context_length": "max_position_embeddings",
    "factor": "rope factor",
    "low_freq_factor": "rope low_freq_factor",
    "high_freq_factor": "rope high_freq_factor",
    "original_context_length": "rope original_max_position_embeddings",
}
VISION_LABELS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_global_layers": "num_global_layers",
    "n_head": "attention_heads",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "max_num_tiles": "max_num_tiles",
    "norm_eps": "norm_eps",
    "intermediate_layers": "intermediate_layers_indices",
    "out_dim": "vision_output_dim",
}

SAFE_NAME_RE = re.compile(r"^[^/\\\x00]+\.safetensors$")  # a file in the checkpoint directory, no path
SHARD_RE = re.compile(r"^model-(\d+)-of-(\d+)\.safetensors$")


@dataclass
class TextHP:
    vocab_size: int
    hidden: int
    intermediate: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None  # normalised: {"type": "llama3", factor, low_freq_factor, ...} or None
    cross_layers: list
    tie_word_embeddings: bool
    bos_id: int | None
    eos_ids: list
    pad_id: int | None


@dataclass
class VisionHP:
    hidden: int
    intermediate: int
    n_layer: int
    n_global: int
    n_head: int
    image_size: int
    patch_size: int
    n_channels: int
    max_tiles: int
    norm_eps: float
    inter_layers: list
    output_dim: int
    aspect_ratios: list  # [[rows, cols], ...]

    @property
    def n_patches(self) -> int:
        """Patches per tile including the class token ((560/14)^2 + 1 = 1601)."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class Checkpoint:
    dir: Path
    text: TextHP
    vision: VisionHP
    image_token_id: int
    preprocessor: dict
    generation: dict
    stop_ids: list
    tensors: dict = field(default_factory=dict)  # normalised hub name -> TensorEntry
    files: list = field(default_factory=list)  # SafetensorsFile objects (by path)

    def file_of(self, entry: TensorEntry) -> SafetensorsFile:
        for f in self.files:
            if f.path == entry.path:
                return f
        raise KeyError(entry.path)

    def close(self) -> None:
        for f in self.files:
            f.close()


MAX_JSON_BYTES = 256 << 20  # config files are KBs, the real tokenizer.json 9 MB


def read_json(path: Path, required: bool = True, kind: type | None = dict):
    """A checkpoint JSON file; ConvertError (one line, naming the file) if it is missing (and
    required), larger than MAX_JSON_BYTES, not UTF-8, not JSON, nested too deep for the parser,
    or (kind) not of that top-level type."""
    if not path.is_file():
        if required:
            raise ConvertError(f"{path}: missing file")
        return None
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ConvertError(f"{path}: {size} bytes, too large for a JSON config (limit {MAX_JSON_BYTES})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, ints beyond 4300 digits
        raise ConvertError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:
        raise ConvertError(f"{path}: invalid JSON (nested too deeply)") from None
    if kind is not None and not isinstance(data, kind):
        raise ConvertError(
            f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, got {type(data).__name__}"
        )
    return data


def _int(cfg: dict, key: str, defaults: dict, where: str) -> int:
    v = cfg.get(key, defaults.get(key))
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConvertError(f"{where}: {key} must be a non-negative integer, got {v!r}")
    return v


def _float(cfg: dict, key: str, defaults: dict, where: str) -> float:
    v = cfg.get(key, defaults.get(key))
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConvertError(f"{where}: {key} must be a number, got {v!r}")
    return float(v)


def _hp(fn, *args, where: str):
    """Run a mllama_q.hparams range check; HParamError -> ConvertError naming the file."""
    try:
        return fn(*args)
    except HP.HParamError as e:
        raise ConvertError(f"{where}: {e}") from None


def _int_list(v, key: str, where: str) -> list:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ConvertError(f"{where}: {key} must be a list of integers, got {v!r}")
    return list(v)


def _ids(v, key: str = "eos_token_id", where: str = "config") -> list:
    if v is None:
        return []
    ids = v if isinstance(v, list) else [v]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ids):
        raise ConvertError(f"{where}: {key} must be a token id or a list of them, got {v!r}")
    return list(ids)


def parse_rope(tc: dict, where: str):
    """(theta, scaling) from either spelling.

    Published checkpoints: "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", ...}
    (older files say "type" instead of "rope_type"). transformers 5: "rope_parameters":
    {"rope_type": "llama3", "rope_theta": 500000.0, ...}. Returns scaling None for plain RoPE.
    """
    params = tc.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConvertError(f"{where}: rope_parameters must be an object")
        theta = params.get("rope_theta", tc.get("rope_theta", _TEXT_DEFAULT_THETA))
        scaling = params
    else:
        theta = tc.get("rope_theta", _TEXT_DEFAULT_THETA)
        scaling = tc.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise ConvertError(f"{where}: rope_scaling must be an object or null")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConvertError(f"{where}: rope_theta must be a positive number, got {theta!r}")
    rope_type = None
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ConvertError(f"{where}: unsupported rope type {rope_type!r} (supported: default, llama3)")
    try:
        out = {
            "type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_context_length": int(scaling["original_max_position_embeddings"]),
        }
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
        raise ConvertError(f"{where}: llama3 rope scaling is missing or has a bad {e}") from None
    if out["high_freq_factor"] == out["low_freq_factor"]:
        raise ConvertError(f"{where}: llama3 rope scaling needs high_freq_factor != low_freq_factor")
    return float(theta), out


def parse_config(cfg: dict, where: str):
    if not isinstance(cfg, dict):
        raise ConvertError(f"{where}: not a JSON object")
    mt = cfg.get("model_type")
    if mt != "mllama":
        raise ConvertError(f"{where}: model_type is {mt!r}, expected 'mllama' (a Llama 3.2 Vision checkpoint)")
    tc, vc = cfg.get("text_config"), cfg.get("vision_config")
    if not isinstance(tc, dict) or not isinstance(vc, dict):
        raise ConvertError(f"{where}: text_config and vision_config must both be present")
    w = f"{where} text_config"
    d = _TEXT_DEFAULTS
    hidden, n_head = _int(tc, "hidden_size", d, w), _int(tc, "num_attention_heads", d, w)
    n_head_kv = _int(tc, "num_key_value_heads", d, w)
    if n_head == 0 or hidden % n_head or (hidden // n_head) % 2:
        raise ConvertError(f"{w}: hidden_size {hidden} is not num_attention_heads {n_head} x an even head_dim")
    if n_head_kv == 0 or n_head % n_head_kv:
        raise ConvertError(f"{w}: num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}")
    n_layer = _int(tc, "num_hidden_layers", d, w)
    cross = _int_list(tc.get("cross_attention_layers", d["cross_attention_layers"]), "cross_attention_layers", w)
    if any(not 0 <= i < n_layer for i in cross) or len(set(cross)) != len(cross):
        raise ConvertError(f"{w}: cross_attention_layers {cross} must be distinct layers in [0, {n_layer})")
    act = tc.get("hidden_act", d["hidden_act"])
    if act != "silu":
        raise ConvertError(f"{w}: hidden_act {act!r} is not supported (expected 'silu')")
    theta, scaling = parse_rope(tc, w)
    text = TextHP(
        vocab_size=_int(tc, "vocab_size", d, w),
        hidden=hidden,
        intermediate=_int(tc, "intermediate_size", d, w),
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=hidden // n_head,
        context_length=_int(tc, "max_position_embeddings", d, w),
        rms_eps=_float(tc, "rms_norm_eps", d, w),
        rope_theta=theta,
        rope_scaling=scaling,
        cross_layers=sorted(cross),
        tie_word_embeddings=bool(tc.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        bos_id=tc.get("bos_token_id", d["bos_token_id"]),
        eos_ids=_ids(tc.get("eos_token_id", d["eos_token_id"]), "eos_token_id", w),
        pad_id=tc.get("pad_token_id", d["pad_token_id"]),
    )
    # Ranges (mllama_q/hparams.py) before anything is planned or sized from them.
    _hp(
        HP.check_text,
        dict(
            vocab_size=text.vocab_size,
            hidden_size=hidden,
            intermediate_size=text.intermediate,
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=n_head_kv,
            head_dim=text.head_dim,
            rms_eps=text.rms_eps,
            rope_theta=theta,
            cross_attention_layers=cross,
            context_length=text.context_length,
            rope_scaling=scaling,
        ),
        TEXT_LABELS,
        where=w,
    )
    w = f"{where} vision_config"
    d = _VISION_DEFAULTS
    ar = vc.get("supported_aspect_ratios") or d["supported_aspect_ratios"]
    if not (
        isinstance(ar, list)
        and ar
        and all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and x > 0 for x in p) for p in ar)
    ):
        raise ConvertError(f"{w}: supported_aspect_ratios must be a list of [rows, cols] pairs, got {ar!r}")
    vision = VisionHP(
        hidden=_int(vc, "hidden_size", d, w),
        intermediate=_int(vc, "intermediate_size", d, w),
        n_layer=_int(vc, "num_hidden_layers", d, w),
        n_global=_int(vc, "num_global_layers", d, w),
        n_head=_int(vc, "attention_heads", d, w),
        image_size=_int(vc, "image_size", d, w),
        patch_size=_int(vc, "patch_size", d, w),
        n_channels=_int(vc, "num_channels", d, w),
        max_tiles=_int(vc, "max_num_tiles", d, w),
        norm_eps=_float(vc, "norm_eps", d, w),
        inter_layers=_int_list(
            vc.get("intermediate_layers_indices") or d["intermediate_layers_indices"], "intermediate_layers_indices", w
        ),
        output_dim=_int(vc, "vision_output_dim", d, w),
        aspect_ratios=[list(p) for p in ar],
    )
    _hp(
        HP.check_vision,
        dict(
            hidden_size=vision.hidden,
            intermediate_size=vision.intermediate,
            num_layers=vision.n_layer,
            num_global_layers=vision.n_global,
            n_head=vision.n_head,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            num_channels=vision.n_channels,
            max_num_tiles=vision.max_tiles,
            norm_eps=vision.norm_eps,
            intermediate_layers=vision.inter_layers,
            out_dim=vision.output_dim,
        ),
        VISION_LABELS,
        where=w,
    )
    _hp(HP.check_aspect_ratios, vision.aspect_ratios, vision.max_tiles, "supported_aspect_ratios", where=w)
    if vision.n_head == 0 or vision.hidden % vision.n_head or (vision.hidden // vision.n_head) % 2:
        raise ConvertError(f"{w}: hidden_size {vision.hidden} is not attention_heads {vision.n_head} x an even size")
    if vision.patch_size == 0 or vision.image_size % vision.patch_size:
        raise ConvertError(f"{w}: image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}")
    if vision.output_dim != vision.hidden * (1 + len(vision.inter_layers)):
        raise ConvertError(
            f"{w}: vision_output_dim {vision.output_dim} != hidden_size {vision.hidden} x "
            f"(1 + {len(vision.inter_layers)} intermediate layers)"
        )
    if any(not 0 <= i < vision.n_layer for i in vision.inter_layers):
        raise ConvertError(f"{w}: intermediate_layers_indices {vision.inter_layers} outside [0, {vision.n_layer})")
    if any(r * c > vision.max_tiles for r, c in vision.aspect_ratios):
        raise ConvertError(
            f"{w}: supported_aspect_ratios {vision.aspect_ratios} exceed max_num_tiles {vision.max_tiles}"
        )
    act = vc.get("hidden_act", d["hidden_act"])
    if act != "gelu":
        raise ConvertError(f"{w}: hidden_act {act!r} is not supported (expected 'gelu')")
    image_token = cfg.get("image_token_index", cfg.get("image_token_id", 128256))
    _hp(HP.check_token_id, image_token, text.vocab_size + 8, "image_token_index", where=where)
    return text, vision, image_token


def parse_preprocessor(pp: dict, vision: VisionHP, where: str) -> dict:
    if not isinstance(pp, dict):
        raise ConvertError(f"{where}: not a JSON object")
    out = {k: pp.get(k, v) for k, v in _IMAGE_DEFAULTS.items()}
    size = out["size"]
    if not isinstance(size, dict) or "height" not in size or "width" not in size:
        raise ConvertError(f"{where}: size must be {{'height': N, 'width': N}}, got {size!r}")
    if size["height"] != size["width"]:
        raise ConvertError(f"{where}: non-square tiles {size} are not supported")
    if size["height"] != vision.image_size:
        raise ConvertError(
            f"{where}: tile size {size['height']} differs from vision_config image_size {vision.image_size}"
        )
    for k in ("image_mean", "image_std"):
        v = out[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [float(v)] * vision.n_channels
        if not isinstance(v, list) or len(v) != vision.n_channels:
            raise ConvertError(f"{where}: {k} must have {vision.n_channels} values, got {v!r}")
        out[k] = v
    for k in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize", "do_pad"):
        if not isinstance(out[k], bool):
            raise ConvertError(f"{where}: {k} must be true or false, got {out[k]!r}")
    out["tile_size"] = size["height"]
    _hp(
        HP.check_image,
        out["tile_size"],
        out["max_image_tiles"],
        out["image_mean"],
        out["image_std"],
        out["rescale_factor"],
        out["resample"],
        {"tile_size": "size.height", "max_num_tiles": "max_image_tiles"},
        vision.n_channels,
        where=where,
    )
    if out["max_image_tiles"] != vision.max_tiles:
        raise ConvertError(
            f"{where}: max_image_tiles {out['max_image_tiles']} differs from vision_config "
            f"max_num_tiles {vision.max_tiles}"
        )
    out["image_mean"] = [float(x) for x in out["image_mean"]]
    out["image_std"] = [float(x) for x in out["image_std"]]
    return out


def _check_sampling(gen: dict, where: str) -> None:
    """generation_config.json's sampling values, as generate() will validate them at run time
    (mllama_q.sampling.SamplingParams): a NaN temperature must not reach the file."""
    from mllama_q.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, SamplingParams

    num = lambda k: isinstance(gen.get(k), (int, float)) and not isinstance(gen.get(k), bool)  # noqa: E731
    try:
        SamplingParams(
            temperature=gen["temperature"] if num("temperature") else DEFAULT_TEMPERATURE,
            top_p=gen["top_p"] if num("top_p") else DEFAULT_TOP_P,
            top_k=gen["top_k"] if num("top_k") else 0,
        )
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from None


def normalise_name(name: str) -> str:
    """Map transformers-5 in-memory names onto the hub checkpoint names the converter expects.

    hub (published and what save_pretrained writes):  language_model.model.layers.0..., language_model.lm_head.weight,
    vision_model..., multi_modal_projector...  In-memory (MllamaForConditionalGeneration.state_dict()):
    model.language_model.layers.0..., lm_head.weight, model.vision_model..., model.multi_modal_projector...
    """
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model.") :]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.vision_model."):
        return name[len("model.") :]
    if name.startswith("model.multi_modal_projector."):
        return name[len("model.") :]
    return name


def weight_files(hf_dir: Path) -> list:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        idx = read_json(index)
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ConvertError(f"{index}: no weight_map")
        if not all(isinstance(n, str) and SAFE_NAME_RE.match(n) for n in wm.values()):
            raise ConvertError(f"{index}: weight_map values must be plain *.safetensors file names")
        names = sorted(set(wm.values()))
        files = [hf_dir / n for n in names]
        for f in files:
            if not f.is_file():
                raise ConvertError(f"{f}: missing file (listed in {index.name})")
        return files
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(p for p in hf_dir.glob("model-*-of-*.safetensors") if SHARD_RE.match(p.name))
    if shards:
        total = int(SHARD_RE.match(shards[0].name).group(2))
        if len(shards) != total:
            raise ConvertError(f"{hf_dir}: found {len(shards)} of {total} model-*-of-{total:05d}.safetensors shards")
        return shards
    raise ConvertError(f"{hf_dir}: missing file model.safetensors (or model.safetensors.index.json with shards)")


def load_checkpoint(hf_dir) -> Checkpoint:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir}: not a directory")
    cfg_path = hf_dir / "config.json"
    text, vision, image_token = parse_config(read_json(cfg_path), str(cfg_path))
    pp_path = hf_dir / "preprocessor_config.json"
    pre = parse_preprocessor(read_json(pp_path), vision, str(pp_path))
    if not (hf_dir / "tokenizer.json").is_file():
        raise ConvertError(f"{hf_dir / 'tokenizer.json'}: missing file")
    gen_path = hf_dir / "generation_config.json"
    gen = read_json(gen_path, required=False) or {}
    stop_ids = _ids(gen.get("eos_token_id"), "eos_token_id", str(gen_path)) or text.eos_ids
    for i in stop_ids:
        _hp(HP.check_token_id, i, text.vocab_size + 8, "eos_token_id", where=str(gen_path))
    _check_sampling(gen, str(gen_path))
    ck = Checkpoint(
        dir=hf_dir,
        text=text,
        vision=vision,
        image_token_id=image_token,
        preprocessor=pre,
        generation=gen,
        stop_ids=stop_ids,
    )
    try:
        for path in weight_files(hf_dir):
            f = SafetensorsFile(path)
            ck.files.append(f)
            for name, entry in f.tensors.items():
                key = normalise_name(name)
                if key in ck.tensors:
                    raise ConvertError(f"{path}: tensor {name} also appears in {ck.tensors[key].path.name}")
                ck.tensors[key] = entry
    except BaseException:
        ck.close()
        raise
    return ck
