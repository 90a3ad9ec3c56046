"""Log-probabilities of given tokens: prompt logprobs and `Model.score`.

Runs the model over the whole sequence with full logits (in chunks, like prefill) and reads
log P(x_t | x_<t) for every position from `start` on.
"""

from __future__ import annotations

import torch

from tokenloom.outputs import TokenLogprob

CHUNK = 512


def top_pairs(logprobs: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    """(R, V) logprobs -> per row the n best (id, logprob) pairs, best first."""
    if n <= 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(n, dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


@torch.inference_mode()
def sequence_logprobs(model, ids: list[int], start: int, top_n: int = 0, dtype=torch.float32,
                      device="cpu") -> list[TokenLogprob]:
    """Logprob of ids[t] given ids[:t], for t in [max(start, 1), len(ids))."""
    start = max(start, 1)  # the first token has no context to be predicted from
    x = torch.tensor([ids], dtype=torch.long, device=device)
    cache = model.make_cache(1, len(ids), dtype, device)
    out: list[TokenLogprob] = []
    for lo in range(0, len(ids), CHUNK):
        hi = min(lo + CHUNK, len(ids))
        logits = model(x[:, lo:hi], torch.arange(lo, hi, device=device)[None], cache)[0].float()
        # position p predicts token p + 1; keep the predictions of tokens start..len-1
        first, last = max(start - 1, lo), min(hi, len(ids) - 1)
        if first >= last:
            continue
        lp = logits[first - lo:last - lo].log_softmax(dim=-1)
        targets = x[0, first + 1:last + 1]
        chosen = lp.gather(-1, targets[:, None])[:, 0].tolist()
        tops = top_pairs(lp, top_n)
        for tok, value, top in zip(targets.tolist(), chosen, tops):
            out.append(TokenLogprob(tok, value, top, value, top))
    return out
