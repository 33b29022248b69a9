"""The Llama 3 tokenizer rebuilt from GGUF metadata with the `tokenizers` library (no transformers).

convert/tokenizer.py writes llama.cpp's keys (tokenizer.ggml.*); this module turns them back into
the same `tokenizers.Tokenizer` Hugging Face ships in tokenizer.json for Llama 3.x:

    pre-tokenizer  Split(Llama 3 regex, isolated) -> ByteLevel(no prefix space, no regex)
    model          BPE(vocab, merges, ignore_merges=True)   # tiktoken semantics: a pre-token that
                                                            # is itself in the vocab is one token
    added tokens   every CONTROL token as a special token, USER_DEFINED ones as plain added tokens
    decoder        ByteLevel

BOS is NOT added by the `tokenizers` object itself; `encode(text, add_special_tokens=True)`
prepends it when the GGUF says so (tokenizer.ggml.add_bos_token), which is what HF's Llama 3
post-processor does.
"""
from __future__ import annotations

import codecs
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp / gguf token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def gguf_field(reader, key: str):
    """Python value of a GGUF metadata field (str, int, float, bool or list), None if absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable char standing for each byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = {b: b for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + n
            n += 1
    return {chr(c): b for b, c in chars.items()}


class Tokenizer:
    """Encode / decode text for an mllama GGUF.

    Attributes: n_vocab, bos_id, eos_id, pad_id, eot_id, eom_id (ints or None), add_bos,
    chat_template (str or None), hf (the underlying tokenizers.Tokenizer).
    """

    def __init__(self, tokens: Sequence[str], token_types: Sequence[int] | None, merges: Sequence[str], *,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
                 eot_id: int | None = None, eom_id: int | None = None, add_bos: bool = True,
                 add_eos: bool = False, chat_template: str | None = None, pre: str = "llama-bpe"):
        if pre not in ("llama-bpe", "llama3", "default"):
            raise ValueError(f"unsupported pre-tokenizer {pre!r} (only Llama 3's 'llama-bpe')")
        n = len(tokens)
        if n == 0:
            raise ValueError("empty token list")
        types = list(token_types) if token_types is not None else [NORMAL] * n
        if len(types) != n:
            raise ValueError(f"{len(types)} token types for {n} tokens")
        self.tokens = list(tokens)
        self.types = types
        self.n_vocab = n
        for name, v in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), ("eot", eot_id), ("eom", eom_id)):
            if v is not None and not 0 <= v < n:
                raise ValueError(f"{name} token id {v} outside the vocabulary of {n}")
        self.bos_id, self.eos_id, self.pad_id, self.eot_id, self.eom_id = bos_id, eos_id, pad_id, eot_id, eom_id
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.chat_template = chat_template

        # All tokens go into the BPE vocabulary with their exact ids, so the added tokens
        # below reuse those ids (tokenizers looks an added token up in the model first).
        vocab = {t: i for i, t in enumerate(self.tokens)}
        if len(vocab) != n:
            raise ValueError("duplicate token strings in the vocabulary")
        pairs = []
        for m in merges:
            left, sep, right = m.partition(" ")
            if not sep:
                raise ValueError(f"malformed merge {m!r}")
            pairs.append((left, right))
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False, ignore_merges=True)
        tok = _HFTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(self.tokens[i], special=True, normalized=False)
                                for i in range(n) if types[i] == CONTROL])
        tok.add_tokens([AddedToken(self.tokens[i], special=False, normalized=False)
                        for i in range(n) if types[i] == USER_DEFINED])
        for i in range(n):
            if types[i] in (CONTROL, USER_DEFINED) and tok.token_to_id(self.tokens[i]) != i:
                raise ValueError(f"added token {self.tokens[i]!r} did not keep id {i}")
        self.hf = tok
        self._special = {i for i in range(n) if types[i] == CONTROL}
        self._byte_dec = _byte_decoder()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        """From a gguf.GGUFReader (llama.cpp's tokenizer.ggml.* keys)."""
        model = gguf_field(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"GGUF tokenizer model is {model!r}; expected 'gpt2' (byte-level BPE)")
        tokens = gguf_field(reader, "tokenizer.ggml.tokens")
        merges = gguf_field(reader, "tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ValueError("GGUF has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
        add_bos = gguf_field(reader, "tokenizer.ggml.add_bos_token")
        add_eos = gguf_field(reader, "tokenizer.ggml.add_eos_token")
        return cls(
            tokens, gguf_field(reader, "tokenizer.ggml.token_type"), merges,
            bos_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_id=gguf_field(reader, "tokenizer.ggml.eos_token_id"),
            pad_id=gguf_field(reader, "tokenizer.ggml.padding_token_id"),
            eot_id=gguf_field(reader, "tokenizer.ggml.eot_token_id"),
            eom_id=gguf_field(reader, "tokenizer.ggml.eom_token_id"),
            add_bos=True if add_bos is None else bool(add_bos),
            add_eos=False if add_eos is None else bool(add_eos),
            chat_template=gguf_field(reader, "tokenizer.chat_template"),
            pre=gguf_field(reader, "tokenizer.ggml.pre") or "llama-bpe",
        )

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        import gguf
        return cls.from_gguf(gguf.GGUFReader(str(path)))

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
