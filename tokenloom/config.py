"""GenerationConfig: the one schema of generation parameters for Python, the CLI and HTTP.

Each field carries a one-line description and its allowed range; `validate()` checks them all
and raises `InvalidParameterError` naming the field, the value and the range. Values come from,
in increasing priority: these defaults, the model's `generation_config.json`, the caller.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable

from tokenloom.errors import InvalidParameterError, UnknownParameterError


def _param(default, doc: str, allowed: str, check: Callable[[Any], bool] | None = None, **kw):
    meta = {"doc": doc, "allowed": allowed, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(lo: int):
    return lambda v: _is_int(v) and v >= lo


def _int_list(v) -> bool:
    return isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)


# sampling filters, in the order they run by default (`sampler_order` changes it). Penalties
# and constraints always run first, then these, then the token is drawn.
DEFAULT_SAMPLER_ORDER = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                         "top_n_sigma", "xtc")


@dataclass
class GenerationConfig:
    max_new_tokens: int = _param(256, "Most tokens to generate per sequence.", "an integer >= 0", _int_at_least(0))
    min_new_tokens: int = _param(0, "End-of-sequence tokens are suppressed until this many tokens are generated.",
                                 "an integer >= 0", _int_at_least(0))
    do_sample: bool | None = _param(None, "Sample instead of greedy decoding; by default, sample iff a temperature > 0 is set.",
                                    "true, false or null", lambda v: v is None or isinstance(v, bool))
    temperature: float | None = _param(None, "Divide logits by this before sampling; 0 means greedy.",
                                       "a number >= 0", lambda v: v is None or (_is_num(v) and v >= 0))
    top_k: int | None = _param(None, "Sample only from the k most likely tokens; 0 or null disables it.",
                               "an integer >= 0", lambda v: v is None or _int_at_least(0)(v))
    top_p: float | None = _param(None, "Sample from the smallest set of tokens whose probability reaches top_p (nucleus).",
                                 "a number in (0, 1]", lambda v: v is None or (_is_num(v) and 0 < v <= 1))
    seed: int | None = _param(None, "Seed of the random generator; the same seed gives the same tokens.",
                              "an integer >= 0 or null", lambda v: v is None or _int_at_least(0)(v))
    stop: list[str] = _param([], "Strings that end generation; they are not part of the returned text.",
                             "a list of non-empty strings", lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v))
    stop_token_ids: list[int] = _param([], "Token ids that end generation, in addition to the model's end-of-sequence ids.",
                                       "a list of token ids", _int_list)
    eos_token_id: list[int] | None = _param(None, "End-of-sequence ids; null uses the model's.", "a list of token ids or null",
                                            lambda v: v is None or _int_list(v))
    ignore_eos: bool = _param(False, "Keep generating after end-of-sequence tokens.", "true or false",
                              lambda v: isinstance(v, bool))
    num_return_sequences: int = _param(1, "Sequences returned per prompt.", "an integer >= 1", _int_at_least(1))

    # ---- beam search and other search strategies
    num_beams: int = _param(1, "Beams of beam search; 1 disables it.", "an integer >= 1", _int_at_least(1))
    num_beam_groups: int = _param(1, "Groups for diverse beam search; must divide num_beams.", "an integer >= 1",
                                  _int_at_least(1))
    diversity_penalty: float = _param(0.0, "Diverse beam search: subtracted from a token's score per earlier group "
                                      "that chose it at this step.", "a number >= 0", lambda v: _is_num(v) and v >= 0)
    length_penalty: float = _param(1.0, "Beam search: finished scores are divided by length ** length_penalty.",
                                   "a finite number", _is_num)
    early_stopping: bool | str = _param(False, "Beam search stops: true when num_beams hypotheses are done; false "
                                        "when no better one is possible (heuristic); \"never\" when none is possible "
                                        "(exact).", 'true, false or "never"', lambda v: isinstance(v, bool) or v == "never")
    penalty_alpha: float | None = _param(None, "Contrastive search: weight of the degeneration penalty (with top_k > 1).",
                                         "a number in [0, 1] or null", lambda v: v is None or (_is_num(v) and 0 <= v <= 1))

    # ---- the logits chain (sampling filters)
    min_p: float | None = _param(None, "Drop tokens whose probability is below min_p times the top token's.",
                                 "a number in [0, 1]", lambda v: v is None or (_is_num(v) and 0 <= v <= 1))
    typical_p: float | None = _param(None, "Locally typical sampling: keep the tokens closest to the expected "
                                     "information, up to this mass.", "a number in (0, 1]",
                                     lambda v: v is None or (_is_num(v) and 0 < v <= 1))
    epsilon_cutoff: float | None = _param(None, "Drop tokens whose probability is below this.", "a number in [0, 1)",
                                          lambda v: v is None or (_is_num(v) and 0 <= v < 1))
    eta_cutoff: float | None = _param(None, "Eta sampling: drop tokens below min(eta, sqrt(eta) * exp(-entropy)).",
                                      "a number in [0, 1)", lambda v: v is None or (_is_num(v) and 0 <= v < 1))
    top_n_sigma: float | None = _param(None, "Keep tokens whose logit is within n standard deviations of the top logit.",
                                       "a number > 0", lambda v: v is None or (_is_num(v) and v > 0))
    xtc_threshold: float = _param(0.1, "XTC: tokens at or above this probability are candidates for exclusion.",
                                  "a number in [0, 1]", lambda v: _is_num(v) and 0 <= v <= 1)
    xtc_probability: float = _param(0.0, "XTC: chance per step to remove all candidates but the least likely one; "
                                    "0 disables XTC.", "a number in [0, 1]", lambda v: _is_num(v) and 0 <= v <= 1)
    dry_multiplier: float = _param(0.0, "DRY: strength of the penalty on tokens that extend a repeated sequence; "
                                   "0 disables DRY.", "a number >= 0", lambda v: _is_num(v) and v >= 0)
    dry_base: float = _param(1.75, "DRY: penalty = multiplier * base ** (repeat length - allowed length).",
                             "a number >= 1", lambda v: _is_num(v) and v >= 1)
    dry_allowed_length: int = _param(2, "DRY: repeats up to this long are not penalised.", "an integer >= 1",
                                     _int_at_least(1))
    dry_penalty_last_n: int = _param(-1, "DRY: how many recent tokens to scan; -1 means the whole context.",
                                     "an integer >= -1", _int_at_least(-1))
    dry_sequence_breakers: list[str] = _param(["\n", ":", "\"", "*"], "DRY: strings that end a repeated sequence.",
                                              "a list of strings", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v))
    mirostat: int = _param(0, "Mirostat mode: 0 off, 2 Mirostat 2.0 (replaces the other filters).", "0 or 2",
                           lambda v: v in (0, 2) and _is_int(v))
    mirostat_tau: float = _param(5.0, "Mirostat: target surprise (cross-entropy) in bits.", "a number > 0",
                                 lambda v: _is_num(v) and v > 0)
    mirostat_eta: float = _param(0.1, "Mirostat: learning rate.", "a number > 0", lambda v: _is_num(v) and v > 0)
    sampler_order: list[str] = _param(list(DEFAULT_SAMPLER_ORDER), "Order of the sampling filters; each name once.",
                                      "a permutation of a subset of: " + ", ".join(DEFAULT_SAMPLER_ORDER),
                                      lambda v: isinstance(v, list) and len(set(v)) == len(v)
                                      and all(x in DEFAULT_SAMPLER_ORDER for x in v))

    # ---- penalties and constraints
    repetition_penalty: float = _param(1.0, "Divide positive (multiply negative) logits of tokens already in the "
                                       "prompt or output by this.", "a number > 0", lambda v: _is_num(v) and v > 0)
    presence_penalty: float = _param(0.0, "Subtracted once from the logits of tokens already generated.",
                                     "a number in [-2, 2]", lambda v: _is_num(v) and -2 <= v <= 2)
    frequency_penalty: float = _param(0.0, "Subtracted per occurrence from the logits of tokens already generated.",
                                      "a number in [-2, 2]", lambda v: _is_num(v) and -2 <= v <= 2)
    no_repeat_ngram_size: int = _param(0, "No n-gram of this size may occur twice; 0 disables it.", "an integer >= 0",
                                       _int_at_least(0))
    encoder_no_repeat_ngram_size: int = _param(
        0, "Encoder-decoder models: no n-gram of this size from the encoder input may occur in the output; "
        "0 disables it.", "an integer >= 0", _int_at_least(0))
    bad_words_ids: list[list[int]] = _param([], "Token sequences that must never be generated.",
                                            "a list of non-empty lists of token ids",
                                            lambda v: isinstance(v, list) and all(_int_list(x) and x for x in v))
    logit_bias: dict[int, float] = _param({}, "Added to the logits of the given token ids.",
                                          "a mapping of token id to a finite number",
                                          lambda v: isinstance(v, dict) and all(_is_int(k) and k >= 0 and _is_num(x)
                                                                                for k, x in v.items()))
    suppress_tokens: list[int] = _param([], "Token ids that are never generated.", "a list of token ids", _int_list)
    forced_bos_token_id: int | None = _param(None, "Token id forced as the first generated token.",
                                             "a token id or null", lambda v: v is None or _int_at_least(0)(v))
    forced_eos_token_id: list[int] | None = _param(None, "Token id(s) forced when max_new_tokens is reached.",
                                                   "a list of token ids or null", lambda v: v is None or _int_list(v))
    exponential_decay_length_penalty: list[float] | None = _param(
        None, "[start, factor]: after start generated tokens, end-of-sequence logits grow by factor ** (steps past start).",
        "null or [an integer >= 0, a number > 1]",
        lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2 and _int_at_least(0)(v[0])
                                and _is_num(v[1]) and v[1] > 1))

    # ---- stopping and outputs
    include_stop_str_in_output: bool = _param(False, "Keep the stop string that ended a sequence in its text.",
                                              "true or false", lambda v: isinstance(v, bool))
    max_time: float | None = _param(None, "Seconds after which generation stops (finish reason \"time\").",
                                    "a number > 0 or null", lambda v: v is None or (_is_num(v) and v > 0))
    stop_on_loop: int | None = _param(None, "Stop a sequence (finish reason \"loop\") once its end repeats one "
                                      "block of tokens this many times in a row.", "an integer >= 2 or null",
                                      lambda v: v is None or _int_at_least(2)(v))
    logprobs: int | None = _param(None, "Return each generated token's logprob and this many top alternatives, "
                                  "both raw (the model's) and processed (after the logits chain).",
                                  "an integer in [0, 20] or null", lambda v: v is None or (_is_int(v) and 0 <= v <= 20))
    prompt_logprobs: int | None = _param(None, "Return the prompt tokens' logprobs and this many top alternatives.",
                                         "an integer in [0, 20] or null",
                                         lambda v: v is None or (_is_int(v) and 0 <= v <= 20))

    # accepted spellings from other APIs (OpenAI, vLLM, llama.cpp)
    ALIASES = {"max_tokens": "max_new_tokens", "n": "num_return_sequences", "min_tokens": "min_new_tokens",
               "stop_sequences": "stop"}

    # ------------------------------------------------------------------ construction

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, params: dict[str, Any], base: "GenerationConfig | None" = None) -> "GenerationConfig":
        """Overlay `params` (aliases accepted, unknown names refused) on `base` and validate."""
        names = set(cls.field_names())
        updates: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for key, value in params.items():
            name = cls.ALIASES.get(key, key)
            if name not in names:
                raise UnknownParameterError(key, value, ", ".join(sorted(names)))
            if name in given_as:
                raise InvalidParameterError(key, value, f"only one of '{given_as[name]}' and '{key}'")
            given_as[name] = key
            updates[name] = _normalise(name, value)
        config = replace(base or cls(), **updates)
        config.validate()
        return config

    @classmethod
    def from_model_defaults(cls, generation_config: dict[str, Any]) -> "GenerationConfig":
        """Defaults from a checkpoint's generation_config.json; keys we do not know are skipped."""
        names = set(cls.field_names())
        picked = {k: _normalise(k, v) for k, v in generation_config.items() if k in names and v is not None}
        if picked.get("top_k") == 0:
            picked["top_k"] = None
        config = replace(cls(), **picked)
        config.validate()
        return config

    def validate(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is not None and not check(value):
                raise InvalidParameterError(f.name, value, f.metadata["allowed"])
        if self.min_new_tokens > self.max_new_tokens:
            raise InvalidParameterError("min_new_tokens", self.min_new_tokens,
                                        f"an integer <= max_new_tokens ({self.max_new_tokens})")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise InvalidParameterError("num_return_sequences", self.num_return_sequences,
                                        f"an integer <= num_beams ({self.num_beams}) with beam search")
        if self.num_beams % self.num_beam_groups:
            raise InvalidParameterError("num_beam_groups", self.num_beam_groups,
                                        f"a divisor of num_beams ({self.num_beams})")
        if self.diversity_penalty and self.num_beam_groups == 1:
            raise InvalidParameterError("diversity_penalty", self.diversity_penalty,
                                        "0 unless num_beam_groups > 1")
        if self.num_beam_groups > 1 and self.sampling:
            raise InvalidParameterError("num_beam_groups", self.num_beam_groups,
                                        "1 when sampling (diverse beam search is deterministic)")
        if (self.num_beams > 1 or self.penalty_alpha) and self.logprobs is not None:
            raise InvalidParameterError("logprobs", self.logprobs, "null with beam or contrastive search")
        if self.penalty_alpha and self.num_return_sequences > 1:
            raise InvalidParameterError("num_return_sequences", self.num_return_sequences,
                                        "1 with contrastive search (it is deterministic)")
        if self.penalty_alpha and self.num_beams > 1:
            raise InvalidParameterError("penalty_alpha", self.penalty_alpha, "0 or null with beam search")
        if self.penalty_alpha and not (self.top_k and self.top_k > 1):
            raise InvalidParameterError("top_k", self.top_k, "an integer > 1 with contrastive search (penalty_alpha)")

    # ------------------------------------------------------------------ derived

    @property
    def sampling(self) -> bool:
        """Whether tokens are sampled (else greedy)."""
        if self.temperature == 0:
            return False
        if self.do_sample is not None:
            return self.do_sample
        return self.temperature is not None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str, str]]:
        """(name, default, allowed, description) of every field, for --help and documentation."""
        out = []
        for f in fields(cls):
            default = f.default_factory() if f.default is MISSING else f.default
            out.append((f.name, default, f.metadata["allowed"], f.metadata["doc"]))
        return out


def _normalise(name: str, value: Any) -> Any:
    """Accept the common shorthands: a single stop string or id instead of a list."""
    if name == "stop" and isinstance(value, str):
        return [value]
    if name == "stop" and value is None:
        return []
    if name in ("eos_token_id", "stop_token_ids") and _is_int(value):
        return [value]
    if name == "stop_token_ids" and value is None:
        return []
    if name == "logit_bias" and isinstance(value, dict):  # JSON object keys are strings
        return {int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else k: v for k, v in value.items()}
    if name == "exponential_decay_length_penalty" and isinstance(value, tuple):
        return list(value)
    if name == "forced_eos_token_id" and _is_int(value):
        return [value]
    if name == "bad_words_ids" and value is None:
        return []
    if name in _FLOAT_FIELDS and _is_int(value):
        return float(value)
    return value


_FLOAT_FIELDS = {"temperature", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_n_sigma",
                 "xtc_threshold", "xtc_probability", "dry_multiplier", "dry_base", "mirostat_tau", "mirostat_eta",
                 "repetition_penalty", "presence_penalty", "frequency_penalty", "length_penalty",
                 "diversity_penalty", "penalty_alpha", "max_time"}
