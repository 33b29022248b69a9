"""Tiny random Mllama checkpoints saved by transformers, for converter and runtime parity tests.

    from tiny_models import make_tiny_checkpoint, load_hf_model
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", seed=0)                 # default tiny model
    ckpt = make_tiny_checkpoint(tmp_path / "gqa4", seed=1, text_config={"num_key_value_heads": 1},
                                vision_config={"max_num_tiles": 2,
                                               "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]},
                                max_shard_size="300KB")
    model = load_hf_model(ckpt)                                             # float32 HF reference, eval mode

What the checkpoint copies from the real Llama-3.2-11B-Vision-Instruct (conventions that
matter to a converter or a runtime), scaled down:
  * hub tensor names (language_model.model..., vision_model..., multi_modal_projector...),
    written by `save_pretrained` as safetensors (optionally sharded with an index);
  * text: GQA (4 query / 2 KV heads by default), llama3 rope scaling (theta 500000, factor 8,
    low 1, high 4, original 8192), cross-attention layers interleaved with self-attention
    layers, an embedding table of vocab_size + 8 rows, separate lm_head;
  * vision: the 560-px tile logic at 56 px (14-px patches -> 4x4 patches + class token = 17
    positions, which HF pads to 24 like 1601 -> 1608), max_num_tiles 4 with the default 8
    aspect ratios (or custom ones with a matching max_num_tiles), local + gated global layers,
    intermediate-layer outputs concatenated into vision_output_dim;
  * a Llama-3-style byte-level BPE tokenizer (`tokenizer.json`) with Llama 3's special
    tokens in Llama 3's relative order after the BPE ranks, then `<|image|>` = vocab_size;
    bos/eos/pad ids, stop ids [end_of_text, eom, eot] like the real generation_config;
    a chat template in the Llama 3.2 Vision format; preprocessor_config.json with CLIP
    mean/std, bilinear resample and the tile size.
Unlike a fresh transformers model, every parameter transformers initialises to a constant is
randomised, so parity tests cannot pass vacuously: all tanh gates (text cross-attention,
vision global layers, positional and tile gates) get |g| uniform in [0.3, 1.2] with a random
sign; norm weights get 1 + U(-0.3, 0.3); biases and the embedding padding row get N(0, 0.05).

Every option is a keyword; `text_config` / `vision_config` dicts override the defaults key
by key (transformers' MllamaTextConfig / MllamaVisionConfig names). Test-only: imports torch.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

# Defaults: small but with every structural feature of the 11B model. Text rows of 256
# values make Q4_K / Q6_K (256-value super-blocks) apply to the text weights.
TEXT_DEFAULTS = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=5,
    num_attention_heads=4,  # head_dim 64
    num_key_value_heads=2,  # GQA 2:1 (11B: 4:1)
    cross_attention_layers=[1, 3],
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    tie_word_embeddings=False,
    hidden_act="silu",
    initializer_range=0.02,
)
VISION_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_global_layers=2,
    attention_heads=4,
    image_size=56,
    patch_size=14,
    num_channels=3,
    max_num_tiles=4,
    norm_eps=1e-5,
    intermediate_layers_indices=[1, 3],
    supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    hidden_act="gelu",
    initializer_range=0.02,
)

# Llama 3's special tokens in their order after the BPE ranks (128000 + i in the real model).
# Index 11 is Meta's <|image|> slot; HF's checkpoints keep it a reserved token and append
# <|image|> after the whole vocabulary instead.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|reserved_special_token_3|>",
    "<|reserved_special_token_4|>",
    "<|reserved_special_token_5|>",
    "<|reserved_special_token_6|>",
    "<|reserved_special_token_7|>",
]
BOS, EOS, PAD, EOM, EOT = 0, 1, 4, 8, 9  # indices into SPECIAL_TOKENS

# Llama 3's pre-tokenizer split pattern (tokenizer.json of the published checkpoints).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Llama 3.2 Vision chat format (llama_models/llama3_2/vision_prompt_format.md), compact.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for c in message['content'] %}"
    "{%- if c['type'] == 'image' %}{{- '<|image|>' }}{%- elif c['type'] == 'text' %}{{- c['text'] | trim }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.",
    "Describe this image in detail. What is shown in the photo? There is a dog on the grass.",
    "Le renard brun rapide saute par-dessus le chien paresseux. Ça coûte 12,50 €.",
    "Der schnelle braune Fuchs springt über den faulen Hund. Straße, Größe, Äpfel.",
    "El rápido zorro marrón salta sobre el perro perezoso. ¿Qué hay en la imagen?",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "素早い茶色の狐がのろまな犬を飛び越える。这是一张图片。",
    "def f(x):\n    return x * 2  # numbers 123 4567 89\n",
]


def _merge(base: dict, over: dict | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = copy.deepcopy(v)
    return out


def build_tiny_tokenizer(n_merges: int = 60):
    """A Llama-3-style byte-level BPE trained on a small multilingual corpus.

    Returns (tokenizers.Tokenizer, n_bpe): ids [0, n_bpe) are BPE ranks (256 bytes + merges),
    special tokens are NOT added yet (the caller appends them at n_bpe...).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + n_merges,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok, tok.get_vocab_size()


def _save_tokenizer(out_dir: Path, tokenizer_dir, chat_template_location: str):
    """Writes tokenizer files; returns (vocab_size, special-token id map)."""
    if tokenizer_dir is not None:  # a real Llama 3 HF tokenizer directory (e.g. tests/real_tokenizer.py)
        src = Path(tokenizer_dir)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copy(src / name, out_dir / name)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
        n_bpe = tok.token_to_id(SPECIAL_TOKENS[0])
        if n_bpe is None:
            raise ValueError(f"{src}: no {SPECIAL_TOKENS[0]} token")
        vocab_size = n_bpe + 256  # Llama 3: 256 special tokens after the ranks
        ids = {name: n_bpe + i for i, name in enumerate(SPECIAL_TOKENS)}
        image_id = tok.token_to_id("<|image|>")
        if image_id is None:
            tok.add_special_tokens(["<|image|>"])
            tok.save(str(out_dir / "tokenizer.json"))
            image_id = tok.token_to_id("<|image|>")
        if image_id != vocab_size:
            raise ValueError(f"{src}: <|image|> is {image_id}, expected {vocab_size}")
    else:
        from tokenizers import AddedToken, processors

        tok, n_bpe = build_tiny_tokenizer()
        vocab_size = n_bpe + len(SPECIAL_TOKENS)
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
        tok.add_special_tokens([AddedToken("<|image|>", special=True, normalized=False)])
        ids = {name: n_bpe + i for i, name in enumerate(SPECIAL_TOKENS)}
        bos = SPECIAL_TOKENS[BOS]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, ids[bos])]
        )
        assert tok.token_to_id("<|image|>") == vocab_size
        tok.save(str(out_dir / "tokenizer.json"))
        tc = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[BOS],
            "eos_token": SPECIAL_TOKENS[EOT],
            "pad_token": SPECIAL_TOKENS[PAD],
            "model_input_names": ["input_ids", "attention_mask"],
            "clean_up_tokenization_spaces": True,
            "model_max_length": 131072,
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
        (out_dir / "special_tokens_map.json").write_text(
            json.dumps(
                {"bos_token": SPECIAL_TOKENS[BOS], "eos_token": SPECIAL_TOKENS[EOT], "pad_token": SPECIAL_TOKENS[PAD]},
                indent=2,
            ),
            encoding="utf-8",
        )
    _place_chat_template(out_dir, chat_template_location)
    return vocab_size, ids


def _place_chat_template(out_dir: Path, where: str):
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    tc.pop("chat_template", None)
    if where in ("tokenizer_config", "published"):
        tc["chat_template"] = CHAT_TEMPLATE
    if where in ("chat_template.json", "published"):
        (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}), encoding="utf-8")
    elif where == "chat_template.jinja":
        (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    elif where not in ("none", "published", "tokenizer_config", "chat_template.json"):
        raise ValueError(f"chat_template_location {where!r}")
    tc_path.write_text(json.dumps(tc, indent=2), encoding="utf-8")


def randomise_constant_init(model, seed: int) -> None:
    """Give every parameter transformers initialises to a constant a random value (see module doc)."""
    import torch

    g = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate"):
                mag = torch.empty(p.shape).uniform_(0.3, 1.2, generator=g)
                sign = torch.where(torch.rand(p.shape, generator=g) < 0.5, -1.0, 1.0)
                p.copy_(mag * sign)
            elif leaf == "bias":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "norm" in name and leaf == "weight":  # RMSNorm / LayerNorm scales (incl. q_norm/k_norm)
                p.copy_(1.0 + torch.empty(p.shape).uniform_(-0.3, 0.3, generator=g))
            elif name.endswith("embed_tokens.weight"):  # padding_idx row is zero-initialised
                pad = model.config.text_config.pad_token_id
                if pad is not None and 0 <= pad < p.shape[0]:
                    p[pad].copy_(torch.randn(p.shape[1], generator=g) * 0.02)


def make_tiny_checkpoint(
    out_dir,
    *,
    seed: int = 0,
    text_config: dict | None = None,
    vision_config: dict | None = None,
    dtype: str = "bfloat16",
    max_shard_size=None,
    rope_spelling: str = "rope_parameters",
    chat_template_location: str = "published",
    tokenizer_dir=None,
    generation: dict | None = None,
    preprocessor: dict | None = None,
) -> Path:
    """Build, randomise and save a tiny MllamaForConditionalGeneration; returns out_dir.

    seed:           torch seed for the weights and the randomised gates/norms/biases.
    text_config / vision_config: per-key overrides of TEXT_DEFAULTS / VISION_DEFAULTS.
                    With custom `supported_aspect_ratios` give the matching `max_num_tiles`.
                    `vision_output_dim` is derived (hidden x (1 + len(intermediate_layers))).
    dtype:          "bfloat16" (like the published checkpoint), "float16" or "float32".
    max_shard_size: e.g. "200KB" to get model-0000N-of-0000M.safetensors + index.
    rope_spelling:  "rope_parameters" (transformers 5) or "rope_theta" (published checkpoints:
                    rope_theta + rope_scaling).
    chat_template_location: "published" (tokenizer_config.json AND chat_template.json, like the
                    hub checkpoint; what transformers' MllamaProcessor reads), "tokenizer_config",
                    "chat_template.json", "chat_template.jinja" or "none".
    tokenizer_dir:  copy a real Llama 3 HF tokenizer directory instead of the tiny BPE
                    (vocab_size becomes 128256, <|image|> 128256).
    generation / preprocessor: overrides merged into generation_config.json /
                    preprocessor_config.json.
    """
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size, sp = _save_tokenizer(out_dir, tokenizer_dir, chat_template_location)
    tc = _merge(TEXT_DEFAULTS, text_config)
    vc = _merge(VISION_DEFAULTS, vision_config)
    tc.setdefault("vocab_size", vocab_size)
    tc.setdefault("bos_token_id", sp[SPECIAL_TOKENS[BOS]])
    tc.setdefault("eos_token_id", [sp[SPECIAL_TOKENS[i]] for i in (EOS, EOM, EOT)])
    tc.setdefault("pad_token_id", sp[SPECIAL_TOKENS[PAD]])
    vc["vision_output_dim"] = vc["hidden_size"] * (1 + len(vc["intermediate_layers_indices"]))
    cfg = MllamaConfig(text_config=tc, vision_config=vc, image_token_index=tc["vocab_size"])

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(cfg).eval()
    randomise_constant_init(model, seed)
    model = model.to({"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype])
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kw)

    # config.json spelling of rope.
    cfg_path = out_dir / "config.json"
    cj = json.loads(cfg_path.read_text(encoding="utf-8"))
    if rope_spelling == "rope_theta":
        rp = cj["text_config"].pop("rope_parameters")
        cj["text_config"]["rope_theta"] = rp.pop("rope_theta")
        cj["text_config"]["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
    elif rope_spelling != "rope_parameters":
        raise ValueError(f"rope_spelling {rope_spelling!r}")
    cfg_path.write_text(json.dumps(cj, indent=2), encoding="utf-8")

    gen = {
        "bos_token_id": tc["bos_token_id"],
        "eos_token_id": tc["eos_token_id"],
        "pad_token_id": tc["pad_token_id"],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    gen.update(generation or {})
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    pre = {
        "image_processor_type": "MllamaImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": vc["image_size"], "width": vc["image_size"]},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_pad": True,
        "max_image_tiles": vc["max_num_tiles"],
    }
    pre.update(preprocessor or {})
    (out_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2), encoding="utf-8")
    return out_dir


def load_hf_model(ckpt_dir, dtype: str = "float32", intermediate: str = "layer_input"):
    """The saved checkpoint as a transformers model (reference for parity tests), eval mode.

    `intermediate` fixes which hidden state an entry i of the vision config's
    intermediate_layers_indices names:
      "layer_input" (default): the INPUT of local layer i, as Meta's reference
        (llama_models/llama3/multimodal/model.py, ImageTransformer.forward) and
        transformers after its fix in PR #39785 compute it: the convention the
        published weights were trained with, and what mllama-q implements.
      "installed": whatever the installed transformers does.
    transformers 5.x's MllamaVisionEncoder.forward collects each layer's OUTPUT
    again; the output of layer i - 1 is the input of layer i, so the reference
    selects indices i - 1 there (configs for parity tests avoid index 0).
    """
    import torch
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(ckpt_dir, dtype=getattr(torch, dtype)).eval()
    if intermediate == "layer_input" and _hf_collects_layer_outputs(model):
        vm = model.model.vision_model
        idx = list(vm.intermediate_layers_indices)
        if min(idx) < 1:
            raise ValueError(
                "intermediate_layers_indices must be >= 1 for a layer-input reference "
                f"on this transformers version, got {idx}"
            )
        vm.intermediate_layers_indices = [i - 1 for i in idx]
    elif intermediate not in ("layer_input", "installed"):
        raise ValueError(f"intermediate must be 'layer_input' or 'installed', got {intermediate!r}")
    return model


def _hf_collects_layer_outputs(model) -> bool:
    """True when the installed MllamaVisionEncoder returns one hidden state per
    layer (each layer's output) rather than the embeddings plus one per layer."""
    import torch

    enc = model.model.vision_model.transformer
    d = model.config.vision_config.hidden_size
    p = next(enc.parameters())
    with torch.no_grad():
        out = enc(torch.zeros(1, 8, d, dtype=p.dtype), attention_mask=None)
    return len(out.hidden_states) == len(enc.layers)


def read_hf_state(ckpt_dir) -> dict:
    """{hub tensor name: float32 numpy array} straight from the saved safetensors (bf16 widened)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[k] = v.to(torch.float32).numpy()
    return out


__all__ = [
    "make_tiny_checkpoint",
    "load_hf_model",
    "read_hf_state",
    "randomise_constant_init",
    "build_tiny_tokenizer",
    "TEXT_DEFAULTS",
    "VISION_DEFAULTS",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
]
