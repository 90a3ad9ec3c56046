"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation").

Each step takes the `top_k` most likely next tokens, runs the model on all of them at once
(rows x top_k batch rows, the cache rows repeated), and keeps the candidate v maximising

    (1 - alpha) * p(v | x) - alpha * max_j cos(h_v, h_j)

where h are final-norm hidden states and j runs over the prompt and the tokens generated so
far. The chosen candidate's cache row and logits carry on to the next step. Semantics follow
transformers 4.51 `_contrastive_search` / `_ranking_fast` (moved out of the core in v5).
"""

from __future__ import annotations

import torch

from tokenloom.config import GenerationConfig
from tokenloom.engine.prefill import new_token_limit, start


def contrastive_search(model, prompts: list[list[int]], config: GenerationConfig, eos_ids: list[int],
                       process=None, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> tuple[list[list[int]], list[str]]:
    """-> (generated ids per prompt, finish reason per prompt: "stop" or "length").

    `process(logits (R, V), tokens (R, L) left-padded with -1, step) -> logits` is the logits
    chain, applied to the raw logits before the softmax that ranks the candidates.
    """
    alpha, k = config.penalty_alpha or 0.0, config.top_k
    if not k or k < 1:
        raise ValueError("contrastive search needs top_k >= 1")
    stop = set(config.stop_token_ids) | (set() if config.ignore_eos else set(config.eos_token_id or eos_ids))
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    max_new = [new_token_limit(model, p, config.max_new_tokens) for p in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    live = [i for i, m in enumerate(max_new) if m > 0]
    if not live:
        return tokens, reasons

    st = start(model, [prompts[i] for i in live], max(max_new[i] for i in live), dtype, device, return_hidden=True)
    cache, logits, next_pos, prompt_tokens = st.cache, st.logits, st.next_positions, st.tokens
    mask = st.positions >= 0  # (R, S): padding never counts as context
    context = torch.where(mask[..., None], st.hidden, torch.ones_like(st.hidden))  # finite, masked below anyway
    step = 0
    while True:
        R = len(live)
        if process is not None:
            generated = torch.tensor([tokens[i] for i in live], dtype=torch.long, device=device).view(R, step)
            logits = process(logits, torch.cat([prompt_tokens, generated], dim=1), step)
        if step < config.min_new_tokens and len(stop_ids):
            logits = logits.clone()
            logits[:, stop_ids] = float("-inf")
        top_probs, top_ids = torch.topk(logits.softmax(dim=-1), k, dim=-1)  # (R, k)

        # every candidate in one forward pass: rows repeated k times
        expand = torch.arange(R, device=device).repeat_interleave(k)
        cache.select(expand)
        with torch.inference_mode():
            cand_logits, cand_hidden = model(top_ids.view(-1, 1), next_pos.index_select(0, expand)[:, None], cache,
                                             last_only=True, return_hidden=True)  # (R*k, 1, V), (R*k, 1, D)
        chosen = _rank(context.index_select(0, expand), cand_hidden, top_probs, mask.index_select(0, expand),
                       alpha, k)  # (R,)
        keep = torch.arange(R, device=device) * k + chosen  # the chosen candidates' rows
        cache.select(keep)
        picked = top_ids.gather(1, chosen[:, None])[:, 0]
        context = torch.cat([context, cand_hidden.index_select(0, keep)], dim=1)
        mask = torch.cat([mask, mask.new_ones(R, 1)], dim=1)
        logits = cand_logits[:, -1].float().index_select(0, keep)
        next_pos = next_pos + 1
        step += 1

        alive = []
        for r, (i, t) in enumerate(zip(live, picked.tolist())):
            tokens[i].append(t)
            if t in stop:
                reasons[i] = "stop"
            elif len(tokens[i]) < max_new[i]:
                alive.append(r)
        if not alive:
            return tokens, reasons
        if len(alive) < R:
            rows = torch.tensor(alive, dtype=torch.long, device=device)
            cache.select(rows)
            live = [live[r] for r in alive]
            context, mask, logits = context[rows], mask[rows], logits[rows]
            next_pos, prompt_tokens = next_pos[rows], prompt_tokens[rows]


def _rank(context: torch.Tensor, next_hidden: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor,
          alpha: float, k: int) -> torch.Tensor:
    """transformers' `_ranking_fast`: context (R*k, S, D), next_hidden (R*k, 1, D), probs (R, k) -> (R,)."""
    norm_context = context / context.norm(dim=2, keepdim=True)
    norm_next = next_hidden / next_hidden.norm(dim=2, keepdim=True)
    cosine = torch.matmul(norm_context, norm_next.transpose(1, 2)).squeeze(-1)  # (R*k, S)
    cosine = cosine + (~mask).to(cosine.dtype) * torch.finfo(cosine.dtype).min
    penalty = cosine.max(dim=-1)[0]  # (R*k,)
    score = (1.0 - alpha) * probs.view(-1) - alpha * penalty
    return score.view(-1, k).max(dim=-1)[1]

