"""Tokenizer -> GGUF metadata, in llama.cpp's layout (no torch, no transformers).

Reads a Hugging Face checkpoint's `tokenizer.json` (+ `tokenizer_config.json`, chat template
files) and writes the keys llama.cpp's convert_hf_to_gguf.py writes for a Llama 3 ("gpt2"
BPE, "llama-bpe" pre-tokenizer) vocabulary:

    tokenizer.ggml.model        "gpt2"
    tokenizer.ggml.pre          "llama-bpe"
    tokenizer.ggml.tokens       [n_vocab] str   (byte-level BPE strings; 128257 for mllama)
    tokenizer.ggml.token_type   [n_vocab] i32   1 normal, 3 control (special added), 4 user-defined
    tokenizer.ggml.merges       [n_merges] str  "left right", in priority order
    tokenizer.ggml.bos_token_id / eos_token_id / padding_token_id / eot_token_id / eom_token_id
    tokenizer.ggml.add_bos_token / add_eos_token   what HF's post-processor adds on encode
    tokenizer.chat_template     the jinja2 chat template

mllama_q/tokenizer.py rebuilds an identical `tokenizers.Tokenizer` from these keys.
"""

from __future__ import annotations

from pathlib import Path

import gguf

# Llama 3's pre-tokenizer split (tiktoken pat_str of llama_models/llama3/tokenizer.py; the same
# regex sits in every Llama 3.x tokenizer.json). llama.cpp calls this pre-tokenizer "llama-bpe".
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _load_json(path: Path) -> dict:
    from .hf import read_json  # one JSON reader for the checkpoint (size, nesting, type checked)

    return read_json(path)


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _split_patterns(pre) -> list[str]:
    """All Split regexes of a (possibly nested Sequence) pre-tokenizer."""
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre.get("pretokenizers", []) for p in _split_patterns(sub)]
    if pre.get("type") == "Split":
        pat = pre.get("pattern", {})
        return [pat.get("Regex") or pat.get("String") or ""]
    return []


def _template_adds(post, position: str) -> list[str]:
    """Special tokens a TemplateProcessing post-processor puts before ("first") or after
    ("last") a single sequence."""
    if not post:
        return []
    if post.get("type") == "Sequence":
        return [t for sub in post.get("processors", []) for t in _template_adds(sub, position)]
    if post.get("type") != "TemplateProcessing":
        return []
    single = post.get("single", [])
    seq_at = next((i for i, piece in enumerate(single) if "Sequence" in piece), len(single))
    pieces = single[:seq_at] if position == "first" else single[seq_at + 1 :]
    return [p["SpecialToken"]["id"] for p in pieces if "SpecialToken" in p]


def read_chat_template(hf_dir: Path) -> str | None:
    """The chat template text: chat_template.jinja, chat_template.json or tokenizer_config.json
    (first found; the published Llama 3.2 Vision checkpoints carry the same text in the latter two)."""
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cj = hf_dir / "chat_template.json"
    if cj.is_file():
        tmpl = _load_json(cj).get("chat_template")
        if isinstance(tmpl, str):
            return tmpl
    tc = hf_dir / "tokenizer_config.json"
    if tc.is_file():
        tmpl = _load_json(tc).get("chat_template")
        if isinstance(tmpl, str):
            return tmpl
        if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            return named.get("default") or next(iter(named.values()), None)
    return None


def _token_id(value, max_tokens: int | None, where: str) -> int:
    """A token id from tokenizer.json, checked BEFORE the token list is sized from the largest
    one (an id of 1e9 would make a billion-entry list)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: token id {value!r} is not a non-negative integer")
    if max_tokens is not None and value >= max_tokens:
        raise ValueError(f"{where}: token id {value} is outside the {max_tokens} rows of embed_tokens")
    return value


def add_tokenizer_metadata(writer: gguf.GGUFWriter, hf_dir: Path, max_tokens: int | None = None) -> None:
    """Write the tokenizer of the checkpoint in `hf_dir` into `writer` (llama.cpp keys).
    `max_tokens`: the embedding rows (vocab_size + 8); every token id must be below it."""
    hf_dir = Path(hf_dir)
    tj_path = hf_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise ValueError(f"{tj_path}: missing (a Hugging Face fast tokenizer file is required)")
    tj = _load_json(tj_path)
    config = _load_json(hf_dir / "tokenizer_config.json") if (hf_dir / "tokenizer_config.json").is_file() else {}

    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{tj_path}: expected a byte-level BPE model, got {model.get('type')!r}")
    patterns = _split_patterns(tj.get("pre_tokenizer"))
    if LLAMA3_PATTERN not in patterns:
        raise ValueError(f"{tj_path}: pre-tokenizer is not Llama 3's (llama-bpe) split regex; got {patterns!r}")

    # id -> token text. Base vocab first, then added tokens (special ones and <|image|>).
    id_to_tok: dict[int, str] = {_token_id(i, max_tokens, str(tj_path)): t for t, i in model["vocab"].items()}
    special_ids: set[int] = set()
    user_ids: set[int] = set()
    for added in tj.get("added_tokens", []):
        tid = _token_id(added["id"], max_tokens, str(tj_path))
        if not isinstance(added["content"], str):
            raise ValueError(f"{tj_path}: added token {tid} has no string content")
        id_to_tok[tid] = added["content"]
        (special_ids if added.get("special", False) else user_ids).add(tid)
    if not id_to_tok:
        raise ValueError(f"{tj_path}: the vocabulary is empty")
    n_vocab = max(id_to_tok) + 1
    tokens, types = [], []
    for i in range(n_vocab):
        if i in id_to_tok:
            tokens.append(id_to_tok[i])
            types.append(
                gguf.TokenType.CONTROL
                if i in special_ids
                else gguf.TokenType.USER_DEFINED
                if i in user_ids
                else gguf.TokenType.NORMAL
            )
        else:  # a hole in the id space (llama.cpp fills it the same way)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)

    # tokenizers >= 0.20 writes merges as [left, right] pairs, older files as "left right".
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # Every merge joins two tokens of the vocabulary into a third (what tokenizers' BPE checks
    # when it loads, so the runtime could not build a tokenizer from a file that breaks it).
    vocab = model["vocab"]
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab or parts[0] + parts[1] not in vocab:
            raise ValueError(f"{tj_path}: merge {m[:80]!r} does not join two vocabulary tokens into a third")

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)

    tok_to_id = {t: i for i, t in enumerate(tokens)}

    def special_id(name: str) -> int | None:
        text = _token_text(config.get(name))
        return tok_to_id.get(text) if text is not None else None

    bos = special_id("bos_token")
    eos = special_id("eos_token")
    pad = special_id("pad_token")
    if bos is None:
        bos = tok_to_id.get("<|begin_of_text|>")
    if eos is None:
        eos = tok_to_id.get("<|eot_id|>", tok_to_id.get("<|end_of_text|>"))
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if pad is not None:
        writer.add_pad_token_id(pad)
    if "<|eot_id|>" in tok_to_id:
        writer.add_eot_token_id(tok_to_id["<|eot_id|>"])
    if "<|eom_id|>" in tok_to_id:
        writer.add_eom_token_id(tok_to_id["<|eom_id|>"])

    # Whether encoding adds BOS/EOS: the post-processor of tokenizer.json decides in HF
    # (Llama 3 files: TemplateProcessing "<|begin_of_text|> $A"); tokenizer_config's
    # add_bos_token / add_eos_token override it when present.
    post = tj.get("post_processor")
    add_bos = bool(_template_adds(post, "first"))
    add_eos = bool(_template_adds(post, "last"))
    if isinstance(config.get("add_bos_token"), bool):
        add_bos = config["add_bos_token"]
    if isinstance(config.get("add_eos_token"), bool):
        add_eos = config["add_eos_token"]
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)

    template = read_chat_template(hf_dir)
    if template is not None:
        writer.add_chat_template(template)
