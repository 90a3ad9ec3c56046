"""Turning processed logits into tokens: greedy, or seeded multinomial sampling per row.

Each row has its own torch.Generator, so a sequence's tokens depend only on its own seed and
logits, never on what else is in the batch. The full per-request chain (penalties, constraints,
every filter, Mirostat) is `tokenloom.sampling.chain.LogitsChain`; `process` here is the small
legacy subset (temperature, top-k, top-p).
"""

from __future__ import annotations

import torch

from tokenloom.config import GenerationConfig
from tokenloom.sampling import processors as P

_MASK64 = (1 << 63) - 1


def row_seed(seed: int, index: int) -> int:
    """Seed of the index-th sequence of a request: the request's seed itself for the first."""
    if index == 0:
        return seed
    return (seed * 6364136223846793005 + index * 1442695040888963407) & _MASK64


def make_generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def process(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Apply the sampling chain (temperature, top-k, top-p) of `config` to (B, V) float logits."""
    if config.temperature is not None and config.temperature not in (0.0, 1.0):
        logits = P.temperature(logits, config.temperature)
    if config.top_k:
        logits = P.top_k(logits, config.top_k)
    if config.top_p is not None and config.top_p < 1.0:
        logits = P.top_p(logits, config.top_p)
    return logits


def sample(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Draw one token per row from softmax(logits), each row with its own generator -> (B,)."""
    probs = logits.float().softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)
