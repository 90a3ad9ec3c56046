"""Engine output (StreamDelta) -> OpenAI response bodies: whole responses, stream chunks, logprobs, usage.

Finish reasons: the engine's "stop" and "length" pass through. "time" (max_time ran out) becomes
"length" (the text was cut short, as by max_tokens) and "loop" (stop_on_loop) becomes "stop" (a
stop condition the caller set); the engine's own reason is kept in `finish_detail`, a field added
only to those choices. Logprobs are the model's own ("raw", before penalties and temperature), as
vLLM returns by default.
"""

from __future__ import annotations

import functools
import re
import time
import uuid

_OPENAI_FINISH = {"time": "length", "loop": "stop"}


def finish_fields(reason: str | None) -> dict:
    mapped = _OPENAI_FINISH.get(reason, reason)
    return {"finish_reason": mapped, **({"finish_detail": reason} if mapped != reason else {})}


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (bytes_to_unicode), inverted: token character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Each token's text and bytes, as OpenAI's logprobs show them. A token that is part of a
    UTF-8 character has no text of its own: it is shown as "bytes:\\xe6\\x98"."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=65536)(self._text)
        self.bytes = functools.lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, i: int) -> bytes:
        text = self.tokenizer.decode([i], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode()
        piece = self.tokenizer.id_to_token(i) or ""
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):  # SentencePiece byte fallback
            return bytes([int(m.group(1), 16)])
        dec = _byte_decoder()
        if piece and all(c in dec for c in piece):  # byte-level BPE
            return bytes(dec[c] for c in piece)
        return text.encode()

    def _text(self, i: int) -> str:
        b = self.bytes(i)
        try:
            return b.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def _value(lp) -> tuple[float, list[tuple[int, float]]]:
    if lp.raw_logprob is not None:
        return lp.raw_logprob, lp.raw_top
    return lp.logprob, lp.top


class ResponseBuilder:
    """One request's choices, fed delta by delta: stream chunks as they come, or the whole response."""

    def __init__(self, chat: bool, model: str, tokens: TokenText, n_choices: int, prompt_tokens: int):
        self.chat, self.model, self.tokens = chat, model, tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.texts = [""] * n_choices
        self.finish: list[str | None] = [None] * n_choices
        self.offsets = [0] * n_choices  # completions logprobs: text_offset of the next token
        self.logprobs: list = [None] * n_choices  # accumulated, for the whole response

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _chunk(self, choices: list[dict], include_usage: bool) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if include_usage:  # OpenAI: every chunk has "usage": null, the last one the totals
            out["usage"] = None
        return out

    def role_chunk(self, include_usage: bool) -> dict:
        """Chat streams open each choice with the assistant's role."""
        return self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in range(len(self.texts))], include_usage)

    def usage_chunk(self) -> dict:
        return {**self._chunk([], False), "usage": self.usage()}

    def add(self, delta) -> dict | None:
        """Take one delta; return its choice for a stream chunk (None when it carries nothing)."""
        i = delta.index
        self.completion_tokens += len(delta.token_ids)
        self.texts[i] += delta.text
        reason = delta.finish_reason
        if reason is not None:
            self.finish[i] = reason
        lps = self._logprobs(i, delta.logprobs) if delta.logprobs is not None else None
        if lps is not None:
            self._accumulate(i, lps)
        if not delta.text and reason is None and lps is None:
            return None
        if self.chat:
            return {"index": i, "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": None if lps is None else {"content": lps}, **finish_fields(reason)}
        return {"index": i, "text": delta.text, "logprobs": lps, **finish_fields(reason)}

    def chunk(self, choice: dict, include_usage: bool) -> dict:
        return self._chunk([choice], include_usage)

    def response(self) -> dict:
        choices = []
        for i, text in enumerate(self.texts):
            if self.chat:
                lps = None if self.logprobs[i] is None else {"content": self.logprobs[i]}
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lps,
                                **finish_fields(self.finish[i])})
            else:
                choices.append({"index": i, "text": text, "logprobs": self.logprobs[i],
                                **finish_fields(self.finish[i])})
        obj = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage()}

    # ------------------------------------------------------------------ logprobs

    def _logprobs(self, i: int, lps):
        tt = self.tokens
        if self.chat:
            out = []
            for lp in lps:
                value, top = _value(lp)
                out.append({"token": tt.text(lp.token_id), "logprob": value, "bytes": list(tt.bytes(lp.token_id)),
                            "top_logprobs": [{"token": tt.text(t), "logprob": v, "bytes": list(tt.bytes(t))}
                                             for t, v in top]})
            return out
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            value, top = _value(lp)
            text = tt.text(lp.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(value)
            alternatives = {tt.text(t): v for t, v in top}
            alternatives.setdefault(text, value)  # OpenAI: the chosen token is always among them
            out["top_logprobs"].append(alternatives)
            out["text_offset"].append(self.offsets[i])
            self.offsets[i] += len(tt.bytes(lp.token_id).decode(errors="ignore"))
        return out

    def _accumulate(self, i: int, lps) -> None:
        if self.logprobs[i] is None:
            self.logprobs[i] = [] if self.chat else {k: [] for k in lps}
        if self.chat:
            self.logprobs[i].extend(lps)
        else:
            for k, v in lps.items():
                self.logprobs[i][k].extend(v)
