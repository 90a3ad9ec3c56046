"""Beam search and contrastive search behind one call, with the logits chain as their hook.

These strategies choose among whole hypotheses, so their text is final only at the end: the
caller gets finished sequences, not a token stream.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tokenloom.config import GenerationConfig
from tokenloom.engine.beam import beam_search
from tokenloom.engine.contrastive import contrastive_search
from tokenloom.engine.generate import _vocab_size
from tokenloom.sampling.chain import LogitsChain, SamplingState


@dataclass
class Finished:
    index: int
    prompt_index: int
    token_ids: list[int]
    finish_reason: str
    score: float | None = None


def uses_search(config: GenerationConfig) -> bool:
    return config.num_beams > 1 or bool(config.penalty_alpha)


def _hook(config: GenerationConfig, eos_ids: list[int], vocab_size: int, tokenizer):
    """The chain's penalties and constraints as `process(logits, tokens, step)`; beam sampling
    applies its own filters, so the chain is built without them."""
    chain = LogitsChain(replace(config, do_sample=False, temperature=None), eos_ids, vocab_size, tokenizer)
    if chain.is_noop:
        return None

    def process(logits: torch.Tensor, tokens: torch.Tensor, step: int,
                encoder_tokens: torch.Tensor | None = None) -> torch.Tensor:
        rows = tokens.shape[0]
        prompt_lens = (tokens >= 0).sum(dim=1) - step
        state = SamplingState(tokens, prompt_lens, step, torch.full((rows,), config.max_new_tokens), None,
                              encoder_tokens=encoder_tokens)
        return chain.process(logits, state)

    return process


def run_search(model, tokenizer, prompt_ids: list[list[int]], config: GenerationConfig,
               dtype=torch.float32, device="cpu") -> list[Finished]:
    if config.encoder_no_repeat_ngram_size and config.penalty_alpha:
        from tokenloom.errors import InvalidParameterError
        raise InvalidParameterError("encoder_no_repeat_ngram_size", config.encoder_no_repeat_ngram_size,
                                    "0 with contrastive search")
    eos = [] if config.ignore_eos else list(config.eos_token_id or tokenizer.eos_token_ids)
    process = _hook(config, sorted(set(eos) | set(config.stop_token_ids)), _vocab_size(model), tokenizer)
    if config.num_beams > 1:
        hyps = beam_search(model, prompt_ids, config, tokenizer.eos_token_ids, process, dtype, device)
        n = config.num_return_sequences
        return [Finished(i * n + j, i, h.token_ids, h.finish_reason, h.score)
                for i, per_prompt in enumerate(hyps) for j, h in enumerate(per_prompt)]
    ids, reasons = contrastive_search(model, prompt_ids, config, tokenizer.eos_token_ids, process, dtype, device)
    return [Finished(i, i, t, r) for i, (t, r) in enumerate(zip(ids, reasons))]
