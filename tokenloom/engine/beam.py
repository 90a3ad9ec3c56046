"""Beam search over a batch of prompts: plain, sampled, and diverse (grouped).

Every prompt has `num_beams` batch rows; one forward pass per step serves all of them, and a
prompt whose search is over leaves the batch. The semantics are transformers' (the oracle):

- plain and sampled beam search follow v5's vectorised `_beam_search`: log-softmax scores,
  processors applied to them, running sums, 2 x num_beams candidates (more with several EOS
  ids), finished hypotheses scored ``sum_logprobs / generated_len ** length_penalty`` where
  ``generated_len`` counts the generated tokens including the EOS (not the prompt), and the
  ``early_stopping`` rules of `_check_early_stop_heuristic`;
- diverse beam search follows `_group_beam_search` + `BeamSearchScorer` +
  `HammingDiversityLogitsProcessor` of transformers 4.51 (moved out of the core in v5).

References: Vijayakumar et al. 2016, "Diverse Beam Search"; transformers `generation/utils.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from tokenloom.config import GenerationConfig
from tokenloom.engine.prefill import new_token_limit, start
from tokenloom.sampling.sampler import make_generators, row_seed

NEG = -1.0e9  # transformers' "impossible" score

# (logits (R, V), tokens (R, L) left-padded with -1, step) -> logits: the logits chain hook
Process = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class BeamHypothesis:
    token_ids: list[int]  # generated tokens only, with the EOS that ended it
    score: float  # transformers' sequence score: sum of log-probs / generated_len ** length_penalty
    finish_reason: str  # "stop" (ended by an EOS / stop id) or "length"


class _Search:
    """What all beam variants share: stop ids, limits, prefill, one decode step, the hook."""

    def __init__(self, model, prompts: list[list[int]], config: GenerationConfig, eos_ids: list[int],
                 process: Process | None, dtype: torch.dtype, device):
        self.model, self.config, self.process, self.device = model, config, process, device
        self.prompts = prompts
        self.num_beams = config.num_beams
        stop = set(config.stop_token_ids) | (set() if config.ignore_eos else set(config.eos_token_id or eos_ids))
        self.stop_set = stop
        self.stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
        self.max_new = [new_token_limit(model, p, config.max_new_tokens) for p in prompts]
        self.dtype = dtype
        self.encoder_tokens: torch.Tensor | None = None  # encoder-decoder: each row's source ids

    def prefill(self, rows: list[int]) -> torch.Tensor:
        """Prefill the prompts `rows`, repeat each num_beams times -> last logits (len(rows) * B, V)."""
        st = start(self.model, [self.prompts[i] for i in rows], max(self.max_new[i] for i in rows),
                   self.dtype, self.device)
        expand = torch.arange(len(rows), device=self.device).repeat_interleave(self.num_beams)
        self.cache = st.cache
        self.cache.select(expand)
        self.prompt_tokens = st.tokens.index_select(0, expand)  # (R, width), -1 = padding
        if st.encoder_tokens is not None:
            self.encoder_tokens = st.encoder_tokens.index_select(0, expand)  # (R, S), -1 = padding
        self.next_pos = st.next_positions.index_select(0, expand)  # (R,)
        return st.logits.index_select(0, expand)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run one token per row (R,) -> logits (R, V)."""
        with torch.inference_mode():
            logits = self.model(tokens[:, None], self.next_pos[:, None], self.cache, last_only=True)
        self.next_pos = self.next_pos + 1
        return logits[:, -1].float()

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.cache.select(rows)
        self.next_pos = self.next_pos.index_select(0, rows)
        self.prompt_tokens = self.prompt_tokens.index_select(0, rows)
        if self.encoder_tokens is not None:
            self.encoder_tokens = self.encoder_tokens.index_select(0, rows)

    def hook(self, scores: torch.Tensor, generated: torch.Tensor, step: int, rows: torch.Tensor | None = None):
        """The caller's logits chain, then EOS suppression before `min_new_tokens` (transformers' order)."""
        if self.process is not None:
            prompt = self.prompt_tokens if rows is None else self.prompt_tokens.index_select(0, rows)
            extra = {}
            if self.encoder_tokens is not None:
                extra["encoder_tokens"] = self.encoder_tokens if rows is None else self.encoder_tokens.index_select(0, rows)
            scores = self.process(scores, torch.cat([prompt, generated], dim=1), step, **extra)
        if step < self.config.min_new_tokens and len(self.stop_ids):
            scores = scores.clone()
            scores[:, self.stop_ids] = float("-inf")
        return scores

    def result(self, tokens: list[int], score: float) -> BeamHypothesis:
        reason = "stop" if tokens and tokens[-1] in self.stop_set else "length"
        return BeamHypothesis(tokens, float(score), reason)


def beam_search(model, prompts: list[list[int]], config: GenerationConfig, eos_ids: list[int],
                process: Process | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> list[list[BeamHypothesis]]:
    """Beam search for every prompt at once -> per prompt, `num_return_sequences` hypotheses, best first.

    `do_sample=True` gives beam sampling (candidates drawn without replacement, one seeded
    generator per prompt); `num_beam_groups > 1` gives diverse beam search. `process` is the
    logits chain, applied to the log-softmax scores before the running beam scores are added.
    """
    s = _Search(model, prompts, config, eos_ids, process, dtype, device)
    steps = search_steps(s)
    try:
        tokens = next(steps)
        while True:
            tokens = steps.send(s.forward(tokens))
    except StopIteration as done:
        return done.value


def search_steps(s: _Search):
    """The search as a generator: it yields the next token of every row (R,) after reordering
    the rows with `s.keep_rows`, is sent the logits of running them, and returns the hypotheses.
    The caller runs the model, so a serving engine can batch these rows with others."""
    if s.config.num_beam_groups > 1:
        return _group_beam_search(s)
    return _beam_search(s)


# ---------------------------------------------------------------------------- plain / sampled


def _warp(scores: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """transformers' sampling warpers with beam search's min_tokens_to_keep = 2."""
    if config.temperature is not None and config.temperature not in (0.0, 1.0):
        scores = scores / config.temperature
    if config.top_k:
        k = min(max(config.top_k, 2), scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - config.top_p)
        remove[..., -2:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (P, K, ...) indexed along dim 1 by idx (P, K')."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def _beam_search(s: _Search):
    config, B = s.config, s.num_beams
    n_ret = config.num_return_sequences
    out: list[list[BeamHypothesis] | None] = [None] * len(s.prompts)
    live = [i for i in range(len(s.prompts)) if s.max_new[i] > 0]
    for i in range(len(s.prompts)):
        if s.max_new[i] <= 0:
            out[i] = [BeamHypothesis([], 0.0, "length") for _ in range(n_ret)]
    if not live:
        return out  # type: ignore[return-value]

    lp, early = config.length_penalty, config.early_stopping
    K = max(2, 1 + len(s.stop_set)) * B  # candidates per prompt and step
    top_b = torch.arange(K, device=s.device) < B  # only the best B candidates may finish
    generators = None
    if config.sampling:
        seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(6), "little")
        generators = make_generators([row_seed(seed, i) for i in live], s.device)

    logits = s.prefill(live)
    P, N = len(live), max(s.max_new[i] for i in live)
    max_new = torch.tensor([s.max_new[i] for i in live], device=s.device)  # (P,)
    run_seq = torch.full((P, B, N), -1, dtype=torch.long, device=s.device)  # generated tokens
    run_scores = torch.zeros(P, B, device=s.device)
    run_scores[:, 1:] = NEG  # step 1 draws from the first beam only
    fin_seq = run_seq.clone()
    fin_scores = torch.full((P, B), NEG, device=s.device)
    fin_len = torch.zeros(P, B, dtype=torch.long, device=s.device)
    fin_done = torch.zeros(P, B, dtype=torch.bool, device=s.device)  # slot holds a finished hypothesis
    improvable = torch.ones(P, 1, dtype=torch.bool, device=s.device)
    step = 0
    while True:
        V = logits.shape[-1]
        scores = torch.log_softmax(logits, dim=-1)  # (P * B, V)
        scores = s.hook(scores, run_seq[:, :, :step].reshape(P * B, step), step)
        if generators is not None:
            scores = _warp(scores, config)
        acc = (scores.view(P, B, V) + run_scores[:, :, None]).view(P, B * V)

        # candidates: the K best continuations over all beams (or K drawn without replacement)
        if generators is not None:
            probs = acc.softmax(dim=-1)
            idx = torch.stack([torch.multinomial(probs[i], K, generator=g) for i, g in enumerate(generators)])
            cand_scores, order = acc.gather(1, idx).sort(dim=-1, descending=True)
            idx = idx.gather(1, order)
        else:
            cand_scores, idx = torch.topk(acc, K)  # (P, K)
        parent, tok = idx // V, idx % V
        cand_seq = _gather(run_seq, parent)
        cand_seq[:, :, step] = tok
        hits = torch.isin(tok, s.stop_ids) | (step + 1 >= max_new)[:, None]  # (P, K)

        # the B best unfinished candidates run on
        cand_run = cand_scores + hits.float() * NEG
        nxt = torch.topk(cand_run, B)[1]
        run_seq, run_scores, run_parent = _gather(cand_seq, nxt), _gather(cand_run, nxt), _gather(parent, nxt)

        # finished candidates among the best B enter the n-best list if they beat its worst
        just = hits & top_b[None, :]
        fin_cand = cand_scores / ((step + 1) ** lp)
        if early is True:
            fin_cand = fin_cand + fin_done.all(dim=1, keepdim=True).float() * NEG
        fin_cand = fin_cand + (~improvable).float() * NEG + (~just) * NEG
        merged = torch.topk(torch.cat([fin_scores, fin_cand], dim=1), B)[1]
        fin_seq = _gather(torch.cat([fin_seq, cand_seq], dim=1), merged)
        fin_scores = _gather(torch.cat([fin_scores, fin_cand], dim=1), merged)
        fin_len = _gather(torch.cat([fin_len, torch.full_like(tok, step + 1)], dim=1), merged)
        fin_done = _gather(torch.cat([fin_done, just], dim=1), merged)

        step += 1
        if early == "never" and lp > 0.0:
            best_len = torch.tensor([float(m) ** lp for m in max_new.tolist()], device=s.device)[:, None]
            best_possible = run_scores[:, :1] / best_len
        else:
            best_possible = run_scores[:, :1] / (step ** lp)
        worst = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True)[0], NEG)
        improvable = improvable & (best_possible > worst).any(dim=-1, keepdim=True)

        done = ~improvable[:, 0] | hits.all(dim=1)
        if early is True:
            done = done | fin_done.all(dim=1)
        for p in done.nonzero()[:, 0].tolist():
            lens, seqs, sc = fin_len[p].tolist(), fin_seq[p].tolist(), fin_scores[p].tolist()
            out[live[p]] = [s.result(seqs[j][:lens[j]], sc[j]) for j in range(n_ret)]
        keep = (~done).nonzero()[:, 0]
        if len(keep) == 0:
            return out  # type: ignore[return-value]

        # reorder the cache to the surviving beams, drop finished prompts, run the next tokens
        rows = (keep[:, None] * B + run_parent[keep]).view(-1)  # parent beams' cache rows
        if len(keep) < P:
            live = [live[p] for p in keep.tolist()]
            if generators is not None:
                generators = [generators[p] for p in keep.tolist()]
            run_seq, run_scores = run_seq[keep], run_scores[keep]
            fin_seq, fin_scores, fin_len, fin_done = fin_seq[keep], fin_scores[keep], fin_len[keep], fin_done[keep]
            improvable, max_new = improvable[keep], max_new[keep]
            P = len(keep)
        s.keep_rows(rows)
        logits = yield run_seq[:, :, step - 1].reshape(-1)


# ---------------------------------------------------------------------------- diverse (grouped)


class _Hypotheses:
    """transformers 4.51 `BeamHypotheses`: the n best finished hypotheses of one group."""

    def __init__(self, n: int, length_penalty: float, early_stopping: bool | str, max_new: int):
        self.n, self.lp, self.early, self.max_new = n, length_penalty, early_stopping, max_new
        self.beams: list[tuple[float, list[int]]] = []
        self.worst = 1e9

    def add(self, tokens: list[int], sum_logprobs: float, generated_len: int) -> None:
        score = sum_logprobs / (generated_len ** self.lp)
        if len(self.beams) < self.n or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.n:
                ranked = sorted((sc, j) for j, (sc, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, generated_len: int) -> bool:
        if len(self.beams) < self.n:
            return False
        if self.early is True:
            return True
        if self.early == "never" and self.lp > 0.0:
            return self.worst >= best_sum_logprobs / self.max_new ** self.lp
        return self.worst >= best_sum_logprobs / generated_len ** self.lp


def _group_beam_search(s: _Search):
    config, B = s.config, s.num_beams
    n_groups = config.num_beam_groups
    G = B // n_groups
    n_ret = config.num_return_sequences
    penalty = config.diversity_penalty
    out: list[list[BeamHypothesis] | None] = [None] * len(s.prompts)
    live = [i for i in range(len(s.prompts)) if s.max_new[i] > 0]
    for i in range(len(s.prompts)):
        if s.max_new[i] <= 0:
            out[i] = [BeamHypothesis([], 0.0, "length") for _ in range(n_ret)]
    if not live:
        return out  # type: ignore[return-value]

    K = max(2, 1 + len(s.stop_set)) * G
    logits = s.prefill(live)
    hyps = {i: [_Hypotheses(G, config.length_penalty, config.early_stopping, s.max_new[i]) for _ in range(n_groups)]
            for i in live}
    group_done = {i: [False] * n_groups for i in live}
    seqs: list[list[int]] = [[] for _ in range(len(live) * B)]  # generated tokens per row
    beam_scores = torch.full((len(live), B), NEG, device=s.device)
    beam_scores[:, ::G] = 0  # each group starts from its first beam
    beam_scores = beam_scores.view(-1)
    step = 0
    while True:
        P, V = len(live), logits.shape[-1]
        current = torch.zeros(P * B, dtype=torch.long, device=s.device)  # tokens chosen at this step
        chosen = [False] * (P * B)  # rows whose group is done contribute no token to the diversity penalty
        reorder = torch.arange(P * B, device=s.device)
        new_seqs = list(seqs)
        for g in range(n_groups):
            rows = torch.tensor([p * B + g * G + j for p in range(P) for j in range(G)], device=s.device)
            scores = torch.log_softmax(logits.index_select(0, rows), dim=-1)  # (P * G, V)
            if g > 0 and penalty:
                scores = scores.clone()
                for p in range(P):
                    prev = [current[p * B + r].item() for r in range(g * G) if chosen[p * B + r]]
                    freq = torch.bincount(torch.tensor(prev, dtype=torch.long, device=s.device), minlength=V)
                    scores[p * G:(p + 1) * G] -= penalty * freq
            generated = torch.tensor([seqs[r] for r in rows.tolist()], dtype=torch.long,
                                     device=s.device).view(len(rows), step)
            scores = s.hook(scores, generated, step, rows)
            acc = (scores + beam_scores.index_select(0, rows)[:, None]).view(P, G * V)
            top_scores, top_idx = torch.topk(acc, K, dim=1, largest=True, sorted=True)
            parent, tok = top_idx // V, top_idx % V
            next_scores = torch.zeros(P, G, device=s.device)
            top_scores_l, parent_l, tok_l = top_scores.tolist(), parent.tolist(), tok.tolist()
            for p in range(P):
                base = p * B + g * G
                if group_done[live[p]][g]:  # rows of a finished group idle on token 0, never used again
                    for j in range(G):
                        new_seqs[base + j] = seqs[base + j] + [0]
                    continue
                filled = 0
                for rank in range(K):
                    t, src = tok_l[p][rank], base + parent_l[p][rank]
                    if t in s.stop_set:
                        if rank < G:
                            hyps[live[p]][g].add(seqs[src] + [t], top_scores[p, rank].item(), step + 1)
                    else:
                        next_scores[p, filled] = top_scores[p, rank]
                        new_seqs[base + filled] = seqs[src] + [t]
                        current[base + filled] = t
                        chosen[base + filled] = True
                        reorder[base + filled] = src
                        filled += 1
                    if filled == G:
                        break
                if filled < G:
                    raise RuntimeError(f"beam search: fewer than {G} continuations that are not EOS")
                group_done[live[p]][g] = hyps[live[p]][g].is_done(max(top_scores_l[p]), step + 1)
            beam_scores[rows] = next_scores.view(-1)
        seqs = new_seqs
        step += 1

        # a prompt is over when all its groups are done, or at its length limit
        finished = []
        for p, i in enumerate(live):
            if all(group_done[i]):
                finished.append(p)
            elif step >= s.max_new[i]:
                for g in range(n_groups):
                    if not group_done[i][g]:
                        for j in range(G):
                            r = p * B + g * G + j
                            hyps[i][g].add(seqs[r], beam_scores[r].item(), step)
                finished.append(p)
        for p in finished:
            i = live[p]
            ranked = sorted((h for grp in hyps[i] for h in grp.beams), key=lambda h: h[0])
            out[i] = [_pop(ranked, s) for _ in range(n_ret)]
        keep = [p for p in range(P) if p not in set(finished)]
        if not keep:
            return out  # type: ignore[return-value]
        rows_kept = torch.tensor([p * B + j for p in keep for j in range(B)], device=s.device)
        src_rows = reorder.index_select(0, rows_kept)
        seqs = [seqs[r] for r in rows_kept.tolist()]
        beam_scores = beam_scores.index_select(0, rows_kept)
        next_tokens = torch.tensor([q[-1] for q in seqs], dtype=torch.long, device=s.device)
        live = [live[p] for p in keep]
        s.keep_rows(src_rows)
        logits = yield next_tokens


def _pop(ranked: list[tuple[float, list[int]]], s: _Search) -> BeamHypothesis:
    score, tokens = ranked.pop()
    return s.result(tokens, score)
