"""Materialise a Hugging Face-format Llama 3.2 Vision (Instruct) tokenizer directory (test helper).

No model hub is reachable, so this rebuilds what meta-llama/Llama-3.2-11B-Vision-Instruct ships
(tokenizer.json + tokenizer_config.json + chat_template.json) from the real BPE ranks in
llama-models' `llama_models/llama3/tokenizer.model` (tiktoken format, 128000 ranks):

- tokenizer.json: transformers' TikTokenConverter (merges derived from the ranks, Llama 3 split
  regex, ByteLevel, BPE with ignore_merges), the 256 Llama 3.1 special tokens at 128000..128255
  with Hugging Face's names (<|reserved_special_token_N|> fill the gaps; in Meta's own tiktoken
  layout 128011 is <|image|>, in the HF layout it stays reserved), then `<|image|>` as an extra
  special token 128256 (vocab 128257), and the post-processor the hub's Llama 3 files carry:
  ByteLevel + TemplateProcessing "<|begin_of_text|> $A".
- chat template: the Llama 3.2 Vision Instruct template. Its text was taken from public copies of
  the checkpoint's chat_template.json quoted in open-source repositories (the version with
  `user_supplied_system_message`, i.e. the hub's current one), indentation normalised; see
  llama_models/llama3_2/vision_prompt_format.md for the format it produces.

Used by tests only (imports transformers).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def special_tokens() -> list[str]:
    """Hugging Face's names for ids 128000..128255 (Llama 3.1 / 3.2 tokenizer.json)."""
    named = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        4: "<|finetune_right_pad_id|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|eom_id|>",
        9: "<|eot_id|>",
        10: "<|python_tag|>",
    }
    out, r = [], 0
    for i in range(256):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{r}|>")
            r += 1
    return out


# The same text is bundled with the package as the fallback for GGUFs without a template.
CHAT_TEMPLATE = (
    Path(__file__).resolve().parents[1] / "mllama_q" / "assets" / "llama3_2_vision_chat_template.jinja"
).read_text(encoding="utf-8")


def tiktoken_model_path() -> Path:
    import llama_models

    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def load_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken's format: one "base64(token bytes) rank" per line (no tiktoken needed)."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            b64, rank = line.split()
            ranks[base64.b64decode(b64)] = int(rank)
    return ranks


def write_llama32_vision_tokenizer(out_dir: Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json, chat_template.json and
    special_tokens_map.json into out_dir (created) and return it."""
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = special_tokens() + ["<|image|>"]

    class _Converter(TikTokenConverter):  # read the ranks ourselves instead of via tiktoken
        @staticmethod
        def load_tiktoken_bpe(path):
            return load_ranks(path)

    tok = _Converter(vocab_file=str(tiktoken_model_path()), pattern=LLAMA3_PATTERN).converted()
    assert tok.get_vocab_size() == 128000
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert tok.token_to_id("<|begin_of_text|>") == 128000 and tok.token_to_id("<|image|>") == 128256
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", 128000)],
            ),
        ]
    )
    tok.save(str(out_dir / "tokenizer.json"))

    config = {
        "added_tokens_decoder": {
            str(128000 + i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(specials)
        },
        "bos_token": "<|begin_of_text|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "pad_token": "<|finetune_right_pad_id|>",
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}
        )
    )
    return out_dir


def cached_llama32_vision_tokenizer() -> Path:
    """The directory above, built once per machine under the temp dir and reused (building it
    derives 280k merges from the ranks: seconds). Keyed by the inputs, written atomically."""
    import hashlib
    import os
    import shutil
    import tempfile

    model = tiktoken_model_path()
    key = hashlib.sha1(model.read_bytes() + CHAT_TEMPLATE.encode() + Path(__file__).read_bytes()).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / f"mllama_q_test_tokenizer_{key}"
    if (root / "tokenizer_config.json").is_file():
        return root
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp", dir=root.parent))
    write_llama32_vision_tokenizer(tmp)
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return root


if __name__ == "__main__":
    import sys

    print(write_llama32_vision_tokenizer(Path(sys.argv[1] if len(sys.argv) > 1 else "llama32v-tokenizer")))


def write_tokenizer_gguf(hf_dir, path) -> Path:
    """A GGUF holding only the tokenizer metadata that our converter writes for
    `hf_dir` (convert.tokenizer.add_tokenizer_metadata); returns `path`."""
    import gguf

    from mllama_q.convert.tokenizer import add_tokenizer_metadata

    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch="mllama")
    add_tokenizer_metadata(w, hf_dir)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
