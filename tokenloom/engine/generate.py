"""The token loop: prefill a batch of prompts, then decode one token per step.

Works on token ids only. Prompts of different lengths are left-padded into one batch (padding
slots get position -1, which the models mask out). Every returned sequence is one batch row;
`num_return_sequences` copies of a prompt share its prefill. Finished rows leave the batch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from tokenloom.config import GenerationConfig
from tokenloom.errors import InvalidParameterError
from tokenloom.sampling import processors as P
from tokenloom.sampling.sampler import greedy, make_generators, process, row_seed, sample

PREFILL_CHUNK = 512  # long prompts are prefilled in pieces: bounded attention-matrix memory

# parameters of the schema that this loop does not implement yet: refused, never ignored
_UNSUPPORTED = ("num_beams", "num_beam_groups", "diversity_penalty", "penalty_alpha", "min_p", "typical_p",
                "epsilon_cutoff", "eta_cutoff", "top_n_sigma", "xtc_probability", "dry_multiplier", "mirostat",
                "repetition_penalty", "presence_penalty", "frequency_penalty", "no_repeat_ngram_size",
                "bad_words_ids", "logit_bias", "suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
                "exponential_decay_length_penalty", "logprobs", "prompt_logprobs")


def check_supported(config: GenerationConfig) -> None:
    default = GenerationConfig()
    for name in _UNSUPPORTED:
        if getattr(config, name) != getattr(default, name):
            raise InvalidParameterError(name, getattr(config, name), f"{getattr(default, name)!r} (not supported yet)")


@dataclass
class Sequence:
    index: int  # position in the output list
    prompt_index: int
    prompt_len: int
    max_new: int  # max_new_tokens, lowered where the context window ends first
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class TokenLoop:
    """Batched generation of token ids.

    `step()` advances every live sequence by one token and returns ``[(index, token_id), ...]``;
    the caller may end a sequence early with `finish()` (e.g. on a stop string).
    """

    def __init__(self, model, prompts: list[list[int]], config: GenerationConfig, eos_ids: list[int],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        check_supported(config)
        self.model, self.config, self.device = model, config, device
        n = config.num_return_sequences
        limit = model.max_positions
        self.seqs = [Sequence(i * n + j, i, len(p), min(config.max_new_tokens, limit - len(p)))
                     for i, p in enumerate(prompts) for j in range(n)]
        stop_ids = set(config.stop_token_ids) | (set() if config.ignore_eos else set(config.eos_token_id or eos_ids))
        self.stop_set = stop_ids
        self.eos_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.generators = None
        if config.sampling:
            seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(6), "little")
            self.seed = seed
            self.generators = make_generators([row_seed(seed, s.index % n) for s in self.seqs], device)
        self.rows = list(range(len(self.seqs)))  # batch row -> sequence index
        self.deadline = None if config.max_time is None else time.monotonic() + config.max_time
        self._prefill(prompts, dtype)
        for s in self.seqs:
            if s.max_new <= 0:
                s.finish_reason = "length"
        self._drop_finished()

    # ------------------------------------------------------------------ internals

    def _prefill(self, prompts: list[list[int]], dtype) -> None:
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        longest_new = max((s.max_new for s in self.seqs), default=0)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        pos = torch.full((len(prompts), width), -1, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            pos[i, width - len(p):] = torch.arange(len(p))
        ids, pos = ids.to(self.device), pos.to(self.device)
        self.cache = self.model.make_cache(len(prompts), width + max(longest_new, 1), dtype, self.device)
        with torch.inference_mode():
            for start in range(0, width, PREFILL_CHUNK):
                logits = self.model(ids[:, start:start + PREFILL_CHUNK], pos[:, start:start + PREFILL_CHUNK],
                                    self.cache, last_only=True)
        n = self.config.num_return_sequences
        if n > 1:  # copies of each prompt share one prefill
            rows = torch.arange(len(prompts), device=self.device).repeat_interleave(n)
            self.cache.select(rows)
            logits = logits.index_select(0, rows)
        self.logits = logits[:, -1].float()
        self.next_pos = pos[:, -1].repeat_interleave(n) + 1
        self.generated = 0

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.generated < self.config.min_new_tokens and len(self.eos_ids):
            logits = P.suppress(logits, self.eos_ids)
        if self.generators is None:
            return greedy(logits)
        gens = [self.generators[i] for i in self.rows]
        return sample(process(logits, self.config), gens)

    # ------------------------------------------------------------------ public

    @property
    def done(self) -> bool:
        return not self.rows

    def step(self) -> list[tuple[int, int]]:
        """Choose the next token of every live sequence, then run the model on them."""
        if self.done:
            return []
        tokens = self._choose(self.logits).tolist()
        self.generated += 1
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
        self._advance(tokens)
        return out

    def finish(self, seq_index: int, reason: str = "stop") -> None:
        """End a sequence now (the caller found a stop string); it leaves the batch."""
        seq = self.seqs[seq_index]
        if seq.finish_reason is None:
            seq.finish_reason = reason
            self._drop_finished()

    def _advance(self, tokens: list[int]) -> None:
        tokens_t = torch.tensor(tokens, dtype=torch.long, device=self.device)
        keep = self._drop_finished(tokens_t)
        if self.done:
            return
        tokens_t = tokens_t if keep is None else tokens_t.index_select(0, keep)
        with torch.inference_mode():
            logits = self.model(tokens_t[:, None], self.next_pos[:, None], self.cache, last_only=True)
        self.logits = logits[:, -1].float()
        self.next_pos = self.next_pos + 1

    def _drop_finished(self, tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        keep = [r for r, s in enumerate(self.rows) if self.seqs[s].finish_reason is None]
        if len(keep) == len(self.rows):
            return None
        self.rows = [self.rows[r] for r in keep]
        if not self.rows:
            return None
        keep_t = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.select(keep_t)
        self.next_pos = self.next_pos.index_select(0, keep_t)
        self.logits = self.logits.index_select(0, keep_t)
        return keep_t


MAX_LOOP_PERIOD = 64  # longest repeating block (in tokens) the loop detector looks for


def repeats_at_end(ids: list[int], times: int) -> bool:
    """Whether `ids` ends with one block of 1..MAX_LOOP_PERIOD tokens repeated `times` times in a row."""
    n = len(ids)
    for period in range(1, min(MAX_LOOP_PERIOD, n // times) + 1):
        block = ids[n - period:]
        if all(ids[n - (k + 1) * period:n - k * period] == block for k in range(1, times)):
            return True
    return False
