"""Logits processors: small pure functions (B, V) -> (B, V) that never modify their input.

They follow transformers' definitions exactly (the test oracle), including how ties and the
"keep at least one token" rule are handled.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    return logits / t


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits of each row (ties with the k-th are kept too)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def suppress(logits: torch.Tensor, token_ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Set the given token ids to -inf, in all rows or only where `rows` (B,) is True."""
    out = logits.clone()
    if rows is None:
        out[:, token_ids] = NEG_INF
    else:
        sub = out[:, token_ids]
        out[:, token_ids] = torch.where(rows[:, None], NEG_INF, sub)
    return out
