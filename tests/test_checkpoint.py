"""Hugging Face checkpoint folders: configs, safetensors (single and sharded), pickle opt-in,
and hand-made corrupt safetensors files that must fail fast with a clear CheckpointError."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from tokenloom.errors import CheckpointError, ModelLoadError, ModelNotFoundError
from tokenloom.loading.checkpoint import (
    load_hf_state_dict,
    read_generation_config,
    read_hf_config,
    read_safetensors_header,
)


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(8, 4, dtype=torch.bfloat16),
        "model.norm.weight": torch.randn(4, dtype=torch.float16),
        "lm_head.weight": torch.randn(8, 4),
        "position_ids": torch.arange(6),
    }


# ---------------------------------------------------------------------------
# config files


def test_read_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    assert read_hf_config(tmp_path) == {"model_type": "llama", "hidden_size": 4}


@pytest.mark.parametrize("content, phrase", [
    (None, "has no config.json"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_bad_config_json(tmp_path, content, phrase):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=phrase):
        read_hf_config(tmp_path)


def test_missing_folder():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        read_hf_config("/nonexistent/tokenloom/model")


def test_generation_config_optional(tmp_path):
    assert read_generation_config(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6}')
    assert read_generation_config(tmp_path) == {"do_sample": True, "temperature": 0.6}
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="generation_config.json is not valid JSON"):
        read_generation_config(tmp_path)


# ---------------------------------------------------------------------------
# safetensors


def test_single_file_casts_floats_and_keeps_integers(tmp_path):
    weights = _weights()
    save_file(weights, tmp_path / "model.safetensors")
    state = load_hf_state_dict(tmp_path, dtype=torch.float32)
    assert set(state) == set(weights)
    for name, t in weights.items():
        expected = t.float() if t.is_floating_point() else t
        assert state[name].dtype == expected.dtype
        assert torch.equal(state[name], expected)
    assert load_hf_state_dict(tmp_path, dtype=torch.bfloat16)["lm_head.weight"].dtype == torch.bfloat16


def _save_sharded(folder, weights, split: int = 2) -> dict[str, str]:
    names = list(weights)
    weight_map = {}
    for i, part in enumerate((names[:split], names[split:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, folder / shard)
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint(tmp_path):
    weights = _weights()
    _save_sharded(tmp_path, weights)
    state = load_hf_state_dict(tmp_path)
    assert set(state) == set(weights)
    assert torch.equal(state["lm_head.weight"], weights["lm_head.weight"])


def test_sharded_missing_shard(tmp_path):
    _save_sharded(tmp_path, _weights())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard files that are missing: model-00002-of-00002.safetensors"):
        load_hf_state_dict(tmp_path)


def test_sharded_tensor_not_in_its_shard(tmp_path):
    weight_map = _save_sharded(tmp_path, _weights())
    weight_map["model.layers.0.extra"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="lacks tensors the index puts there: model.layers.0.extra"):
        load_hf_state_dict(tmp_path)


@pytest.mark.parametrize("index, phrase", [
    ({"weight_map": {"a": "../outside.safetensors"}}, "invalid shard file '../outside.safetensors'"),
    ({"metadata": {}}, "no valid 'weight_map'"),
    ({"weight_map": {"a": 3}}, "no valid 'weight_map'"),
])
def test_bad_shard_index(tmp_path, index, phrase):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=phrase):
        load_hf_state_dict(tmp_path)


def test_several_safetensors_without_index_is_ambiguous(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "consolidated.safetensors")
    save_file({"a": torch.ones(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="several .safetensors files"):
        load_hf_state_dict(tmp_path)


def test_lone_differently_named_safetensors_file(tmp_path):
    save_file({"a": torch.ones(3)}, tmp_path / "weights.safetensors")
    assert torch.equal(load_hf_state_dict(tmp_path)["a"], torch.ones(3))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="has no model weights"):
        load_hf_state_dict(tmp_path)


# hand-made safetensors bytes: 8-byte little-endian header length, JSON header, data


def _st_bytes(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CORRUPT_SAFETENSORS = {
    "too short": (b"\x01\x02", "too short for a header"),
    "absurd header size": (_st_bytes(b"{}", header_len=2**40), "is absurd"),
    "header past end": (_st_bytes(b"{}", header_len=500), "runs past the end of the file"),
    "header not json": (_st_bytes(b"{nope"), "header is not valid JSON"),
    "header not utf-8": (_st_bytes(b"\xff\xfe"), "header is not valid JSON"),
    "header a list": (_st_bytes([1, 2]), "not a JSON object"),
    "entry not object": (_st_bytes({"w": 5}), "entry for tensor 'w' is not an object"),
    "unknown dtype": (_st_bytes({"w": _entry(dtype="F7")}, b"\0" * 8), "unknown dtype 'F7'"),
    "negative dim": (_st_bytes({"w": _entry(shape=(-2,))}, b"\0" * 8), "invalid shape"),
    "bad offsets": (_st_bytes({"w": _entry(offsets=(8, 0))}, b"\0" * 8), "invalid data_offsets"),
    "size mismatch": (_st_bytes({"w": _entry(shape=(3,))}, b"\0" * 8), "is 12 bytes but its data span is 8"),
    "offsets past end": (_st_bytes({"w": _entry(shape=(4,), offsets=(0, 16))}, b"\0" * 8),
                         "run past the end of the file"),
    "absurd shape": (_st_bytes({"w": _entry(shape=(2**40, 2**40))}, b"\0" * 8), "data span is 8"),
    "overlap": (_st_bytes({"a": _entry(), "b": _entry(offsets=(4, 12))}, b"\0" * 12), "overlapping"),
    "gap": (_st_bytes({"a": _entry(offsets=(4, 12))}, b"\0" * 12), "a gap before"),
    "trailing bytes": (_st_bytes({"a": _entry()}, b"\0" * 12), "4 bytes after the last tensor"),
}


@pytest.mark.parametrize("case", list(CORRUPT_SAFETENSORS))
def test_corrupt_safetensors_raise_clear_error(tmp_path, case):
    data, phrase = CORRUPT_SAFETENSORS[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_hf_state_dict(tmp_path)
    message = str(info.value)
    assert phrase in message
    assert str(path) in message
    assert "\n" not in message


def test_truncated_real_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_weights(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="run past the end of the file"):
        load_hf_state_dict(tmp_path)


def test_valid_header_is_returned(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_st_bytes({"__metadata__": {"format": "pt"}, "a": _entry(), "b": _entry("I8", (4,), (8, 12))},
                               b"\0" * 12))
    assert read_safetensors_header(path) == {"a": _entry(), "b": _entry("I8", (4,), (8, 12))}
    assert torch.equal(load_hf_state_dict(path)["b"], torch.zeros(4, dtype=torch.int8))


# ---------------------------------------------------------------------------
# pickle checkpoints


def test_pickle_refused_by_default(tmp_path):
    torch.save(_weights(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        load_hf_state_dict(tmp_path)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "allow_pickle=True" in message and "--allow-pickle" in message


def test_pickle_loaded_when_allowed(tmp_path):
    weights = _weights()
    torch.save(weights, tmp_path / "pytorch_model.bin")
    state = load_hf_state_dict(tmp_path, allow_pickle=True)
    assert set(state) == set(weights)
    assert torch.equal(state["model.embed_tokens.weight"], weights["model.embed_tokens.weight"].float())
    assert state["position_ids"].dtype == torch.int64


def test_legacy_pickle_format_and_wrapped_state_dict(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "model.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_hf_state_dict(tmp_path, allow_pickle=True)["w"], torch.ones(2))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_pickle_with_arbitrary_objects_is_refused_even_when_allowed(tmp_path, capsys):
    torch.save({"w": torch.ones(2), "x": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="more than plain tensors"):
        load_hf_state_dict(tmp_path, allow_pickle=True)
    assert "unpickling ran code" not in capsys.readouterr().out


def test_corrupt_pickle(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_hf_state_dict(tmp_path, allow_pickle=True)


def test_safetensors_preferred_over_pickle(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    torch.save({"a": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(load_hf_state_dict(tmp_path)["a"], torch.ones(2))  # no allow_pickle needed
