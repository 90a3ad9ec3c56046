"""GenerationConfig: the one schema of generation parameters for Python, the CLI and HTTP.

Each field carries a one-line description and its allowed range; `validate()` checks them all
and raises `InvalidParameterError` naming the field, the value and the range. Values come from,
in increasing priority: these defaults, the model's `generation_config.json`, the caller.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable

from tokenloom.errors import InvalidParameterError


def _param(default, doc: str, allowed: str, check: Callable[[Any], bool] | None = None, **kw):
    meta = {"doc": doc, "allowed": allowed, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(lo: int):
    return lambda v: _is_int(v) and v >= lo


def _int_list(v) -> bool:
    return isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)


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
                raise InvalidParameterError(key, value, "a known generation parameter; unknown parameter "
                                            f"(known: {', '.join(sorted(names))})")
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
    if name in ("temperature", "top_p") and _is_int(value):
        return float(value)
    return value
