"""GenerationConfig: aliases, model defaults, and errors that name field, value and range."""

import math

import pytest

from tokenloom.config import GenerationConfig
from tokenloom.errors import InvalidParameterError


@pytest.mark.parametrize("field,value,phrase", [
    ("max_new_tokens", -1, "an integer >= 0"),
    ("max_new_tokens", 1.5, "an integer >= 0"),
    ("temperature", -0.5, "a number >= 0"),
    ("temperature", math.nan, "a number >= 0"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_k", -3, "an integer >= 0"),
    ("num_return_sequences", 0, "an integer >= 1"),
    ("seed", -1, ">= 0"),
    ("stop", [""], "non-empty strings"),
])
def test_invalid_values_name_field_value_and_range(field, value, phrase):
    with pytest.raises(InvalidParameterError) as e:
        GenerationConfig.from_dict({field: value})
    assert e.value.field == field
    assert f"'{field}'" in str(e.value) and repr(value) in str(e.value) and phrase in str(e.value)


def test_unknown_parameter_is_refused():
    with pytest.raises(InvalidParameterError, match="unknown parameter") as e:
        GenerationConfig.from_dict({"temprature": 0.5})
    assert e.value.field == "temprature"


def test_aliases_and_shorthands():
    c = GenerationConfig.from_dict({"max_tokens": 7, "n": 3, "stop": "END", "temperature": 1})
    assert (c.max_new_tokens, c.num_return_sequences, c.stop, c.temperature) == (7, 3, ["END"], 1.0)
    with pytest.raises(InvalidParameterError, match="only one of"):
        GenerationConfig.from_dict({"max_tokens": 7, "max_new_tokens": 8})


def test_min_new_tokens_cannot_exceed_max():
    with pytest.raises(InvalidParameterError, match="min_new_tokens"):
        GenerationConfig.from_dict({"min_new_tokens": 10, "max_new_tokens": 5})


def test_sampling_rule():
    assert not GenerationConfig().sampling
    assert GenerationConfig.from_dict({"temperature": 0.7}).sampling
    assert not GenerationConfig.from_dict({"temperature": 0.0, "do_sample": True}).sampling
    assert GenerationConfig.from_dict({"do_sample": True}).sampling
    assert not GenerationConfig.from_dict({"temperature": 0.7, "do_sample": False}).sampling


def test_model_defaults_then_caller():
    base = GenerationConfig.from_model_defaults({"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                                 "max_length": 20, "transformers_version": "5"})
    assert base.sampling and base.temperature == 0.6 and base.top_p == 0.9
    c = GenerationConfig.from_dict({"temperature": 0.0}, base=base)
    assert not c.sampling and c.top_p == 0.9


def test_describe_documents_every_field():
    described = {name: (allowed, doc) for name, _, allowed, doc in GenerationConfig.describe()}
    assert set(described) == set(GenerationConfig.field_names())
    assert all(allowed and doc for allowed, doc in described.values())
