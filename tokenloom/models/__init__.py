"""Architectures, one module per checkpoint `model_type`; aliases live in one mapping."""

from __future__ import annotations

import importlib

import torch

from tokenloom.errors import UnsupportedArchitectureError
from tokenloom.models.base import load_weights

# checkpoint model_type -> module in tokenloom.models
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "gpt2": "gpt2",
    "t5": "t5",
    "mt5": "t5",
    "bart": "bart",
    "mbart": "bart",
    "marian": "bart",
}


def text_config(config: dict) -> dict:
    """Multimodal checkpoints (e.g. Gemma 3 4B+) nest the language model's config."""
    if "text_config" in config and isinstance(config["text_config"], dict):
        return {**config["text_config"], "model_type": config["text_config"].get("model_type", config.get("model_type"))}
    return config


def model_module(model_type: str | None):
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return importlib.import_module(f"tokenloom.models.{ARCHITECTURES[model_type]}")


class _Handover(dict):
    """A state dict that lets go of each tensor as `sanitize` reads it: the projections it fuses
    into new tensors are then freed one layer at a time, not all at the end (a load's peak)."""

    def items(self):
        for k in list(self):
            yield k, self.pop(k)


def build_model(config: dict, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                consume: bool = False):
    """Instantiate the architecture named by `config["model_type"]` and load `weights` (HF names).

    With `consume`, `weights` is emptied on the way, so it holds nothing the model does not."""
    config = text_config(config)
    module = model_module(config.get("model_type"))
    args = module.Model.Args.from_config(config)
    with torch.device("meta"):
        model = module.Model(args)
    source = _Handover(weights) if consume else dict(weights)
    if consume:
        weights.clear()
    weights = module.Model.sanitize(source, args)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    load_weights(model, weights)
    return model.eval()
