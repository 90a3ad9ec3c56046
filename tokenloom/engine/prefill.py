"""The start of every search: run the prompts (decoder-only) or the sources (encoder-decoder).

Decoder-only prompts are left-padded into one batch (padding slots get position -1) and run in
chunks. Encoder-decoder sources are encoded once, their keys/values go into the cross-attention
cache, and the decoder runs its start token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREFILL_CHUNK = 512  # long prompts are prefilled in pieces: bounded attention-matrix memory


@dataclass
class Started:
    logits: torch.Tensor  # (B, V) float32: the next-token logits of each row
    positions: torch.Tensor  # (B, W): position of each prompt slot, -1 for padding
    tokens: torch.Tensor  # (B, W): the decoder's tokens so far (prompt or start token), -1 for padding
    cache: object  # the model's KVCache, with room for `new_slots` more tokens
    encoder_tokens: torch.Tensor | None = None  # (B, S) the sources, right-padded with -1
    hidden: torch.Tensor | None = None  # (B, W, D) final hidden states, when asked for

    @property
    def next_positions(self) -> torch.Tensor:
        return self.positions[:, -1] + 1


def new_token_limit(model, prompt: list[int], max_new_tokens: int) -> int:
    """max_new_tokens, lowered where the context window ends first. A decoder-only prompt shares
    the window with the output; an encoder-decoder source does not (the decoder starts at 0)."""
    used = 1 if getattr(model, "is_encoder_decoder", False) else len(prompt)
    return min(max_new_tokens, model.max_positions - used)


def start(model, prompts: list[list[int]], new_slots: int, dtype, device, return_hidden: bool = False) -> Started:
    new_slots = max(new_slots, 1)
    if getattr(model, "is_encoder_decoder", False):
        return _start_decoder(model, prompts, new_slots, dtype, device, return_hidden)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    pos = torch.full((len(prompts), width), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        pos[i, width - len(p):] = torch.arange(len(p))
    ids, pos = ids.to(device), pos.to(device)
    cache = model.make_cache(len(prompts), width + new_slots, dtype, device)
    hidden = []
    with torch.inference_mode():
        for lo in range(0, width, PREFILL_CHUNK):
            out = model(ids[:, lo:lo + PREFILL_CHUNK], pos[:, lo:lo + PREFILL_CHUNK], cache, last_only=True,
                        return_hidden=return_hidden)
            logits = out[0] if return_hidden else out
            if return_hidden:
                hidden.append(out[1])
    return Started(logits[:, -1].float(), pos, ids.masked_fill(pos < 0, -1), cache,
                   hidden=torch.cat(hidden, dim=1) if return_hidden else None)


def _start_decoder(model, sources, new_slots, dtype, device, return_hidden) -> Started:
    width = max(len(p) for p in sources)
    ids = torch.zeros(len(sources), width, dtype=torch.long)
    mask = torch.zeros(len(sources), width, dtype=torch.bool)
    for i, p in enumerate(sources):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p, dtype=torch.long), True
    ids, mask = ids.to(device), mask.to(device)
    pos = torch.zeros(len(sources), 1, dtype=torch.long, device=device)
    first = torch.full_like(pos, model.decoder_start_token_id)
    with torch.inference_mode():
        memory = model.encode(ids, mask)
        cache = model.make_cache(len(sources), 1 + new_slots, dtype, device, memory=memory, memory_mask=mask)
        out = model(first, pos, cache, last_only=True, return_hidden=return_hidden)
    logits, hidden = out if return_hidden else (out, None)
    return Started(logits[:, -1].float(), pos, first, cache, ids.masked_fill(~mask, -1), hidden)
