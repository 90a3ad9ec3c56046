"""tokenloom: local text generation with pretrained language models.

    import tokenloom
    model = tokenloom.load("smollm2-135m-instruct")
    print(model.generate("Once upon a time", max_new_tokens=40).text)
"""

from tokenloom.api import Model, load
from tokenloom.config import GenerationConfig
from tokenloom.errors import TokenloomError
from tokenloom.outputs import Generation, StreamDelta

__all__ = ["load", "Model", "GenerationConfig", "Generation", "StreamDelta", "TokenloomError"]
__version__ = "0.1.0"
