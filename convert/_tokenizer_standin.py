"""Stand-in tokenizer metadata writer, used only while convert/tokenizer.py (the frontend
work) is absent. Writes llama.cpp's keys from tokenizer.json: gpt2 model, llama-bpe
pre-tokenizer, tokens (ids 0..max), token types, merges, special ids, chat template.
"""
from __future__ import annotations

import json
from pathlib import Path

from mllama_q import gguf_keys as K

from .errors import ConvertError
from .hf import find_chat_template

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # llama.cpp token types


def add_tokenizer_metadata(writer, hf_dir) -> None:
    hf_dir = Path(hf_dir)
    path = hf_dir / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj["model"]
        vocab = model["vocab"]
        merges = model.get("merges", [])
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing file") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{path}: not a BPE tokenizer.json ({e})") from None
    if model.get("type") != "BPE":
        raise ConvertError(f"{path}: model type {model.get('type')!r} is not BPE")
    ids = {int(i): (tok, NORMAL) for tok, i in vocab.items()}
    for a in tj.get("added_tokens", []):
        ids[int(a["id"])] = (a["content"], CONTROL if a.get("special") else USER_DEFINED)
    n = max(ids) + 1
    tokens = [ids.get(i, (f"[PAD{i}]", USER_DEFINED)) for i in range(n)]
    writer.add_string(K.TOKENIZER_MODEL, "gpt2")
    writer.add_string(K.TOKENIZER_PRE, "llama-bpe")
    writer.add_array(K.TOKENIZER_TOKENS, [t for t, _ in tokens])
    writer.add_array(K.TOKENIZER_TOKEN_TYPE, [k for _, k in tokens])
    writer.add_array(K.TOKENIZER_MERGES, [m if isinstance(m, str) else " ".join(m) for m in merges])
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    tc = cfg.get("text_config", {})
    for key, val in ((K.TOKENIZER_BOS_ID, tc.get("bos_token_id")),
                     (K.TOKENIZER_EOS_ID, tc.get("eos_token_id")), (K.TOKENIZER_PAD_ID, tc.get("pad_token_id"))):
        if isinstance(val, list):
            val = val[0] if val else None
        if isinstance(val, int):
            writer.add_uint32(key, val)
    tmpl = find_chat_template(hf_dir)
    if tmpl:
        writer.add_string(K.TOKENIZER_CHAT_TEMPLATE, tmpl)
