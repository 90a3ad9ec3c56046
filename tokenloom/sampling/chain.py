"""The logits chain of one request: built once from a GenerationConfig, applied at every step.

Only the steps whose parameters differ from their defaults are built, so a default request costs
nothing per token (`is_noop`). The order, per step:

1. penalties and constraints (also when decoding greedily, as transformers does), in transformers'
   `_get_logits_processor` order, with the processors it lacks slotted next to their kin:
   logit_bias (SequenceBias), repetition_penalty, presence/frequency penalties (OpenAI; generated
   tokens only), DRY (llama.cpp), no_repeat_ngram_size, encoder_no_repeat_ngram_size (encoder-decoder
   models), bad_words_ids, min_new_tokens, forced_bos_token_id, forced_eos_token_id,
   exponential_decay_length_penalty, suppress_tokens;
2. only when sampling, the filters in `config.sampler_order` (default: temperature, top_k, top_p,
   min_p, typical_p, epsilon_cutoff, eta_cutoff, top_n_sigma, xtc; transformers' warper order,
   extended). With `mirostat=2` this stage is temperature then Mirostat 2 instead (as llama.cpp's
   common sampler builds it), and the other filters are not used;
3. the draw: argmax, or a multinomial per row with the row's own torch.Generator.

All randomness (XTC's coin, the draw, Mirostat's draw) comes from the per-row generators, in that
order, so a row's tokens depend only on its own seed and logits.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from tokenloom.config import GenerationConfig
from tokenloom.errors import InvalidParameterError
from tokenloom.sampling import processors as P
from tokenloom.sampling.sampler import greedy, sample


@dataclass
class SamplingState:
    tokens: torch.Tensor          # (B, L) long: each row's prompt + generated ids so far, LEFT-padded with -1
    prompt_lens: torch.Tensor     # (B,) long: prompt length of each row
    step: int                     # tokens generated so far (the same for all live rows)
    max_new_tokens: torch.Tensor  # (B,) long: each row's own limit
    generators: list[torch.Generator] | None = None  # one per row when sampling
    encoder_tokens: torch.Tensor | None = None  # (B, S) long: encoder-decoder models' encoder input ids, RIGHT-
    # padded with -1; one row per row of `tokens`, or per group of consecutive rows (beams of one input)

    def generated(self) -> torch.Tensor:
        """(B, step) the generated ids (the last `step` columns)."""
        return self.tokens[:, self.tokens.shape[1] - self.step:]


Step = Callable[[torch.Tensor, SamplingState], torch.Tensor]


class LogitsChain:
    """Penalties, constraints and sampling filters of one request, then the choice of the next token."""

    def __init__(self, config: GenerationConfig, eos_ids: list[int], vocab_size: int, tokenizer=None):
        self.config, self.vocab_size = config, vocab_size
        self.eos_ids = sorted(set(eos_ids))
        self.sampling = config.sampling
        self.mirostat = self.sampling and config.mirostat == 2
        self.mu: torch.Tensor | None = None  # (B,) Mirostat state, made on first use
        self.min_keep = 2 if config.num_beams > 1 else 1  # as transformers, so beams always have a choice
        self.penalties: list[Step] = self._build_penalties(tokenizer)
        self.filters: list[Step] = self._build_filters() if self.sampling else []
        self._uses_rng = any(getattr(f, "uses_rng", False) for f in self.filters)

    # ------------------------------------------------------------------ building

    def _ids(self, name: str, ids) -> torch.Tensor:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidParameterError(name, getattr(self.config, name), f"token ids below the vocabulary size "
                                        f"({self.vocab_size}); out of range: {bad}")
        return torch.tensor(sorted(set(ids)), dtype=torch.long)

    def _build_penalties(self, tokenizer) -> list[Step]:
        c, steps = self.config, []
        if c.logit_bias:
            ids = self._ids("logit_bias", list(c.logit_bias))
            bias = torch.zeros(self.vocab_size)
            bias[ids] = torch.tensor([float(c.logit_bias[int(i)]) for i in ids])
            steps.append(lambda x, s: x + bias.to(x.device, x.dtype))
        if c.repetition_penalty != 1.0:
            steps.append(lambda x, s: P.repetition_penalty(x, s.tokens, c.repetition_penalty))
        if c.presence_penalty or c.frequency_penalty:
            steps.append(lambda x, s: P.presence_frequency_penalty(x, s.generated(), c.presence_penalty,
                                                                    c.frequency_penalty) if s.step else x)
        if c.dry_multiplier and c.dry_penalty_last_n != 0:
            breakers = dry_breakers(tokenizer, c.dry_sequence_breakers, self.vocab_size)
            steps.append(lambda x, s: P.dry(x, s.tokens, c.dry_multiplier, c.dry_base, c.dry_allowed_length,
                                            c.dry_penalty_last_n, breakers))
        if c.no_repeat_ngram_size:
            steps.append(lambda x, s: P.no_repeat_ngram(x, s.tokens, c.no_repeat_ngram_size))
        if c.encoder_no_repeat_ngram_size:
            steps.append(lambda x, s: P.encoder_no_repeat_ngram(x, s.tokens, _encoder_rows(s, x.shape[0], c),
                                                                c.encoder_no_repeat_ngram_size))
        bad = [tuple(w) for w in c.bad_words_ids if not (len(w) == 1 and w[0] in self.eos_ids)]  # as transformers
        if bad:
            self._ids("bad_words_ids", [t for w in bad for t in w])
            single, multi = P.prepare_sequence_bias({w: float("-inf") for w in bad}, self.vocab_size)
            steps.append(lambda x, s: P.sequence_bias(x, s.tokens, single.to(x.device), multi))
        eos = torch.tensor(self.eos_ids, dtype=torch.long)
        if c.min_new_tokens and self.eos_ids:
            steps.append(lambda x, s: P.suppress(x, eos.to(x.device)) if s.step < c.min_new_tokens else x)
        if c.forced_bos_token_id is not None:
            bos = self._ids("forced_bos_token_id", [c.forced_bos_token_id])
            steps.append(lambda x, s: P.force(x, bos.to(x.device)) if s.step == 0 else x)
        if c.forced_eos_token_id is not None:
            feos = self._ids("forced_eos_token_id", c.forced_eos_token_id)

            def forced_eos(x, s):
                rows = s.max_new_tokens.to(x.device) - 1 == s.step
                return P.force(x, feos.to(x.device), rows) if bool(rows.any()) else x
            steps.append(forced_eos)
        if c.exponential_decay_length_penalty is not None and self.eos_ids:
            start, factor = int(c.exponential_decay_length_penalty[0]), float(c.exponential_decay_length_penalty[1])
            steps.append(lambda x, s: P.exponential_decay_length_penalty(x, eos.to(x.device), start, factor, s.step))
        if c.suppress_tokens:
            sup = self._ids("suppress_tokens", c.suppress_tokens)
            steps.append(lambda x, s: P.suppress(x, sup.to(x.device)))
        return steps

    def _build_filters(self) -> list[Step]:
        c, k = self.config, self.min_keep
        built: dict[str, Step] = {}
        if c.temperature is not None and c.temperature != 1.0:
            built["temperature"] = lambda x, s: P.temperature(x, c.temperature)
        if self.mirostat:  # Mirostat 2 replaces the other filters (applied in choose())
            return list(built.values())
        if c.top_k:
            built["top_k"] = lambda x, s: P.top_k(x, c.top_k, k)
        if c.top_p is not None and c.top_p < 1.0:
            built["top_p"] = lambda x, s: P.top_p(x, c.top_p, k)
        if c.min_p:
            built["min_p"] = lambda x, s: P.min_p(x, c.min_p, k)
        if c.typical_p is not None and c.typical_p < 1.0:
            built["typical_p"] = lambda x, s: P.typical_p(x, c.typical_p, k)
        if c.epsilon_cutoff:
            built["epsilon_cutoff"] = lambda x, s: P.epsilon_cutoff(x, c.epsilon_cutoff, k)
        if c.eta_cutoff:
            built["eta_cutoff"] = lambda x, s: P.eta_cutoff(x, c.eta_cutoff, k)
        if c.top_n_sigma is not None:
            built["top_n_sigma"] = lambda x, s: P.top_n_sigma(x, c.top_n_sigma)
        if c.xtc_probability > 0 and c.xtc_threshold <= 0.5:  # above 0.5 XTC can never act (llama.cpp)
            def xtc(x, s):
                if s.generators is None:
                    raise ValueError("XTC needs the per-row generators in SamplingState")
                chance = torch.cat([torch.rand(1, generator=g, device=g.device) for g in s.generators])
                return P.xtc(x, c.xtc_threshold, c.xtc_probability, chance.to(x.device))
            xtc.uses_rng = True
            built["xtc"] = xtc
        return [built[name] for name in c.sampler_order if name in built]

    # ------------------------------------------------------------------ use

    @property
    def is_noop(self) -> bool:
        """Nothing to do beyond argmax / plain sampling: the loop may skip process()."""
        return not self.penalties and not self.filters and not self.mirostat

    def process(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """Penalties and constraints, then (only when sampling) the filters. Returns new (B, V) logits."""
        for step in self.penalties:
            logits = step(logits, state)
        for step in self.filters:
            logits = step(logits, state)
        return logits

    def choose(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """process(), then draw() -> (B,) ids."""
        return self.draw(self.process(logits, state), state)

    def draw(self, processed: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """Argmax, a seeded multinomial per row, or Mirostat 2, on already processed logits -> (B,) ids."""
        if not self.sampling:
            return greedy(processed)
        if state.generators is None or len(state.generators) != processed.shape[0]:
            raise ValueError("sampling needs one generator per row in SamplingState.generators")
        if self.mirostat:
            return self._mirostat(processed, state.generators)
        return sample(processed, state.generators)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Rows left, were reordered or repeated (finished rows, beam search): keep per-row state in step."""
        if self.mu is not None:
            self.mu = self.mu.index_select(0, rows.to(self.mu.device))

    def _mirostat(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """llama.cpp's Mirostat 2: truncate at surprise mu, draw, then mu -= eta * (surprise - tau)."""
        c = self.config
        if self.mu is None:
            self.mu = torch.full((logits.shape[0],), 2 * c.mirostat_tau, dtype=torch.float32, device=logits.device)
        kept = P.mirostat2_truncate(logits.float(), self.mu)
        ids = sample(kept, generators)
        probs = kept.softmax(dim=-1).gather(1, ids[:, None].to(kept.device))[:, 0]
        self.mu = self.mu - c.mirostat_eta * (-torch.log2(probs) - c.mirostat_tau)
        return ids


def _encoder_rows(state: SamplingState, rows: int, config: GenerationConfig) -> torch.Tensor:
    """(rows, S) encoder ids for the logits' rows: as given, or each repeated for its group of beams."""
    enc = state.encoder_tokens
    if enc is None:
        raise InvalidParameterError("encoder_no_repeat_ngram_size", config.encoder_no_repeat_ngram_size,
                                    "available only for encoder-decoder models")
    if enc.shape[0] == rows:
        return enc
    if enc.shape[0] and rows % enc.shape[0] == 0:
        return enc.repeat_interleave(rows // enc.shape[0], dim=0)
    raise ValueError(f"SamplingState.encoder_tokens has {enc.shape[0]} rows for {rows} rows of logits")


# ---------------------------------------------------------------------------------------- DRY breakers

_MAX_BREAKER_CHARS = 40  # llama.cpp's limits on sequence breakers
_MAX_BREAKER_TAIL = 20
_vocab_texts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _token_texts(tokenizer, vocab_size: int) -> list[str | None]:
    """Each token id's text (special tokens rendered, as llama.cpp does); None where it has none."""
    try:
        cached = _vocab_texts.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and len(cached) >= vocab_size:
        return cached
    texts: list[str | None] = []
    for i in range(vocab_size):
        try:
            try:
                texts.append(tokenizer.decode([i], skip_special_tokens=False))
            except TypeError:
                texts.append(tokenizer.decode([i]))
        except Exception:  # ids past the tokenizer's vocabulary (padded output heads)
            texts.append(None)
    try:
        _vocab_texts[tokenizer] = texts
    except TypeError:
        pass
    return texts


def dry_breakers(tokenizer, strings: list[str], vocab_size: int) -> dict[int, list[tuple[int, ...]]]:
    """llama.cpp's `get_overlapping_token_sequences`: head token -> tails.

    A token whose text contains a breaker string is a breaker on its own (empty tail). A token whose
    text ends with the start of a breaker string is a head, whose tail is the tokenization of the rest.
    """
    strings = [s[:_MAX_BREAKER_CHARS] for s in strings if s]
    if not strings:
        return {}
    if tokenizer is None:
        raise ValueError("DRY sequence breakers need a tokenizer (pass tokenizer= to LogitsChain, "
                         "or dry_sequence_breakers=[])")
    texts = _token_texts(tokenizer, vocab_size)
    out: dict[int, list[tuple[int, ...]]] = {}
    for s in strings:
        for tok, word in enumerate(texts):
            if not word:
                continue
            if s in word:
                tails = out.setdefault(tok, [])
                if () not in tails:
                    tails.append(())
                continue
            pos = word.find(s[0])
            while pos != -1:
                rest = len(word) - pos  # chars of the word from pos on; the word must end inside s
                if rest < len(s) and word[pos:] == s[:rest]:
                    tail = tuple(tokenizer.encode(s[rest:], add_special_tokens=False)[:_MAX_BREAKER_TAIL])
                    tails = out.setdefault(tok, [])
                    if tail not in tails:
                        tails.append(tail)
                pos = word.find(s[0], pos + 1)
    return out
