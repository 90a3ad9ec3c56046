"""The token loop: prefill a batch of prompts, then decode one token per step.

Works on token ids only; the prefill (prefill.py) left-pads prompts of different lengths into one
batch, or encodes the sources of an encoder-decoder model. Every returned sequence is one batch row;
`num_return_sequences` copies of a prompt share its prefill. Finished rows leave the batch.
The logits chain (penalties, filters, the draw) is built once per call from the config.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from tokenloom.config import GenerationConfig
from tokenloom.engine.prefill import new_token_limit, start
from tokenloom.engine.scoring import top_pairs
from tokenloom.errors import InvalidParameterError
from tokenloom.outputs import TokenLogprob
from tokenloom.sampling.chain import LogitsChain, SamplingState
from tokenloom.sampling.sampler import make_generators, row_seed

MAX_LOOP_PERIOD = 64  # longest repeating block (in tokens) the loop detector looks for


@dataclass
class Sequence:
    index: int  # position in the output list
    prompt_index: int
    prompt_len: int
    max_new: int  # max_new_tokens, lowered where the context window ends first
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class TokenLoop:
    """Batched generation of token ids (greedy or sampling; beam search lives in beam.py).

    `step()` advances every live sequence by one token and returns ``[(index, token_id), ...]``;
    the caller may end a sequence early with `finish()` (e.g. on a stop string).
    """

    def __init__(self, model, prompts: list[list[int]], config: GenerationConfig, eos_ids: list[int],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", tokenizer=None,
                 vocab_size: int | None = None):
        if config.num_beams > 1 or config.penalty_alpha:
            raise InvalidParameterError("num_beams", config.num_beams, "1 in the token loop (beam search has its own)")
        self.model, self.config, self.device = model, config, device
        n = config.num_return_sequences
        self.seqs = [Sequence(i * n + j, i, len(p), new_token_limit(model, p, config.max_new_tokens))
                     for i, p in enumerate(prompts) for j in range(n)]
        model_eos = [] if config.ignore_eos else list(config.eos_token_id or eos_ids)
        self.stop_set = set(config.stop_token_ids) | set(model_eos)
        # min_new_tokens holds back stop token ids too, not only end-of-sequence (as vLLM's min_tokens)
        self.chain = LogitsChain(config, sorted(self.stop_set), vocab_size or _vocab_size(model), tokenizer)
        self.generators = None
        self.seed = config.seed
        if config.sampling:
            self.seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(6), "little")
            self.generators = make_generators([row_seed(self.seed, s.index % n) for s in self.seqs], device)
        self.rows = list(range(len(self.seqs)))  # batch row -> sequence index
        self.deadline = None if config.max_time is None else time.monotonic() + config.max_time
        self.generated = 0
        self._prefill(prompts, dtype)
        for s in self.seqs:
            if s.max_new <= 0:
                s.finish_reason = "length"
        self._drop_finished()

    # ------------------------------------------------------------------ internals

    def _prefill(self, prompts: list[list[int]], dtype) -> None:
        n = self.config.num_return_sequences
        longest_new = max((s.max_new for s in self.seqs), default=0)
        st = start(self.model, prompts, longest_new, dtype, self.device)
        self.cache, logits = st.cache, st.logits
        # token history for the logits chain: the decoder's tokens so far + generated, -1 where padded
        width = st.tokens.shape[1]
        self.history = torch.full((len(prompts), width + max(longest_new, 1)), -1, dtype=torch.long)
        self.history[:, :width] = st.tokens.cpu()
        self.history_len = width
        self.encoder_tokens = None if st.encoder_tokens is None else st.encoder_tokens.cpu()
        if st.encoder_tokens is not None:
            for s in self.seqs:
                s.prompt_len = 1  # the chain sees the decoder's tokens only
        if n > 1:  # copies of each prompt share one prefill
            rows = torch.arange(len(prompts), device=self.device).repeat_interleave(n)
            self.cache.select(rows)
            logits = logits.index_select(0, rows)
            self.history = self.history.repeat_interleave(n, dim=0)
            if self.encoder_tokens is not None:
                self.encoder_tokens = self.encoder_tokens.repeat_interleave(n, dim=0)
        self.logits = logits
        self.next_pos = st.next_positions.repeat_interleave(n)
        self.prompt_lens = torch.tensor([s.prompt_len for s in self.seqs], dtype=torch.long)
        self.max_news = torch.tensor([s.max_new for s in self.seqs], dtype=torch.long)

    def _state(self) -> SamplingState:
        return SamplingState(tokens=self.history[:, :self.history_len], prompt_lens=self.prompt_lens,
                             step=self.generated, max_new_tokens=self.max_news,
                             generators=None if self.generators is None else [self.generators[i] for i in self.rows],
                             encoder_tokens=self.encoder_tokens)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.chain.is_noop and self.config.logprobs is None:
            return self.chain.draw(logits, self._state())
        state = self._state()
        processed = self.chain.process(logits, state)
        tokens = self.chain.draw(processed, state)
        if self.config.logprobs is not None:
            self._record_logprobs(logits, processed, tokens)
        return tokens

    def _record_logprobs(self, raw: torch.Tensor, processed: torch.Tensor, tokens: torch.Tensor) -> None:
        n = self.config.logprobs
        raw_lp, proc_lp = raw.log_softmax(dim=-1), processed.log_softmax(dim=-1)
        chosen_raw = raw_lp.gather(-1, tokens[:, None])[:, 0].tolist()
        chosen_proc = proc_lp.gather(-1, tokens[:, None])[:, 0].tolist()
        raw_top, proc_top = top_pairs(raw_lp, n), top_pairs(proc_lp, n)
        for r, seq_index in enumerate(self.rows):
            self.seqs[seq_index].logprobs.append(TokenLogprob(int(tokens[r]), chosen_proc[r], proc_top[r],
                                                              chosen_raw[r], raw_top[r]))

    # ------------------------------------------------------------------ public

    @property
    def done(self) -> bool:
        return not self.rows

    def step(self) -> list[tuple[int, int]]:
        """Choose the next token of every live sequence, then run the model on them."""
        if self.done:
            return []
        tokens_t = self._choose(self.logits)
        tokens = tokens_t.tolist()
        self.generated += 1
        self.history[:, self.history_len] = tokens_t.cpu()
        self.history_len += 1
        out = []
        for seq_index, tok in zip(self.rows, tokens):
            seq = self.seqs[seq_index]
            seq.token_ids.append(tok)
            out.append((seq_index, tok))
            if tok in self.stop_set:
                seq.finish_reason = "stop"
            elif len(seq.token_ids) >= seq.max_new:
                seq.finish_reason = "length"
            elif self.config.stop_on_loop and repeats_at_end(seq.token_ids, self.config.stop_on_loop):
                seq.finish_reason = "loop"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            for seq_index in self.rows:
                self.seqs[seq_index].finish_reason = self.seqs[seq_index].finish_reason or "time"
        self._advance(tokens_t)
        return out

    def finish(self, seq_index: int, reason: str = "stop") -> None:
        """End a sequence now (the caller found a stop string); it leaves the batch. The reason
        wins over one set by this step (a stop string completed by the last allowed token)."""
        seq = self.seqs[seq_index]
        was_live = seq.finish_reason is None
        seq.finish_reason = reason
        if was_live:
            self._drop_finished()

    def _advance(self, tokens: torch.Tensor) -> None:
        keep = self._drop_finished()
        if self.done:
            return
        tokens = tokens if keep is None else tokens.index_select(0, keep.to(tokens.device))
        with torch.inference_mode():
            logits = self.model(tokens[:, None].to(self.device), self.next_pos[:, None], self.cache, last_only=True)
        self.logits = logits[:, -1].float()
        self.next_pos = self.next_pos + 1

    def _drop_finished(self) -> torch.Tensor | None:
        keep = [r for r, s in enumerate(self.rows) if self.seqs[s].finish_reason is None]
        if len(keep) == len(self.rows):
            return None
        self.rows = [self.rows[r] for r in keep]
        if not self.rows:
            return None
        keep_t = torch.tensor(keep, dtype=torch.long)
        self.cache.select(keep_t.to(self.device))
        self.next_pos = self.next_pos.index_select(0, keep_t.to(self.device))
        self.logits = self.logits.index_select(0, keep_t.to(self.device))
        self.history = self.history.index_select(0, keep_t)
        if self.encoder_tokens is not None:
            self.encoder_tokens = self.encoder_tokens.index_select(0, keep_t)
        self.prompt_lens = self.prompt_lens.index_select(0, keep_t)
        self.max_news = self.max_news.index_select(0, keep_t)
        self.chain.select_rows(keep_t)
        return keep_t


def _vocab_size(model) -> int:
    head = getattr(model, "lm_head", None)
    return head.out_features if head is not None else model.args.vocab_size


def repeats_at_end(ids: list[int], times: int) -> bool:
    """Whether `ids` ends with one block of 1..MAX_LOOP_PERIOD tokens repeated `times` times in a row."""
    n = len(ids)
    for period in range(1, min(MAX_LOOP_PERIOD, n // times) + 1):
        block = ids[n - period:]
        if all(ids[n - (k + 1) * period:n - k * period] == block for k in range(1, times)):
            return True
    return False
