"""The Llama 3 tokenizer rebuilt from GGUF metadata with the `tokenizers` library (no transformers).

convert/tokenizer.py writes llama.cpp's keys (tokenizer.ggml.*); this module turns them back into
the same `tokenizers.Tokenizer` Hugging Face ships in tokenizer.json for Llama 3.x:

    pre-tokenizer  Split(Llama 3 regex, isolated) -> ByteLevel(no prefix space, no regex)
    model          BPE(vocab, merges, ignore_merges=True)   # tiktoken semantics: a pre-token that
                                                            # is itself in the vocab is one token
    added tokens   every CONTROL token as a special token, USER_DEFINED ones as plain added tokens
    decoder        ByteLevel

It is built from one tokenizer.json text (Tokenizer.from_str): the 128k-token vocabulary and the
280k merges are serialised to JSON by the compiled core straight from the mapped file, so
loading costs no Python object per token (about 0.4 s, all of it inside `tokenizers`).

BOS is NOT added by the `tokenizers` object itself; `encode(text, add_special_tokens=True)`
prepends it when the GGUF says so (tokenizer.ggml.add_bos_token), which is what HF's Llama 3
post-processor does.
"""

from __future__ import annotations

import codecs
import json
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from . import gguf_keys as K
from .gguf_file import ModelFileError, field_value, get_bool, get_int, get_str, get_string_array, open_gguf

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp / gguf token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PRE_TOKENIZERS = ("llama-bpe", "llama3", "default")


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable char standing for each byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: b for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + n
            n += 1
    return {chr(c): b for b, c in chars.items()}


def _vocab_json(tokens: Sequence[str]) -> str:
    """'{"token": id, ...}' for the BPE model. A GGUF string array serialises itself in the
    compiled core (one pass, no Python object per token); a Python list goes through json."""
    if hasattr(tokens, "json_vocab"):
        return tokens.json_vocab()
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate token strings in the vocabulary")
    return json.dumps(vocab, ensure_ascii=False)


def _merges_json(merges: Sequence[str]) -> str:
    """'[["left", "right"], ...]': each "left right" merge split at its first space."""
    if hasattr(merges, "json_merges"):
        return merges.json_merges()
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ValueError(f"malformed merge {m!r}")
        pairs.append([left, right])
    return json.dumps(pairs, ensure_ascii=False)


def _tokenizer_json(tokens, types: np.ndarray, merges, added: np.ndarray) -> str:
    """The tokenizer.json text of the tokenizer described in the module docstring.

    The small parts (pre-tokenizer, decoder, the BPE model's options) are serialised by the
    installed `tokenizers` itself from an empty shell, so they are spelled as this version
    expects; vocab and merges (the big parts) are spliced in as ready-made JSON."""
    shell = _HFTokenizer(models.BPE(vocab={}, merges=[], fuse_unk=False, byte_fallback=False, ignore_merges=True))
    shell.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    shell.decoder = decoders.ByteLevel()
    doc = json.loads(shell.to_str())
    # Every token keeps its id in the BPE vocabulary; CONTROL tokens are special added tokens,
    # USER_DEFINED ones plain added tokens (tokenizers matches added tokens before the model).
    doc["added_tokens"] = [
        {
            "id": int(i),
            "content": tokens[int(i)],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": bool(types[i] == CONTROL),
        }
        for i in added
    ]
    model = doc.pop("model")
    model.pop("vocab", None)
    model.pop("merges", None)
    return (
        json.dumps(doc, ensure_ascii=False)[:-1]
        + ',"model":'
        + json.dumps(model)[:-1]
        + ',"vocab":'
        + _vocab_json(tokens)
        + ',"merges":'
        + _merges_json(merges)
        + "}}"
    )


class Tokenizer:
    """Encode / decode text for an mllama GGUF.

    Attributes: n_vocab, bos_id, eos_id, pad_id, eot_id, eom_id (ints or None), add_bos,
    chat_template (str or None), tokens (sequence of the token strings: for a GGUF, the file's
    lazily decoded string array), types (int array [n_vocab]), hf (the tokenizers.Tokenizer).
    """

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int] | None,
        merges: Sequence[str],
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        eot_id: int | None = None,
        eom_id: int | None = None,
        add_bos: bool = True,
        add_eos: bool = False,
        chat_template: str | None = None,
        pre: str = "llama-bpe",
    ):
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unsupported pre-tokenizer {pre!r} (only Llama 3's 'llama-bpe')")
        n = len(tokens)
        if n == 0:
            raise ValueError("empty token list")
        types = np.full(n, NORMAL, np.int64) if token_types is None else np.asarray(token_types)
        if types.ndim != 1 or not (types.size == 0 or np.issubdtype(types.dtype, np.integer)):
            raise ValueError(f"token types must be a list of integers, got {types.dtype} {types.shape}")
        if len(types) != n:
            raise ValueError(f"{len(types)} token types for {n} tokens")
        self.tokens = tokens
        self.types = types
        self.n_vocab = n
        for name, v in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), ("eot", eot_id), ("eom", eom_id)):
            if v is not None and not 0 <= v < n:
                raise ValueError(f"{name} token id {v} outside the vocabulary of {n}")
        self.bos_id, self.eos_id, self.pad_id, self.eot_id, self.eom_id = bos_id, eos_id, pad_id, eot_id, eom_id
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.chat_template = chat_template

        added = np.flatnonzero((types == CONTROL) | (types == USER_DEFINED))  # 257 for Llama 3
        tok = _HFTokenizer.from_str(_tokenizer_json(tokens, types, merges, added))
        for i in added.tolist():
            if tok.token_to_id(tokens[i]) != i:
                raise ValueError(f"added token {tokens[i]!r} did not keep id {i}")
        self.hf = tok
        self._special = set(np.flatnonzero(types == CONTROL).tolist())
        self._byte_dec = _byte_decoder()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf(cls, f) -> "Tokenizer":
        """From a GGUFFile (mllama_q.gguf_file.open_gguf; llama.cpp's tokenizer.ggml.* keys).
        Anything missing, of the wrong type or out of range is a ModelFileError naming the key."""
        model = get_str(f, K.TOKENIZER_MODEL, "")
        if model != "gpt2":
            raise ModelFileError(f"{f.path}: GGUF tokenizer model is {model!r}; expected 'gpt2' (byte-level BPE)")
        tokens = get_string_array(f, K.TOKENIZER_TOKENS)
        merges = get_string_array(f, K.TOKENIZER_MERGES)
        if tokens is None or merges is None:
            raise ModelFileError(f"{f.path}: GGUF has no {K.TOKENIZER_TOKENS} / {K.TOKENIZER_MERGES}")
        n = len(tokens)
        if n == 0:
            raise ModelFileError(f"{f.path}: {K.TOKENIZER_TOKENS} is empty")
        types = field_value(f, K.TOKENIZER_TOKEN_TYPE)
        if types is not None and not (
            isinstance(types, np.ndarray) and np.issubdtype(types.dtype, np.integer) and types.dtype != np.bool_
        ):
            raise ModelFileError(
                f"{f.path}: {K.TOKENIZER_TOKEN_TYPE} must be an array of integers, "
                f"not {f.metadata_type(K.TOKENIZER_TOKEN_TYPE)}"
            )
        if types is not None and len(types) != n:
            raise ModelFileError(f"{f.path}: {K.TOKENIZER_TOKEN_TYPE} has {len(types)} entries for {n} tokens")
        ids = {}
        for name, key in (
            ("bos", K.TOKENIZER_BOS_ID),
            ("eos", K.TOKENIZER_EOS_ID),
            ("pad", K.TOKENIZER_PAD_ID),
            ("eot", K.TOKENIZER_EOT_ID),
            ("eom", K.TOKENIZER_EOM_ID),
        ):
            v = None if key not in f.metadata else get_int(f, key)
            if v is not None and not 0 <= v < n:
                raise ModelFileError(f"{f.path}: {key} = {v} is outside the {n} tokens of {K.TOKENIZER_TOKENS}")
            ids[name + "_id"] = v
        pre = get_str(f, K.TOKENIZER_PRE, "llama-bpe")
        if pre not in PRE_TOKENIZERS:
            raise ModelFileError(
                f"{f.path}: unsupported pre-tokenizer {K.TOKENIZER_PRE} = {pre!r} (only Llama 3's 'llama-bpe')"
            )
        template = None if K.TOKENIZER_CHAT_TEMPLATE not in f.metadata else get_str(f, K.TOKENIZER_CHAT_TEMPLATE)
        try:
            return cls(
                tokens,
                types,
                merges,
                **ids,
                add_bos=get_bool(f, K.TOKENIZER_ADD_BOS, True),
                add_eos=get_bool(f, K.TOKENIZER_ADD_EOS, False),
                chat_template=template,
                pre=pre,
            )
        except ModelFileError:
            raise
        except Exception as e:  # tokenizers rejects what it was given (its own exception type)
            raise ModelFileError(f"{f.path}: bad tokenizer metadata ({type(e).__name__}: {e})") from e

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        return cls.from_gguf(open_gguf(path))

    # ------------------------------------------------------------------ properties
    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.tokens[self.bos_id]

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.tokens[self.eos_id]

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < self.n_vocab:
            raise ValueError(f"token id {i} outside the vocabulary of {self.n_vocab}")
        return self.tokens[i]

    def is_special(self, i: int) -> bool:
        return i in self._special

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. "<|image|>") are
        recognised. With add_special_tokens, BOS/EOS are added as the checkpoint's HF tokenizer
        does (tokenizer.ggml.add_bos_token / add_eos_token)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.add_eos and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.n_vocab:
                raise ValueError(f"token id {i} outside the vocabulary of {self.n_vocab}")
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes a token stands for (special tokens: their UTF-8 text)."""
        tok = self.tokens[i]
        if self.types[i] in (CONTROL, USER_DEFINED):
            return tok.encode("utf-8")
        try:
            return bytes(self._byte_dec[c] for c in tok)
        except KeyError:  # not a byte-level string (should not happen in a gpt2 vocab)
            return tok.encode("utf-8")

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenisation: feed token ids one at a time, get back text that is always
    valid UTF-8 (a character split across tokens comes out once its last byte arrived).
    Invalid byte sequences become U+FFFD, as in HF's ByteLevel decoder."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.skip and self.tok.is_special(token_id):
            return ""
        return self._dec.decode(self.tok.token_bytes(token_id), final=False)

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
