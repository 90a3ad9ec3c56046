"""Streaming detokenization: token ids in, text out as soon as it is final.

Decoding one token at a time is wrong in two ways: a character can span several tokens
(byte-level BPE pieces, SentencePiece `<0xAB>` byte tokens), and a token's text can depend on
its neighbours (SentencePiece drops the leading space of the first token only). So, as vLLM
and mlx-lm do, we decode a short window of recent tokens twice, without and with the new
tokens, and emit the difference:

    window:  [ context ids (already emitted) | ids not emitted yet ]
    emit:    decode(window) minus decode(context)
    then:    the ids just emitted become the context

Each step decodes a few tokens, so it costs O(1) in the sequence length. Text is held back
while it ends in U+FFFD (an unfinished UTF-8 sequence) or while the last token is a byte-fallback
token: the Rust ByteFallback decoder turns a whole run of byte tokens into U+FFFD's if any byte
of the run is invalid, so a run is final only when a non-byte token follows it.

Invariant (tested): "".join(add(i) for i in ids) + flush() == tokenizer.decode(ids).
"""

from __future__ import annotations

from tokenloom.tokenizer.tokenizer import Tokenizer

# Prompt tokens kept as left context for the first generated token, as vLLM does: enough for
# SentencePiece's space handling and for a character cut across tokens.
_PROMPT_CONTEXT = 5


class StreamDetokenizer:
    """Turns generated ids into text increments; `text` is everything emitted so far."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        # The window: context ids (already emitted) followed by ids not emitted yet.
        self._ids = list(prompt_ids or [])[-_PROMPT_CONTEXT:]
        self._read_offset = len(self._ids)
        self._context_text = self._decode()
        self._in_byte_run = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Take one generated id; return the text it completes (often "", never a partial char)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if token_id in self.tokenizer.byte_fallback_ids:
            self._in_byte_run = True
        elif not (self.skip_special_tokens and token_id in self.tokenizer.special_ids):
            self._in_byte_run = False
        # else: a skipped special token is removed before decoding, so the byte tokens on its
        # two sides join into one run
        if self._in_byte_run:
            return ""
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (at the end of generation)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        new_text = self._decode()
        if not final and (new_text.endswith("\ufffd") or len(new_text) <= len(self._context_text)):
            return ""
        # The context decodes the same with or without what follows it, so its text is a prefix
        # of the new text; it is not when a prompt ends inside a character that generation ends.
        delta = new_text[_common_prefix_len(self._context_text, new_text):]
        # Slide: the ids just emitted become the context, older ones are dropped.
        del self._ids[:self._read_offset]
        self._read_offset = len(self._ids)
        self._context_text = self._decode()
        self._in_byte_run = False
        self.text += delta
        return delta


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
