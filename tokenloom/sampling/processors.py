"""Logits processors: small pure functions (B, V) -> (B, V) that never modify their input.

Where transformers has the processor, ours follows `transformers.generation.logits_process`
exactly (the test oracle), including ties and the "keep at least `min_keep` tokens" rules:
temperature, top-k, top-p, min-p, typical-p, epsilon, eta, repetition penalty, no-repeat n-gram
(of the output and of the encoder input), sequence bias / bad words, min new tokens, forced BOS/EOS,
exponential decay length penalty and suppressed tokens. Where it has none we follow llama.cpp's `src/llama-sampling.cpp`: top-n-sigma,
XTC, DRY (itself koboldcpp's definition) and Mirostat 2. Presence and frequency penalties follow
OpenAI's definition (generated tokens only): logit - count * frequency - (count > 0) * presence.

Token histories are (B, L) long tensors LEFT-padded with -1; padding never counts as a token.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------- filters

def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    return logits / t


def top_k(logits: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    """Keep the k highest logits of each row (ties with the k-th are kept too)."""
    k = min(max(k, min_keep), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -min_keep:] = False  # always keep the most likely token(s)
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def min_p(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below p times the most likely token's."""
    probs = logits.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_keep, probs.shape[-1]), dim=-1).indices
    remove.scatter_(-1, keep, False)
    return logits.masked_fill(remove, NEG_INF)


def typical_p(logits: torch.Tensor, mass: float, min_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to `mass`."""
    logp = torch.log_softmax(logits, dim=-1)
    ent = -(logp * logp.exp()).nansum(-1, keepdim=True)
    shifted = torch.abs(-logp - ent)
    sorted_shifted, order = torch.sort(shifted, descending=False)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=-1).clamp_(max=logits.shape[-1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(-1, last[:, None])
    remove_sorted[..., :min_keep] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def _keep_top(logits: torch.Tensor, remove: torch.Tensor, min_keep: int) -> torch.Tensor:
    kth = torch.topk(logits, min(min_keep, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(remove & (logits < kth), NEG_INF)


def epsilon_cutoff(logits: torch.Tensor, epsilon: float, min_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below epsilon (the min_keep most likely always stay)."""
    return _keep_top(logits, logits.softmax(dim=-1) < epsilon, min_keep)


def eta_cutoff(logits: torch.Tensor, epsilon: float, min_keep: int = 1) -> torch.Tensor:
    """Eta sampling: drop tokens below min(epsilon, sqrt(epsilon) * exp(-entropy))."""
    probs = logits.softmax(dim=-1)
    # entropy as torch.distributions.Categorical computes it (transformers uses that)
    logp = (logits - logits.logsumexp(dim=-1, keepdim=True)).clamp(min=torch.finfo(logits.dtype).min)
    entropy = -(logp * probs).sum(dim=-1)
    eps = torch.tensor(epsilon, dtype=logits.dtype, device=logits.device)
    eta = torch.minimum(eps, torch.sqrt(eps) * torch.exp(-entropy))[..., None]
    return _keep_top(logits, probs < eta, min_keep)


def top_n_sigma(logits: torch.Tensor, n: float) -> torch.Tensor:
    """Keep tokens whose logit is within n standard deviations of the top one (llama.cpp).

    Mean and (population) standard deviation are over each row's finite logits.
    """
    finite = logits != NEG_INF
    count = finite.sum(dim=-1, keepdim=True).clamp(min=1)
    zeroed = torch.where(finite, logits, 0.0)
    mean = zeroed.sum(dim=-1, keepdim=True) / count
    var = torch.where(finite, (logits - mean) ** 2, 0.0).sum(dim=-1, keepdim=True) / count
    top = logits.amax(dim=-1, keepdim=True)
    return logits.masked_fill(logits < top - n * var.sqrt(), NEG_INF)


def xtc(logits: torch.Tensor, threshold: float, probability: float, chance: torch.Tensor) -> torch.Tensor:
    """Exclude Top Choices (llama.cpp): in rows where chance (B,) <= probability, remove every token
    with probability >= threshold except the least likely of them (nothing when fewer than two)."""
    if probability <= 0 or threshold > 0.5:
        return logits
    probs = logits.softmax(dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    n_top = (sorted_probs >= threshold).sum(dim=-1, keepdim=True)  # candidates are a prefix
    pos = torch.arange(logits.shape[-1], device=logits.device)
    remove_sorted = (pos < n_top - 1) & (chance <= probability)[:, None]
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def mirostat2_truncate(logits: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Mirostat 2 (llama.cpp): keep the tokens whose surprise -log2 p is at most mu (B,), and at
    least the most likely one."""
    surprise = -torch.log2(logits.softmax(dim=-1))
    remove = surprise > mu[:, None]
    remove.scatter_(-1, logits.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, NEG_INF)


# ---------------------------------------------------------------------- penalties and constraints

def repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule, once per distinct token in `tokens` (B, L): negative logits are multiplied by
    penalty, others divided by it."""
    vocab = logits.shape[-1]
    ids = torch.where((tokens < 0) | (tokens >= vocab), vocab, tokens)  # padding -> a spare column
    padded = torch.nn.functional.pad(logits, (0, 1))
    score = padded.gather(1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return padded.scatter(1, ids, score)[:, :vocab]


def token_counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, L) ids, -1 for padding -> (B, V) occurrence counts in the logits' dtype."""
    ids = torch.where((tokens < 0) | (tokens >= vocab), vocab, tokens)
    counts = torch.zeros(tokens.shape[0], vocab + 1, device=tokens.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def presence_frequency_penalty(logits: torch.Tensor, generated: torch.Tensor, presence: float,
                               frequency: float) -> torch.Tensor:
    """OpenAI: logit - count * frequency - (count > 0) * presence, counting generated tokens only."""
    counts = token_counts(generated, logits.shape[-1]).to(logits.dtype)
    return logits - (counts * frequency + (counts > 0).to(logits.dtype) * presence)


def no_repeat_ngram(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Ban the tokens that would complete an n-gram already present in `tokens` (B, L), prompt included."""
    length = tokens.shape[-1]
    if length < n:
        return logits
    vocab = logits.shape[-1]
    prefix = tokens[:, length + 1 - n:]                         # (B, n-1)
    windows = tokens.unfold(1, n, 1)                            # (B, L-n+1, n)
    matches = (windows[..., :-1] == prefix[:, None]).all(dim=-1) & (windows[..., -1] >= 0)
    banned = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return logits.masked_fill(banned[:, :vocab], NEG_INF)


def encoder_no_repeat_ngram(logits: torch.Tensor, tokens: torch.Tensor, encoder_tokens: torch.Tensor,
                            n: int) -> torch.Tensor:
    """Ban the tokens that would complete, in `tokens` (B, L), an n-gram of the row's encoder input.

    `encoder_tokens` (B, S) is RIGHT-padded with -1; n-grams that touch padding do not count (transformers
    takes the padded encoder ids as they are, so pad-token n-grams are banned there too).
    """
    length, vocab = tokens.shape[-1], logits.shape[-1]
    if length < n - 1 or encoder_tokens.shape[-1] < n:
        return logits
    prefix = tokens[:, length + 1 - n:]                         # (B, n-1); -1 (padding) never matches
    windows = encoder_tokens.to(tokens.device).unfold(1, n, 1)  # (B, S-n+1, n)
    matches = (windows[..., :-1] == prefix[:, None]).all(dim=-1) & (windows >= 0).all(dim=-1)
    banned = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab).to(logits.device), True)
    return logits.masked_fill(banned[:, :vocab], NEG_INF)


def prepare_sequence_bias(sequence_bias: dict[tuple[int, ...], float], vocab: int,
                          device: torch.device | str = "cpu"):
    """Precompute transformers' SequenceBiasLogitsProcessor tensors: a (V,) bias for single tokens and,
    per prefix length, (prefixes (G, n), last tokens (G,), biases (G,))."""
    single = torch.zeros(vocab, device=device)
    groups: dict[int, list] = {}
    for seq, bias in sequence_bias.items():
        if len(seq) == 1:
            single[seq[0]] = bias
        else:
            groups.setdefault(len(seq) - 1, []).append((seq, bias))
    multi = [(torch.tensor([s[:-1] for s, _ in g], device=device), torch.tensor([s[-1] for s, _ in g], device=device),
              torch.tensor([b for _, b in g], dtype=torch.float, device=device)) for g in groups.values()]
    return single, multi


def sequence_bias(logits: torch.Tensor, tokens: torch.Tensor, single: torch.Tensor, multi: list) -> torch.Tensor:
    """Add each sequence's bias to its last token where `tokens` (B, L) ends with the rest of it."""
    bias = torch.zeros_like(logits) + single
    for prefixes, last, biases in multi:
        n = prefixes.shape[1]
        if n > tokens.shape[1]:
            continue
        hit = (tokens[:, None, -n:] == prefixes).all(dim=-1)    # (B, G)
        bias.index_add_(1, last, torch.where(hit, biases, 0.0).to(bias.dtype))
    return logits + bias


def suppress(logits: torch.Tensor, token_ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Set the given token ids to -inf, in all rows or only where `rows` (B,) is True."""
    out = logits.clone()
    if rows is None:
        out[:, token_ids] = NEG_INF
    else:
        sub = out[:, token_ids]
        out[:, token_ids] = torch.where(rows[:, None], NEG_INF, sub)
    return out


def force(logits: torch.Tensor, token_ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' forced BOS/EOS: in the chosen rows (all when None) every logit becomes -inf but
    those of `token_ids`, which become 0."""
    forced = torch.full_like(logits, NEG_INF)
    forced[:, token_ids] = 0.0
    if rows is None:
        return forced
    return torch.where(rows[:, None], forced, logits)


def exponential_decay_length_penalty(logits: torch.Tensor, eos_ids: torch.Tensor, start: int, factor: float,
                                     step: int) -> torch.Tensor:
    """transformers: after `start` generated tokens, EOS logits grow by |logit| * (factor ** (step - start) - 1)."""
    if step <= start:
        return logits
    eos = logits[:, eos_ids]
    penalty = (torch.abs(eos) * (pow(factor, step - start) - 1)).masked_fill(~torch.isfinite(eos), 0.0)
    penalties = torch.zeros_like(logits)
    penalties[:, eos_ids] = penalty
    return logits + penalties


# ---------------------------------------------------------------------------------------- DRY

_FLOAT_MAX_LOG = 88.7228391


def dry(logits: torch.Tensor, tokens: torch.Tensor, multiplier: float, base: float, allowed_length: int,
        last_n: int, breakers: dict[int, list[tuple[int, ...]]]) -> torch.Tensor:
    """DRY, "Don't Repeat Yourself" (koboldcpp / llama.cpp `llama_sampler_dry_apply`).

    For every earlier position where the context's suffix repeats (the repeat stopping at the
    nearest sequence breaker), the token that followed it would extend the repeat; if the repeat is
    at least `allowed_length` long, that token loses multiplier * base ** (length - allowed_length)
    (the longest repeat per token counts). `breakers` maps a head token to the tails (token tuples)
    that complete a breaker after it; an empty tail makes the head a breaker on its own, and such
    tokens are never penalised. `last_n` = -1 scans the whole row, 0 disables DRY.
    """
    if multiplier == 0 or base < 1 or last_n == 0:
        return logits
    out = logits.clone()
    vocab = logits.shape[-1]
    max_exp = int(_FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    heads = torch.tensor(sorted(breakers), dtype=torch.long, device=tokens.device)
    solo = [h for h, tails in breakers.items() if () in tails and h < vocab]
    for b in range(tokens.shape[0]):
        row = tokens[b][tokens[b] >= 0]
        if last_n > 0:
            row = row[-last_n:]
        n_ctx = row.shape[0]
        if n_ctx <= allowed_length:
            continue
        rev = row.flip(0)  # rev[i] is the i-th token from the end
        rep_limit = _dry_rep_limit(rev, heads, breakers)
        if rep_limit < allowed_length:
            continue
        cap = rep_limit if max_exp == 0 else min(rep_limit, allowed_length + max_exp)
        # repeat[k-1]: length of the common suffix of the row and the row without its last k tokens
        k = torch.arange(1, n_ctx, device=tokens.device)
        repeat = torch.zeros(n_ctx - 1, dtype=torch.long, device=tokens.device)
        alive = torch.ones(n_ctx - 1, dtype=torch.bool, device=tokens.device)
        for m in range(cap):
            idx = k + m
            alive &= (idx < n_ctx) & (rev[idx.clamp(max=n_ctx - 1)] == rev[m])
            if not alive.any():
                break
            repeat += alive
        hit = repeat >= allowed_length
        if not hit.any():
            continue
        nxt = rev[k[hit] - 1]  # the token that followed each repeat
        longest = torch.full((vocab + 1,), -1, dtype=torch.long, device=tokens.device)
        longest.scatter_reduce_(0, nxt.clamp(max=vocab), repeat[hit], reduce="amax")
        longest = longest[:vocab]
        if solo:
            longest[solo] = -1
        sel = longest >= allowed_length
        exponent = (longest[sel] - allowed_length).to(logits.dtype)
        if max_exp > 0:
            exponent = exponent.clamp(max=max_exp)
        out[b, sel] -= multiplier * torch.pow(torch.tensor(base, dtype=logits.dtype), exponent)
    return out


def _dry_rep_limit(rev: torch.Tensor, heads: torch.Tensor, breakers: dict[int, list[tuple[int, ...]]]) -> int:
    """Tokens from the end up to the nearest complete sequence breaker (llama.cpp's step 1)."""
    n_ctx = rev.shape[0]
    if heads.numel() == 0:
        return n_ctx
    for i in torch.nonzero(torch.isin(rev, heads)).flatten().tolist():
        longest = -1
        for tail in breakers[int(rev[i])]:
            if longest < len(tail) <= i and all(int(rev[i - 1 - j]) == t for j, t in enumerate(tail)):
                longest = len(tail)
        if longest >= 0:
            return i - longest
    return n_ctx
