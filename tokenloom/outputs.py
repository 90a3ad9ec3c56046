"""What generation returns: whole sequences (Generation) and streamed pieces (StreamDelta)."""

from __future__ import annotations

from dataclasses import dataclass, field

# finish reasons: "stop" (end-of-sequence id, stop token or stop string), "length" (max_new_tokens
# or the end of the context window), "time" (max_time), "loop" (stop_on_loop: stuck repeating)
FINISH_REASONS = ("stop", "length", "time", "loop")


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated ids only (an end-of-sequence id that ended it included)
    finish_reason: str | None
    index: int = 0  # position among all returned sequences
    prompt_index: int = 0  # which prompt it continues
    prompt_tokens: int = 0
    logprobs: list["TokenLogprob"] | None = None  # one per generated token, with `logprobs` set
    prompt_logprobs: list["TokenLogprob"] | None = None  # prompt tokens after the first, with `prompt_logprobs`
    score: float | None = None  # beam search: the sequence score, as transformers defines it


@dataclass
class StreamDelta:
    text: str  # new text, possibly "" (e.g. while a partial character or stop string is held back)
    token_ids: list[int] = field(default_factory=list)  # ids generated since the previous delta
    index: int = 0  # which returned sequence this belongs to
    prompt_index: int = 0
    finish_reason: str | None = None  # set on the last delta of a sequence
    logprobs: list["TokenLogprob"] | None = None  # for token_ids, with `logprobs` set
    score: float | None = None  # beam search: the sequence score


@dataclass
class TokenLogprob:
    """One token's log-probability and the top alternatives at its position.

    `logprob` / `top` come from the distribution the token was drawn from (after the logits
    chain: penalties, temperature, filters), `raw_logprob` / `raw_top` from the model's own
    distribution (log-softmax of its logits). For prompt tokens and `score()` they are equal.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first
    raw_logprob: float | None = None
    raw_top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Score:
    """Log-likelihood of a continuation given a prompt, token by token (`Model.score`)."""

    token_ids: list[int]  # the continuation's ids
    tokens: list[str]  # each id's text
    logprobs: list[float]  # log P(token | prompt, previous continuation tokens)
    total: float  # sum of logprobs
