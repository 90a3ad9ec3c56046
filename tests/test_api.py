"""The Python API: `tokenloom.load`, `Model.generate` and `Model.stream`, and their errors.

Runs on tiny random checkpoint folders (tests/tiny.py): their text is gibberish, so the tests
check invariants (stream == generate, ids decode to the text, stop strings cut where the first
greedy run says they occur, seeds reproduce) rather than particular words. The real SmolLM2
checks at the bottom are marked slow.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import tokenloom
from tests.tiny import save_tiny
from tokenloom.errors import (CheckpointError, GGUFError, InvalidParameterError, ModelLoadError, ModelNotFoundError,
                              PromptError, TokenizerError, TokenloomError, UnsupportedArchitectureError)
from tokenloom.outputs import Generation

MODEL_TYPES = ["llama", "gpt2", "gemma3_text", "qwen2"]
PROMPT = "Once upon a time"
PROMPTS = ["Once upon a time", "The quick brown fox", "def add(a, b):"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api")
    for model_type in MODEL_TYPES:
        save_tiny(model_type, root / model_type)
    return root


@pytest.fixture(scope="module")
def models(tiny_root) -> dict:
    return {t: tokenloom.load(tiny_root / t) for t in MODEL_TYPES}


@pytest.fixture(scope="module")
def llama(models):
    return models["llama"]


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def joined(deltas) -> tuple[dict[int, str], dict[int, list[int]], dict[int, str | None]]:
    """Per sequence index: the streamed text, the streamed ids and the last finish_reason."""
    texts, ids, reasons = {}, {}, {}
    for d in deltas:
        assert isinstance(d.text, str)
        assert reasons.get(d.index) is None, "a delta came after the sequence's finishing delta"
        texts[d.index] = texts.get(d.index, "") + d.text
        ids.setdefault(d.index, []).extend(d.token_ids)
        reasons[d.index] = d.finish_reason
    return texts, ids, reasons


def clean_substring(text: str, start: int, size: int = 2) -> str:
    """A substring of `text` at or after `start` with no replacement character."""
    for i in range(start, len(text) - size + 1):
        s = text[i:i + size]
        if "\ufffd" not in s:
            return s
    raise AssertionError(f"no clean substring in {text!r}")


# ---------------------------------------------------------------------------------- generate / stream


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_generate_returns_a_generation_whose_ids_decode_to_its_text(models, model_type):
    model = models[model_type]
    g = model.generate(PROMPT, max_new_tokens=16)
    assert isinstance(g, Generation)
    assert g.finish_reason in ("stop", "length")
    assert 1 <= len(g.token_ids) <= 16
    if g.finish_reason == "length":
        assert len(g.token_ids) == 16
    assert all(isinstance(t, int) and 0 <= t < model.tokenizer.vocab_size for t in g.token_ids)
    assert model.tokenizer.decode(g.token_ids) == g.text
    assert g.prompt_tokens == len(model.tokenizer.encode(PROMPT))
    # greedy is deterministic
    assert model.generate(PROMPT, max_new_tokens=16) == g


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_stream_joined_equals_generate(models, model_type):
    model = models[model_type]
    g = model.generate(PROMPT, max_new_tokens=20)
    texts, ids, reasons = joined(model.stream(PROMPT, max_new_tokens=20))
    assert texts == {0: g.text} and ids == {0: g.token_ids} and reasons == {0: g.finish_reason}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sampled_stream_of_three_sequences_equals_generate(models, model_type):
    model = models[model_type]
    params = dict(max_new_tokens=12, num_return_sequences=3, seed=1, temperature=1.0)
    gs = model.generate(PROMPT, **params)
    assert [g.index for g in gs] == [0, 1, 2] and all(g.prompt_index == 0 for g in gs)
    texts, ids, reasons = joined(model.stream(PROMPT, **params))
    assert texts == {g.index: g.text for g in gs}
    assert ids == {g.index: g.token_ids for g in gs}
    assert reasons == {g.index: g.finish_reason for g in gs}
    for g in gs:
        assert model.tokenizer.decode(g.token_ids) == g.text
    assert len({tuple(g.token_ids) for g in gs}) > 1, "three sampled sequences are all the same"


def test_batch_stream_equals_generate_and_each_prompt_alone(llama):
    gs = llama.generate(PROMPTS, max_new_tokens=10)
    assert isinstance(gs, list) and len(gs) == len(PROMPTS)
    assert [g.prompt_index for g in gs] == [0, 1, 2]
    for p, g in zip(PROMPTS, gs):
        alone = llama.generate(p, max_new_tokens=10)
        assert (g.text, g.token_ids, g.finish_reason) == (alone.text, alone.token_ids, alone.finish_reason)
    texts, ids, reasons = joined(llama.stream(PROMPTS, max_new_tokens=10))
    assert texts == {g.index: g.text for g in gs}
    assert ids == {g.index: g.token_ids for g in gs}


def test_a_list_of_one_prompt_gives_a_list(llama):
    out = llama.generate([PROMPT], max_new_tokens=3)
    assert isinstance(out, list) and len(out) == 1
    assert out[0].token_ids == llama.generate(PROMPT, max_new_tokens=3).token_ids


def test_batch_with_several_sequences_is_prompt_major(llama):
    gs = llama.generate(PROMPTS[:2], max_new_tokens=6, num_return_sequences=2, seed=3, temperature=1.0)
    assert [(g.index, g.prompt_index) for g in gs] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    alone = llama.generate(PROMPTS[1], max_new_tokens=6, num_return_sequences=2, seed=3, temperature=1.0)
    assert [g.token_ids for g in gs[2:]] == [g.token_ids for g in alone]


@pytest.mark.parametrize("n", [1, 7, 30])
def test_max_new_tokens_gives_exactly_that_many_ids_and_length(llama, n):
    g = llama.generate(PROMPT, max_new_tokens=n, ignore_eos=True)
    assert len(g.token_ids) == n
    assert g.finish_reason == "length"


def test_max_new_tokens_zero(llama):
    g = llama.generate(PROMPT, max_new_tokens=0)
    assert (g.text, g.token_ids, g.finish_reason) == ("", [], "length")


def test_alias_max_tokens(llama):
    assert len(llama.generate(PROMPT, max_tokens=4, ignore_eos=True).token_ids) == 4


def test_generation_stops_at_the_end_of_the_context_window(llama):
    prompt = "~" * 120  # one token per "~" with the tiny tokenizer; the window is 128
    assert len(llama.tokenizer.encode(prompt)) == 120
    g = llama.generate(prompt, max_new_tokens=50, ignore_eos=True)
    assert len(g.token_ids) == 128 - 120 and g.finish_reason == "length"
    g = llama.generate("~" * 127, max_new_tokens=50, ignore_eos=True)
    assert len(g.token_ids) == 1 and g.finish_reason == "length"


# ---------------------------------------------------------------------------------- stop strings / ids


@pytest.fixture(scope="module")
def free_run(llama):
    """A greedy run that ignores end-of-sequence: where stop strings and ids will surely occur."""
    g = llama.generate(PROMPT, max_new_tokens=30, ignore_eos=True)
    assert len(g.token_ids) == 30
    return g


def test_stop_string_is_excluded_and_finishes_with_stop(llama, free_run):
    stop = clean_substring(free_run.text, len(free_run.text) // 2)
    cut = free_run.text.find(stop)
    g = llama.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert g.text == free_run.text[:cut]
    assert stop not in g.text
    assert g.finish_reason == "stop"
    assert len(g.token_ids) < 30
    assert g.token_ids == free_run.token_ids[:len(g.token_ids)]  # same run, ended early
    assert llama.tokenizer.decode(g.token_ids).startswith(g.text + stop)
    # the stop string's first token ends it: one token less no longer contains it
    assert stop not in llama.tokenizer.decode(g.token_ids[:-1]).replace("\ufffd", "")
    texts, ids, reasons = joined(llama.stream(PROMPT, max_new_tokens=30, ignore_eos=True, stop=stop))
    assert texts == {0: g.text} and ids == {0: g.token_ids} and reasons == {0: "stop"}


def test_the_earliest_of_several_stop_strings_wins(llama, free_run):
    text = free_run.text
    early = clean_substring(text, len(text) // 3)
    late = clean_substring(text, 2 * len(text) // 3, size=3)
    if text.find(late) < text.find(early):
        early, late = late, early
    g = llama.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stop=[late, early])
    assert g.text == text[:text.find(early)] and g.finish_reason == "stop"


def test_stop_string_absent_changes_nothing(llama, free_run):
    g = llama.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stop=["this is not in the text"])
    assert (g.text, g.token_ids, g.finish_reason) == (free_run.text, free_run.token_ids, "length")


def test_stop_string_on_the_last_allowed_token_still_finishes_with_stop(llama, free_run):
    stop = clean_substring(free_run.text, len(free_run.text) // 2)
    k = len(llama.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stop=[stop]).token_ids)
    g = llama.generate(PROMPT, max_new_tokens=k, ignore_eos=True, stop=[stop])
    assert len(g.token_ids) == k and stop not in g.text
    assert g.finish_reason == "stop"


def first_positions(ids: list[int]) -> dict[int, int]:
    pos: dict[int, int] = {}
    for i, t in enumerate(ids):
        pos.setdefault(t, i)
    return pos


def test_several_eos_ids_end_at_the_first_one_generated(llama, free_run):
    pos = first_positions(free_run.token_ids)
    a, b = free_run.token_ids[20], free_run.token_ids[8]
    end = min(pos[a], pos[b])
    g = llama.generate(PROMPT, max_new_tokens=30, eos_token_id=[a, b])
    assert g.token_ids == free_run.token_ids[:end + 1]  # the EOS id that ended it is included
    assert g.finish_reason == "stop"
    # stop_token_ids add to the model's EOS ids
    g = llama.generate(PROMPT, max_new_tokens=30, stop_token_ids=[b])
    assert g.token_ids == free_run.token_ids[:pos[b] + 1] and g.finish_reason == "stop"
    # ignore_eos keeps going past them
    g = llama.generate(PROMPT, max_new_tokens=30, eos_token_id=[a, b], ignore_eos=True)
    assert g.token_ids == free_run.token_ids


def test_min_new_tokens_suppresses_eos_ids(llama, free_run):
    pos = first_positions(free_run.token_ids)
    eos = free_run.token_ids[3]
    k = pos[eos] + 3
    g = llama.generate(PROMPT, max_new_tokens=30, eos_token_id=[eos], min_new_tokens=k)
    assert len(g.token_ids) >= k
    assert eos not in g.token_ids[:k]
    assert g.token_ids[:pos[eos]] == free_run.token_ids[:pos[eos]]  # unchanged before the suppression


# ---------------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible_and_seeds_differ(llama):
    params = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, ignore_eos=True)
    a = llama.generate(PROMPT, seed=3, **params)
    b = llama.generate(PROMPT, seed=3, **params)
    c = llama.generate(PROMPT, seed=4, **params)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids
    texts, ids, _ = joined(llama.stream(PROMPT, seed=3, **params))
    assert texts == {0: a.text} and ids == {0: a.token_ids}


def test_sampling_without_a_seed_varies_and_greedy_does_not(llama):
    runs = {tuple(llama.generate(PROMPT, max_new_tokens=16, temperature=1.5, ignore_eos=True).token_ids)
            for _ in range(3)}
    assert len(runs) > 1
    greedy = llama.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids
    assert llama.generate(PROMPT, max_new_tokens=16, temperature=0, seed=5, ignore_eos=True).token_ids == greedy


def test_top_k_one_is_greedy(llama):
    greedy = llama.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids
    for seed in (1, 2):
        g = llama.generate(PROMPT, max_new_tokens=16, temperature=1.0, top_k=1, seed=seed, ignore_eos=True)
        assert g.token_ids == greedy


def test_generation_config_object_and_dict_are_accepted(llama):
    cfg = tokenloom.GenerationConfig.from_dict({"max_new_tokens": 4, "ignore_eos": True})
    assert len(llama.generate(PROMPT, cfg).token_ids) == 4
    assert len(llama.generate(PROMPT, {"max_new_tokens": 3, "ignore_eos": True}).token_ids) == 3
    assert len(llama.generate(PROMPT, cfg, max_new_tokens=2).token_ids) == 2  # keywords win


# ---------------------------------------------------------------------------------- model defaults


def test_generation_config_json_defaults_apply_and_call_kwargs_override(tiny_root, tmp_path, llama):
    folder = copy_of(tiny_root / "llama", tmp_path / "llama5")
    gen_cfg = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen_cfg, "max_new_tokens": 5}))
    model = tokenloom.load(folder)
    assert model.defaults.max_new_tokens == 5
    g = model.generate(PROMPT, ignore_eos=True)
    assert len(g.token_ids) == 5 and g.finish_reason == "length"
    assert g.token_ids == llama.generate(PROMPT, max_new_tokens=5, ignore_eos=True).token_ids
    assert len(model.generate(PROMPT, ignore_eos=True, max_new_tokens=7).token_ids) == 7


def test_generation_config_json_sampling_defaults(tiny_root, tmp_path, llama):
    folder = copy_of(tiny_root / "llama", tmp_path / "llama_sample")
    gen_cfg = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(
        {**gen_cfg, "do_sample": True, "temperature": 1.5, "top_k": 0}))  # top_k 0: disabled, as in transformers
    model = tokenloom.load(folder)
    params = dict(max_new_tokens=16, ignore_eos=True)
    greedy = llama.generate(PROMPT, **params).token_ids
    a, b, c = (model.generate(PROMPT, seed=s, **params).token_ids for s in (1, 1, 2))
    assert a == b and a != c  # it samples by default
    assert greedy not in (a, c)
    # the same seed and temperature through kwargs on the plain folder give the same tokens
    assert llama.generate(PROMPT, seed=1, temperature=1.5, **params).token_ids == a
    # call arguments override the defaults
    assert model.generate(PROMPT, do_sample=False, **params).token_ids == greedy
    assert model.generate(PROMPT, temperature=0, seed=1, **params).token_ids == greedy


def test_bad_generation_config_json_is_a_clear_error(tiny_root, tmp_path):
    folder = copy_of(tiny_root / "llama", tmp_path / "llama_bad_gen")
    (folder / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(InvalidParameterError, match="top_p"):
        tokenloom.load(folder)


# ---------------------------------------------------------------------------------- checkpoint formats


def test_sharded_safetensors_checkpoint_gives_the_same_tokens(tmp_path, llama):
    folder = tmp_path / "sharded"
    save_tiny("llama", folder, max_shard_size="20KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert (folder / "model.safetensors.index.json").is_file() and len(shards) > 1
    model = tokenloom.load(folder)
    for p in PROMPTS:
        assert model.generate(p, max_new_tokens=12).token_ids == llama.generate(p, max_new_tokens=12).token_ids


def test_pickle_checkpoint_is_refused_unless_allowed(tiny_root, tmp_path, llama):
    folder = copy_of(tiny_root / "llama", tmp_path / "pickled")
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="allow_pickle") as e:
        tokenloom.load(folder)
    assert "pytorch_model.bin" in str(e.value)
    model = tokenloom.load(folder, allow_pickle=True)
    assert model.generate(PROMPT, max_new_tokens=12).token_ids == llama.generate(PROMPT, max_new_tokens=12).token_ids


def test_bfloat16_loads_and_generates(tiny_root):
    model = tokenloom.load(tiny_root / "llama", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    g = model.generate(PROMPT, max_new_tokens=5, ignore_eos=True)
    assert len(g.token_ids) == 5 and model.tokenizer.decode(g.token_ids) == g.text


# ---------------------------------------------------------------------------------- bad input


def tiny_gguf_bytes() -> bytes:
    """A small, well-formed GGUF file (metadata plus one tensor), written with the gguf library."""
    import gguf
    import numpy as np

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "small.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_block_count(1)
        w.add_context_length(128)
        w.add_tensor("token_embd.weight", np.arange(32 * 16, dtype=np.float32).reshape(32, 16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


def make_bad_model(kind: str, tiny_root: Path, tmp: Path) -> Path | str:
    """A model spec that must fail to load, by kind."""
    if kind == "missing_path":
        return tmp / "no-such-folder"
    if kind == "missing_name":
        return "no-such-model"
    if kind == "text_file":
        (tmp / "notes.txt").write_text("hello, not a model")
        return tmp / "notes.txt"
    if kind == "empty_folder":
        (tmp / "empty").mkdir()
        return tmp / "empty"
    if kind == "gguf_garbage":
        (tmp / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
        return tmp / "garbage.gguf"
    if kind == "gguf_wrong_magic":
        (tmp / "wrong.gguf").write_bytes(b"PK\x03\x04 this is a zip file, not a gguf")
        return tmp / "wrong.gguf"
    if kind in ("gguf_truncated_header", "gguf_truncated_data"):
        data = tiny_gguf_bytes()
        (tmp / "cut.gguf").write_bytes(data[:100] if kind == "gguf_truncated_header" else data[:len(data) - 500])
        return tmp / "cut.gguf"
    folder = copy_of(tiny_root / "llama", tmp / kind)
    st = folder / "model.safetensors"
    if kind == "safetensors_truncated_header":
        st.write_bytes(st.read_bytes()[:1000])
    elif kind == "safetensors_truncated_data":
        st.write_bytes(st.read_bytes()[:-100])
    elif kind == "safetensors_bad_header":
        st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + st.read_bytes()[24:])
    elif kind == "unknown_architecture":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "foo", "architectures": ["FooForCausalLM"]}))
    elif kind == "config_not_json":
        (folder / "config.json").write_text("{model_type: llama")
    elif kind == "no_tokenizer":
        (folder / "tokenizer.json").unlink()
    elif kind == "no_weights":
        st.unlink()
    elif kind == "missing_tensor":
        from safetensors.torch import load_file, save_file
        weights = load_file(st)
        del weights["model.layers.1.mlp.down_proj.weight"]
        save_file(weights, st, metadata={"format": "pt"})
    else:
        raise ValueError(kind)
    return folder


# kind -> (error class, words the message must contain)
BAD_MODELS = {
    "missing_path": (ModelNotFoundError, ["no-such-folder", "not found"]),
    "missing_name": (ModelNotFoundError, ["no-such-model", "not found"]),
    "text_file": (ModelLoadError, ["notes.txt", "not a model"]),
    "empty_folder": (ModelLoadError, ["empty", "not a model"]),
    "gguf_garbage": (GGUFError, ["garbage.gguf"]),
    "gguf_wrong_magic": (GGUFError, ["wrong.gguf", "not a GGUF"]),
    "gguf_truncated_header": (GGUFError, ["cut.gguf", "truncated"]),
    "gguf_truncated_data": (GGUFError, ["cut.gguf", "truncated"]),
    "safetensors_truncated_header": (CheckpointError, ["model.safetensors", "truncated"]),
    "safetensors_truncated_data": (CheckpointError, ["model.safetensors", "truncated"]),
    "safetensors_bad_header": (CheckpointError, ["model.safetensors", "JSON"]),
    "unknown_architecture": (UnsupportedArchitectureError, ["'foo'", "llama"]),
    "config_not_json": (CheckpointError, ["config.json", "JSON"]),
    "no_tokenizer": (TokenizerError, ["tokenizer.json"]),
    "no_weights": (ModelLoadError, ["weights"]),
    "missing_tensor": (ModelLoadError, ["missing", "layers.1.mlp.down_proj.weight"]),
}


@pytest.mark.parametrize("kind", list(BAD_MODELS))
def test_bad_model_raises_a_clear_error(kind, tiny_root, tmp_path):
    cls, words = BAD_MODELS[kind]
    spec = make_bad_model(kind, tiny_root, tmp_path)
    with pytest.raises(cls) as e:
        tokenloom.load(spec, progress=False)
    message = str(e.value)
    assert "\n" not in message.strip() and len(message) < 600
    for w in words:
        assert w.lower() in message.lower(), f"{w!r} not in {message!r}"


def test_invalid_dtype_and_device(tiny_root):
    with pytest.raises(TokenloomError, match="float8"):
        tokenloom.load(tiny_root / "llama", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(TokenloomError, match="cuda"):
            tokenloom.load(tiny_root / "llama", device="cuda")


# params -> (field named in the error, value shown)
BAD_PARAMS = [
    (dict(max_new_tokens=-1), "max_new_tokens", "-1"),
    (dict(max_tokens=-5), "max_new_tokens", "-5"),  # an alias is reported by its field name
    (dict(max_new_tokens=2.5), "max_new_tokens", "2.5"),
    (dict(min_new_tokens=-1), "min_new_tokens", "-1"),
    (dict(max_new_tokens=5, min_new_tokens=6), "min_new_tokens", "6"),
    (dict(top_p=0), "top_p", "0"),
    (dict(top_p=1.5), "top_p", "1.5"),
    (dict(top_p=-0.1), "top_p", "-0.1"),
    (dict(top_p=float("nan")), "top_p", "nan"),
    (dict(temperature=-1.0), "temperature", "-1"),
    (dict(top_k=-2), "top_k", "-2"),
    (dict(seed=-1), "seed", "-1"),
    (dict(num_return_sequences=0), "num_return_sequences", "0"),
    (dict(n=0), "num_return_sequences", "0"),
    (dict(stop=[""]), "stop", "''"),
    (dict(stop=5), "stop", "5"),
    (dict(eos_token_id=["x"]), "eos_token_id", "'x'"),
    (dict(foo=1), "foo", "unknown"),
    (dict(max_tokens=3, max_new_tokens=4), "max_new_tokens", "max_tokens"),
]


@pytest.mark.parametrize("params,field,shown", BAD_PARAMS, ids=[repr(p[0]) for p in BAD_PARAMS])
def test_bad_parameter_raises_invalid_parameter_error(llama, params, field, shown):
    with pytest.raises(InvalidParameterError) as e:
        llama.generate(PROMPT, **params)
    assert e.value.field == field
    assert f"'{field}'" in str(e.value) and shown in str(e.value)
    assert isinstance(e.value, TokenloomError)
    with pytest.raises(InvalidParameterError):
        list(llama.stream(PROMPT, **params))


@pytest.mark.parametrize("prompt,words", [
    ("", ["empty"]),
    (["fine", ""], ["empty"]),
    ([], ["no prompt"]),
    (["fine", 7], ["string", "int"]),
    ("~" * 128, ["128 tokens", "context window"]),
    ("hello world " * 200, ["context window", "128"]),
])
def test_bad_prompt_raises_prompt_error(llama, prompt, words):
    with pytest.raises(PromptError) as e:
        llama.generate(prompt, max_new_tokens=3)
    for w in words:
        assert w in str(e.value)
    with pytest.raises(PromptError):
        list(llama.stream(prompt, max_new_tokens=3))


@pytest.mark.parametrize("prompt", [None, 123])
def test_prompt_of_the_wrong_type_raises_prompt_error(llama, prompt):
    with pytest.raises(PromptError, match="string"):
        llama.generate(prompt, max_new_tokens=3)


# ---------------------------------------------------------------------------------- real model (slow)


@pytest.fixture(scope="module")
def smollm2():
    return tokenloom.load("smollm2-135m-instruct")


@pytest.mark.slow
def test_smollm2_generates_english_and_stream_equals_generate(smollm2):
    g = smollm2.generate("Once upon a time", max_new_tokens=20)
    assert len(g.token_ids) == 20 and g.finish_reason == "length"
    assert g.text.strip() and g.text.isascii()
    assert len(re.findall(r"\b[a-z]{2,}\b", g.text)) >= 5, g.text  # words, not symbols
    assert smollm2.tokenizer.decode(g.token_ids) == g.text
    texts, ids, reasons = joined(smollm2.stream("Once upon a time", max_new_tokens=20))
    assert texts == {0: g.text} and ids == {0: g.token_ids} and reasons == {0: "length"}


@pytest.mark.slow
def test_smollm2_stream_deltas_are_whole_characters(smollm2):
    """Sampling at a high temperature after a multilingual prompt makes tokens that are pieces of
    multi-byte characters; no delta may show a piece as U+FFFD."""
    prompt = "Émilie a mangé des crêpes à Paris. 東京は"
    # a seed whose 64 tokens hold only whole characters in the end (others sample stray bytes)
    params = dict(max_new_tokens=64, seed=1, temperature=1.5)
    deltas = list(smollm2.stream(prompt, **params))
    ids = [t for d in deltas for t in d.token_ids]
    assert len(ids) == 64 or deltas[-1].finish_reason == "stop"
    for d in deltas:
        assert isinstance(d.text, str)
        assert "\ufffd" not in d.text, d
    assert "".join(d.text for d in deltas) == smollm2.tokenizer.decode(ids) == smollm2.generate(prompt, **params).text
    split = [t for t in ids if "\ufffd" in smollm2.tokenizer.decode([t])]
    assert split, "no token was a piece of a character: the test did not exercise the hold-back"
