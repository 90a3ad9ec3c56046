"""Qwen2: the Llama architecture with biases on the Q/K/V projections (none on the output)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenloom.errors import ModelLoadError
from tokenloom.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        if config.get("use_sliding_window"):
            raise ModelLoadError("Qwen2 checkpoints with use_sliding_window=true are not supported yet")
        config = {**config, "attention_bias": True, "o_proj_bias": False, "sliding_window": None}
        return super().from_config(config)


class Model(llama.Model):
    Args = ModelArgs
