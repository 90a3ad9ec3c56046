"""One request inside the serving engine: its sequences, their logits chain, and when they end.

A request owns some rows of the engine's cache (one per sequence: `n` samples, or the beams of
a beam search). Each step the engine hands it the logits of its rows; the request chooses the
next tokens, reports them to its sink (the text layer at the edge), and says which rows run on
(`Plan`). Everything here works on token ids.

Sink protocol: ``sink(index, token_ids, finish_reason, logprobs=None, score=None) -> bool``, True
when the text layer found a stop string and the sequence must end now.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from tokenloom.config import GenerationConfig
from tokenloom.engine.generate import repeats_at_end
from tokenloom.engine.prefill import new_token_limit
from tokenloom.engine.scoring import top_pairs
from tokenloom.outputs import TokenLogprob
from tokenloom.sampling.chain import LogitsChain, SamplingState
from tokenloom.sampling.sampler import make_generators, row_seed


@dataclass
class Plan:
    """What the engine does with a request's rows after a step: row i of the next step is the
    request's current row `keep[i]` (a subset: finished rows are freed; a reordering with
    repeats: beams copy their parents), and runs `tokens[i]`."""
    keep: list[int]
    tokens: list[int]


@dataclass
class _Seq:
    index: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Request:
    """Greedy or sampled decoding of `num_return_sequences` sequences from one prompt."""

    def __init__(self, rid, prompt: list[int], config: GenerationConfig, model, eos_ids: list[int],
                 vocab_size: int, tokenizer=None, sink=None):
        self.id, self.prompt, self.config, self.sink = rid, prompt, config, sink or (lambda *a, **k: False)
        self.encoder_decoder = getattr(model, "is_encoder_decoder", False)
        self.device = next(model.parameters()).device
        self.max_new = new_token_limit(model, prompt, config.max_new_tokens)
        model_eos = [] if config.ignore_eos else list(config.eos_token_id or eos_ids)
        self.stop_set = set(config.stop_token_ids) | set(model_eos)
        self.created = time.monotonic()
        self.deadline = None if config.max_time is None else self.created + config.max_time
        self.rows: list[int] = []  # the engine's cache rows, one per live sequence (engine-owned)
        self.logits: torch.Tensor | None = None  # the rows' next-token logits (engine-owned) ...
        self.usable: bool | None = None  # ... and whether the engine found them free of NaN
        self.greedy: list[int] | None = None  # ... and their argmax, when the engine took it for all rows at once
        self.error: str | None = None
        self._setup(model, vocab_size, tokenizer)

    # ------------------------------------------------------------------ shape of the request

    def _setup(self, model, vocab_size, tokenizer) -> None:
        n = self.config.num_return_sequences
        self.seqs = [_Seq(j) for j in range(n)]
        self.live = list(range(n))  # sequence index of each row
        # min_new_tokens holds back stop token ids too, not only end-of-sequence (as vLLM's min_tokens)
        self.chain = LogitsChain(self.config, sorted(self.stop_set), vocab_size, tokenizer)
        self.generators = None
        if self.config.sampling:
            seed = self.config.seed if self.config.seed is not None else int.from_bytes(os.urandom(6), "little")
            self.generators = make_generators([row_seed(seed, j) for j in range(n)], self.device)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits and nothing else: the engine may pick the tokens itself."""
        return not self.chain.sampling and self.chain.is_noop and self.config.logprobs is None

    @property
    def rows_needed(self) -> int:
        return self.config.num_return_sequences

    @property
    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    @property
    def generated_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    # ------------------------------------------------------------------ steps

    def begin(self, logits: torch.Tensor, decoder_tokens: list[int], encoder_tokens: list[int] | None) -> torch.Tensor:
        """The prefill is done: `logits` (1, V) of its last position. Returns the logits of every row."""
        n = len(self.seqs)
        width = len(decoder_tokens) + max(self.max_new, 1)
        dev = self.device  # the chain's state lives where the logits are
        self.history = torch.full((n, width), -1, dtype=torch.long, device=dev)
        self.history[:, :len(decoder_tokens)] = torch.tensor(decoder_tokens, device=dev)
        self.history_len = len(decoder_tokens)
        self.prompt_lens = torch.full((n,), len(decoder_tokens), dtype=torch.long, device=dev)
        self.max_news = torch.full((n,), self.max_new, dtype=torch.long, device=dev)
        self.encoder_tokens = None if encoder_tokens is None else torch.tensor([encoder_tokens] * n, device=dev)
        if self.max_new <= 0:
            self.finish_all("length")
        return logits.expand(n, -1)

    def _state(self) -> SamplingState:
        return SamplingState(tokens=self.history[:, :self.history_len], prompt_lens=self.prompt_lens,
                             step=self.history_len - int(self.prompt_lens[0]), max_new_tokens=self.max_news,
                             generators=None if self.generators is None else [self.generators[j] for j in self.live],
                             encoder_tokens=self.encoder_tokens)

    def advance(self, logits: torch.Tensor, usable: bool | None = None) -> Plan:
        """Choose every live sequence's next token from its row of `logits` (R, V).

        `usable`: whether the caller already found the rows free of NaN with a finite value
        each (the engine checks a whole decode step at once); None checks them here."""
        if usable is None:
            usable = all(usable_rows(logits))
        if not usable:
            raise FloatingPointError("the model produced NaN or infinite logits")
        lps = None
        greedy, self.greedy = self.greedy, None
        if greedy is not None:  # set by the engine only for plain_greedy requests
            tokens_t = torch.tensor(greedy, device=self.device)
        elif self.chain.is_noop and self.config.logprobs is None:
            tokens_t = self.chain.draw(logits, self._state())
        else:
            state = self._state()
            processed = self.chain.process(logits, state)
            tokens_t = self.chain.draw(processed, state)
            if self.config.logprobs is not None:
                lps = _logprobs(logits, processed, tokens_t, self.config.logprobs)
        tokens = tokens_t.tolist()
        self.history[:, self.history_len] = tokens_t
        self.history_len += 1
        timed_out = self.deadline is not None and time.monotonic() >= self.deadline
        for r, (j, tok) in enumerate(zip(self.live, tokens)):
            seq = self.seqs[j]
            seq.token_ids.append(tok)
            if tok in self.stop_set:
                seq.finish_reason = "stop"
            elif len(seq.token_ids) >= self.max_new:
                seq.finish_reason = "length"
            elif self.config.stop_on_loop and repeats_at_end(seq.token_ids, self.config.stop_on_loop):
                seq.finish_reason = "loop"
            elif timed_out:
                seq.finish_reason = "time"
            if self.sink(j, [tok], seq.finish_reason, None if lps is None else [lps[r]]):
                seq.finish_reason = "stop"
        keep = [r for r, j in enumerate(self.live) if self.seqs[j].finish_reason is None]
        self._keep(keep)
        return Plan(keep, [tokens[r] for r in keep])

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.live):
            return
        self.live = [self.live[r] for r in keep]
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.history = self.history.index_select(0, idx)
        self.prompt_lens, self.max_news = self.prompt_lens.index_select(0, idx), self.max_news.index_select(0, idx)
        if self.encoder_tokens is not None:
            self.encoder_tokens = self.encoder_tokens.index_select(0, idx)
        self.chain.select_rows(idx)

    def finish_all(self, reason: str) -> None:
        """End every live sequence now (aborted, failed, length 0) and tell the sink."""
        for seq in self.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = reason
                self.sink(seq.index, [], reason)
        self.live = []


def usable_rows(logits: torch.Tensor) -> list[bool]:
    """Per row of (R, V) logits: no NaN, and at least one finite value to choose from."""
    # the usual case in one pass: a finite row maximum (max propagates NaN) settles a row; the
    # full test (~4 ms a step at 32 rows) runs only when some row has a NaN, no finite value
    # or a +inf
    usable = torch.isfinite(logits.amax(dim=-1))
    if not bool(usable.all()):
        usable = torch.isfinite(logits).any(dim=-1) & ~torch.isnan(logits).any(dim=-1)
    return usable.tolist()


def _logprobs(raw: torch.Tensor, processed: torch.Tensor, tokens: torch.Tensor, n: int) -> list[TokenLogprob]:
    raw_lp, proc_lp = raw.log_softmax(dim=-1), processed.log_softmax(dim=-1)
    chosen_raw = raw_lp.gather(-1, tokens[:, None])[:, 0].tolist()
    chosen_proc = proc_lp.gather(-1, tokens[:, None])[:, 0].tolist()
    raw_top, proc_top = top_pairs(raw_lp, n), top_pairs(proc_lp, n)
    return [TokenLogprob(int(t), chosen_proc[r], proc_top[r], chosen_raw[r], raw_top[r])
            for r, t in enumerate(tokens.tolist())]


class BeamRequest(Request):
    """Beam search (plain, sampled, diverse) of one prompt on `num_beams` rows of the engine.

    The search itself is beam.py's step generator; this class runs the model for it through
    the engine. Its sequences are final only at the end, so the sink gets each whole at once."""

    def _setup(self, model, vocab_size, tokenizer) -> None:
        from tokenloom.engine.search import _hook

        n = self.config.num_return_sequences
        self.seqs = [_Seq(j) for j in range(n)]
        self.live = list(range(self.config.num_beams))
        eos = sorted(self.stop_set)
        self.process = _hook(self.config, eos, vocab_size, tokenizer)
        self.model = model

    plain_greedy = False  # a search step reads every beam's whole distribution

    @property
    def rows_needed(self) -> int:
        return self.config.num_beams

    def begin(self, logits, decoder_tokens, encoder_tokens) -> torch.Tensor:
        from tokenloom.engine.beam import search_steps

        self.search = _EngineSearch(self, logits, decoder_tokens, encoder_tokens)
        self.steps, self.started = search_steps(self.search), False
        return self.search.first

    def advance(self, logits: torch.Tensor, usable: bool | None = None) -> Plan:
        """One step of the search on its rows' logits -> the reordered beams and their tokens."""
        try:
            if self.started:
                tokens = self.steps.send(logits)
            else:  # the first step reads the prefill's logits through _EngineSearch.prefill
                self.started, tokens = True, next(self.steps)
        except StopIteration as stop:
            for j, h in enumerate(stop.value[0]):
                seq = self.seqs[j]
                seq.token_ids, seq.finish_reason = list(h.token_ids), h.finish_reason
                if self.sink(j, seq.token_ids, h.finish_reason, None, h.score):
                    seq.finish_reason = "stop"
            self.live = []
            return Plan([], [])
        return Plan(self.search.pending_keep, tokens.tolist())


class _EngineSearch:
    """beam.py's `_Search` interface over the engine: the prefill is already done, reorders are
    handed to the engine, and `forward` never runs here (the engine batches it)."""

    def __init__(self, req: BeamRequest, logits, decoder_tokens, encoder_tokens):
        cfg, B = req.config, req.config.num_beams
        self.config, self.num_beams, self.device = cfg, B, req.device
        self.prompts, self.stop_set = [req.prompt], req.stop_set
        self.stop_ids = torch.tensor(sorted(req.stop_set), dtype=torch.long, device=req.device)
        self.max_new = [req.max_new]
        self.process = req.process
        self.prompt_tokens = torch.tensor([decoder_tokens] * B, device=req.device)
        self.encoder_tokens = None if encoder_tokens is None else torch.tensor([encoder_tokens] * B, device=req.device)
        self.first = logits.expand(B, -1)
        self.pending_keep = list(range(B))

    def prefill(self, rows):
        return self.first

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.pending_keep = rows.tolist()
        self.prompt_tokens = self.prompt_tokens.index_select(0, rows)
        if self.encoder_tokens is not None:
            self.encoder_tokens = self.encoder_tokens.index_select(0, rows)

    def hook(self, scores, generated, step, rows=None):
        from tokenloom.engine.beam import _Search
        return _Search.hook(self, scores, generated, step, rows)

    def result(self, tokens, score):
        from tokenloom.engine.beam import _Search
        return _Search.result(self, tokens, score)


class WholeRequest(Request):
    """Contrastive search: each step runs top_k candidates and compares hidden states, which the
    engine's batch does not carry, so it runs whole on its own cache when its turn comes (the
    other requests wait meanwhile)."""

    rows_needed = 0

    def _setup(self, model, vocab_size, tokenizer) -> None:
        self.seqs, self.live = [_Seq(0)], [0]
        self.model, self.tokenizer = model, tokenizer

    def run_whole(self, dtype, device) -> None:
        from tokenloom.engine.search import run_search

        for f in run_search(self.model, self.tokenizer, [self.prompt], self.config, dtype, device):
            seq = self.seqs[0]
            seq.token_ids, seq.finish_reason = list(f.token_ids), f.finish_reason
            if self.sink(0, seq.token_ids, f.finish_reason, None, f.score):
                seq.finish_reason = "stop"
        self.live = []


def make_request(rid, prompt, config: GenerationConfig, model, eos_ids, vocab_size, tokenizer=None, sink=None):
    cls = BeamRequest if config.num_beams > 1 else WholeRequest if config.penalty_alpha else Request
    return cls(rid, prompt, config, model, eos_ids, vocab_size, tokenizer, sink)
