"""tokenloom: local text generation with pretrained language models.

    import tokenloom
    model = tokenloom.load("smollm2-135m-instruct")
    print(model.generate("Once upon a time", max_new_tokens=40).text)
"""

from importlib import import_module

__all__ = ["load", "Model", "GenerationConfig", "Generation", "StreamDelta", "TokenloomError"]
__version__ = "0.1.0"

# imported on first use, so that `tokenloom models` and `--help` do not wait for torch
_LAZY = {"load": "tokenloom.api", "Model": "tokenloom.api", "GenerationConfig": "tokenloom.config",
         "Generation": "tokenloom.outputs", "StreamDelta": "tokenloom.outputs", "TokenloomError": "tokenloom.errors"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokenloom' has no attribute {name!r}")
