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
from tokenloom.engine.generate import PREFILL_CHUNK


def contrastive_search(model, prompts: list[list[int]], config: GenerationConfig, eos_ids: list[int],
                       process=None, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> tuple[list[list[int]], list[str]]:
    """-> (generated ids per prompt, finish reason per prompt: "stop" or "length").

    `process(logits (R, V), tokens (R, L) left-padded with -1, step) -> logits` is the logits
    chain, applied to the raw logits before the softmax that ranks the candidates.
    """
    seq2seq = bool(getattr(model, "is_encoder_decoder", False))
    alpha, k = config.penalty_alpha or 0.0, config.top_k
    if not k or k < 1:
        raise ValueError("contrastive search needs top_k >= 1")
    stop = set(config.stop_token_ids) | (set() if config.ignore_eos else set(config.eos_token_id or eos_ids))
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    max_new = [min(config.max_new_tokens, model.max_positions - (1 if seq2seq else len(p))) for p in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    live = [i for i, m in enumerate(max_new) if m > 0]
    if not live:
        return tokens, reasons

    if seq2seq:
        logits, context, mask, prompt_tokens, pos, cache = _start_decoder(model, [prompts[i] for i in live],
                                                                          max(max_new[i] for i in live), dtype, device)
    else:
        logits, context, mask, prompt_tokens, pos, cache = _prefill(model, [prompts[i] for i in live],
                                                                    max(max_new[i] for i in live), dtype, device)
    logits = logits[:, -1].float()  # (R, V)
    next_pos = pos[:, -1] + 1
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


def _prefill(model, prompts, longest_new, dtype, device):
    """Decoder-only: last logits and the hidden states of every prompt position."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    pos = torch.full((len(prompts), width), -1, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        pos[r, width - len(p):] = torch.arange(len(p))
    ids, pos = ids.to(device), pos.to(device)
    cache = model.make_cache(len(prompts), width + longest_new, dtype, device)
    hidden = []
    with torch.inference_mode():
        for start in range(0, width, PREFILL_CHUNK):
            logits, h = model(ids[:, start:start + PREFILL_CHUNK], pos[:, start:start + PREFILL_CHUNK], cache,
                              last_only=True, return_hidden=True)
            hidden.append(h)
    context = torch.cat(hidden, dim=1)  # (R, S, D)
    mask = pos >= 0  # (R, S): padding never counts as context
    context = torch.where(mask[..., None], context, torch.ones_like(context))  # finite, masked below anyway
    return logits, context, mask, torch.where(mask, ids, -1), pos, cache


def _start_decoder(model, sources, longest_new, dtype, device):
    """Encoder-decoder: encode once; the context starts with the decoder start token's hidden state."""
    width = max(len(p) for p in sources)
    ids = torch.zeros(len(sources), width, dtype=torch.long)
    src_mask = torch.zeros(len(sources), width, dtype=torch.bool)
    for r, p in enumerate(sources):
        ids[r, :len(p)], src_mask[r, :len(p)] = torch.tensor(p, dtype=torch.long), True
    ids, src_mask = ids.to(device), src_mask.to(device)
    start = model.decoder_start_token_id
    pos = torch.zeros(len(sources), 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        memory = model.encode(ids, src_mask)
        cache = model.make_cache(len(sources), 1 + longest_new, dtype, device, memory=memory, memory_mask=src_mask)
        logits, context = model(torch.full_like(pos, start), pos, cache, last_only=True, return_hidden=True)
    mask = torch.ones(len(sources), 1, dtype=torch.bool, device=device)
    return logits, context, mask, torch.full_like(pos, start), pos, cache
