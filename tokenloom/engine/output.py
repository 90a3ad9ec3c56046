"""From token ids to text: incremental detokenization plus stop strings, per sequence.

Text is released only when it is final: valid UTF-8 (the detokenizer holds back partial
characters) and not possibly the start of a stop string (held back until it cannot match).
"""

from __future__ import annotations


class StopMatcher:
    """Finds stop strings in streamed text without ever releasing a prefix of one."""

    def __init__(self, stops: list[str], include_stop: bool = False):
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to release, whether a stop string was found)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            self.pending = ""
            return buf[:i + len(s)] if self.include_stop else buf[:i], True
        hold = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """One sequence's text: feed token ids, get released text and whether a stop string hit."""

    def __init__(self, tokenizer, prompt_ids: list[int] | None, stops: list[str], skip_special_tokens: bool = True,
                 include_stop: bool = False):
        from tokenloom.tokenizer.detokenizer import StreamDetokenizer

        self.detok = StreamDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
        self.matcher = StopMatcher(stops, include_stop)
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        out, self.stopped = self.matcher.feed(self.detok.add(token_id))
        self.text += out
        return out

    def finish(self) -> str:
        """The sequence ended: release what was held back (unless a stop string ended it)."""
        if self.stopped:
            return ""
        out, self.stopped = self.matcher.feed(self.detok.flush())
        if not self.stopped:
            out += self.matcher.flush()
        self.text += out
        return out


class DeltaSink:
    """The text edge of one engine request: token ids in, StreamDelta out (to `emit`).

    Called by the engine as ``sink(j, token_ids, finish_reason, logprobs, score)`` for sequence j;
    returns True when a stop string ended the sequence, so the engine stops it."""

    def __init__(self, tokenizer, prompt_ids: list[int], config, emit, prompt_index: int = 0):
        self.n, self.prompt_index, self.emit = config.num_return_sequences, prompt_index, emit
        self.streams = [TextStream(tokenizer, prompt_ids, config.stop, include_stop=config.include_stop_str_in_output)
                        for _ in range(self.n)]

    def __call__(self, j: int, token_ids: list[int], finish_reason: str | None, logprobs=None, score=None) -> bool:
        from tokenloom.outputs import StreamDelta

        ts = self.streams[j]
        was_stopped = ts.stopped
        text = "".join(ts.add(t) for t in token_ids)
        if finish_reason is not None and not ts.stopped:
            text += ts.finish()
        stopped = ts.stopped and not was_stopped
        self.emit(StreamDelta(text, token_ids, self.prompt_index * self.n + j, self.prompt_index,
                              "stop" if stopped else finish_reason, logprobs, score))
        return stopped
