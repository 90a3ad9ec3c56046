"""Hugging Face checkpoint folders: config.json, generation_config.json and the weights.

Weights come from `model.safetensors`, from shards listed in
`model.safetensors.index.json`, or, only when the caller opts in with
`allow_pickle=True` (CLI: `--allow-pickle`), from pickle files such as
`pytorch_model.bin`, since unpickling can run arbitrary code.

Every safetensors header is validated by `read_safetensors_header` before the
`safetensors` library sees the file: the 8-byte length, the JSON, each tensor's
dtype, shape and byte span. A truncated or corrupt file therefore fails at once
with a `CheckpointError` naming the file and the problem.
Format: https://github.com/huggingface/safetensors#format
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tokenloom.errors import CheckpointError, ModelLoadError, ModelNotFoundError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

# safetensors dtype -> bytes per element
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}


def _folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder {folder} does not exist")
    return folder


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name} ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def _read_json_object(path: Path, what: str) -> dict:
    data = _read_json(path, what)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_hf_config(folder: str | Path) -> dict:
    """The model's `config.json` as a dict."""
    return _read_json_object(_folder(folder) / "config.json", "the model config")


def read_generation_config(folder: str | Path) -> dict:
    """`generation_config.json` as a dict, or {} when the folder has none."""
    path = _folder(folder) / "generation_config.json"
    return _read_json_object(path, "generation defaults") if path.is_file() else {}


def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """Validate a safetensors file's header against the file and return its tensor entries.

    Checks the header length (bounded, inside the file), that the header is a JSON
    object, and that every tensor has a known dtype, a shape of non-negative ints and
    a byte span equal to shape x dtype size; spans must tile the data exactly, as the
    format requires. Raises CheckpointError naming the file and the problem.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            if size < 8:
                raise CheckpointError(f"corrupt safetensors file {path}: only {size} bytes, too short for a header")
            fh.seek(0)
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"corrupt safetensors file {path}: header size {n} bytes is absurd "
                                      f"(limit {MAX_HEADER_BYTES})")
            if n > size - 8:
                raise CheckpointError(f"corrupt safetensors file {path}: header size {n} bytes runs past the "
                                      f"end of the file ({size} bytes); truncated?")
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"corrupt safetensors file {path}: {problem}")

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise fail("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    data_len = size - 8 - n
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    spans = []
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise fail(f"entry for tensor {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise fail(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise fail(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise fail(f"tensor {name!r}: shape {shape} x {dtype} is {expected} bytes but its data span "
                       f"is {end - begin} bytes")
        if end > data_len:
            raise fail(f"tensor {name!r}: data offsets {begin}..{end} run past the end of the file "
                       f"({data_len} data bytes); truncated?")
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise fail(f"tensor {name!r} starts at byte {begin}, expected {pos} "
                       f"({'overlapping' if begin < pos else 'a gap before'} tensor data)")
        pos = end
    if pos != data_len:
        raise fail(f"{data_len - pos} bytes after the last tensor are not described by the header")
    return entries


def _load_safetensors(path: Path, dtype: torch.dtype, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file (only `names` when given), floats cast to `dtype`."""
    read_safetensors_header(path)
    out = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if names is None or name in names:
                    out[name] = _cast(f.get_tensor(name), dtype)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot load {path}: {e}") from None
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _load_sharded(index_path: Path, dtype: torch.dtype, loader) -> dict[str, torch.Tensor]:
    index = _read_json_object(index_path, "the shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map \
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path} has no valid 'weight_map' (tensor name -> shard file)")
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        # a shard must be a plain file name: the index must not point outside the folder
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path} names an invalid shard file {shard!r}")
        shards.setdefault(shard, set()).add(name)
    missing = sorted(s for s in shards if not (index_path.parent / s).is_file())
    if missing:
        raise CheckpointError(f"{index_path} lists shard files that are missing: {', '.join(missing)}")
    state: dict[str, torch.Tensor] = {}
    for shard, names in shards.items():
        tensors = loader(index_path.parent / shard, dtype, names)
        absent = names - set(tensors)
        if absent:
            raise CheckpointError(f"{index_path.parent / shard} lacks tensors the index puts there: "
                                  f"{', '.join(sorted(absent)[:8])}{' ...' if len(absent) > 8 else ''}")
        state.update(tensors)
    return state


def _load_pickle(path: Path, dtype: torch.dtype, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, weights_only=True, map_location="cpu")  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0] if str(e) else "unsupported object"
        raise CheckpointError(f"{path} holds more than plain tensors and was refused: {reason}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    # some training scripts wrap the weights: {"state_dict": {...}} or {"model": {...}}
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors)")
    return {k: _cast(v, dtype) for k, v in obj.items() if names is None or k in names}


def load_hf_state_dict(folder: str | Path, dtype: torch.dtype = torch.float32,
                       allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All weights of a Hugging Face checkpoint folder, floating-point ones cast to `dtype`.

    Prefers safetensors (sharded index, then model.safetensors, then a single other
    *.safetensors file); pickle files are loaded only with `allow_pickle=True`.
    """
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".safetensors":
        return _load_safetensors(folder, dtype)
    folder = _folder(folder)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _load_sharded(folder / SAFETENSORS_INDEX, dtype, _load_safetensors)
    if (folder / SAFETENSORS_FILE).is_file():
        return _load_safetensors(folder / SAFETENSORS_FILE, dtype)
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return _load_safetensors(others[0], dtype)
    if len(others) > 1:
        raise CheckpointError(f"{folder} has several .safetensors files but no {SAFETENSORS_INDEX} to say "
                              f"which belong to the model: {', '.join(p.name for p in others[:5])}")

    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    has_pickle_index = (folder / PICKLE_INDEX).is_file()
    if not pickles and not has_pickle_index:
        raise ModelLoadError(f"{folder} has no model weights (no *.safetensors, {PICKLE_FILE} or *.pt files)")
    if not allow_pickle:
        found = PICKLE_INDEX if has_pickle_index else ", ".join(p.name for p in pickles[:3])
        raise CheckpointError(f"{folder} only has pickle weights ({found}); loading pickle can run arbitrary "
                              f"code, so it is off by default. If you trust this model, pass allow_pickle=True "
                              f"(CLI: --allow-pickle)")
    if has_pickle_index:
        return _load_sharded(folder / PICKLE_INDEX, dtype, _load_pickle)
    preferred = [p for p in pickles if p.name == PICKLE_FILE]
    if preferred or len(pickles) == 1:
        return _load_pickle((preferred or pickles)[0], dtype)
    raise CheckpointError(f"{folder} has several pickle files and no {PICKLE_INDEX}: "
                          f"{', '.join(p.name for p in pickles[:5])}")
