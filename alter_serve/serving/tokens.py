"""Tokens as text. A byte-level BPE token can end inside a multi-byte character, so a token decoded
alone is not its text. `TokenStrings` works from each token's exact bytes:
- a token's string (chat `token`, completions `top_logprobs` keys) is its bytes as UTF-8, or
  `bytes:\\xe2\\x80` when they are not whole characters (OpenAI's notation); chat `bytes` are exact;
- completions `tokens` are the text each token adds to the decoded sequence: `''.join(tokens)` is
  the text, and `text_offset` indexes into it (a token ending inside a character adds '', the next
  one adds the character).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def utf8_decoder():
    """Incremental: holds back the bytes of a character a token begins and a later token ends."""
    return codecs.getincrementaldecoder("utf-8")("replace")


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the char a byte-level BPE vocabulary writes per byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenStrings:
    """Exact bytes, display strings and decoded pieces of single tokens (see the module docstring).

    Bytes are exact for byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM) and for SentencePiece
    byte-fallback tokens (`<0xE2>`); other tokens are taken as they decode alone."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._byte_decoder = _gpt2_byte_decoder() if self._byte_level else {}
        # Whether a text's byte count bounds its token count (see min_token_count): fixed per tokenizer.
        self._count_bounded = self._byte_level and tokenizer.backend_tokenizer.normalizer is None
        self._added = {tid: tok.content for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._bytes: dict[int, bytes] = {}
        self._max_bytes: int | None = None

    def bytes(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._exact_bytes(token_id)
        return cached

    def _exact_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:  # added tokens are stored as their text, never byte-encoded
            return self._added[token_id].encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        if match := _BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        if "\u2581" in piece:  # SentencePiece's word-start marker is a space
            return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token_id]).encode()

    def display(self, token_id: int) -> str:
        """The token as one string: its text, or `bytes:\\xNN…` when that is not whole characters."""
        raw = self.bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def pieces(self, ids: Iterable[int], decoder=None) -> list[str]:
        """The text each token adds to the decoded sequence. `decoder` carries a character begun in
        an earlier call (a stream's previous chunk); a fresh one starts a sequence."""
        decoder = decoder or utf8_decoder()
        return [decoder.decode(self.bytes(t)) for t in ids]

    def min_token_count(self, n_bytes: int) -> int:
        """A lower bound on the number of tokens a text of `n_bytes` UTF-8 bytes encodes to (0: none
        known). Exact-bytes vocabularies without a normalizer only: there no token covers more bytes
        than the longest one does (special tokens and a prefix space only add tokens)."""
        if not self._count_bounded:
            return 0
        if self._max_bytes is None:
            self._max_bytes = max(len(self._exact_bytes(t)) for t in range(len(self.tokenizer))) or 1  # once
        return n_bytes // self._max_bytes


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and type(decoder).__name__ == "ByteLevel"
