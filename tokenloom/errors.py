"""Exceptions tokenloom raises for problems a user can fix.

Every error here carries a one-line, human-readable message; the CLI prints it
without a traceback and exits non-zero.
"""


class TokenloomError(Exception):
    """Base class of all user-facing tokenloom errors."""


class ModelNotFoundError(TokenloomError):
    """The model could not be found locally, in the registry or on the Hub."""


class ModelLoadError(TokenloomError):
    """A model file or folder exists but cannot be loaded (corrupt, unsupported, ...)."""


class GGUFError(ModelLoadError):
    """A GGUF file is malformed, truncated or uses something we do not support."""


class CheckpointError(ModelLoadError):
    """A safetensors / pickle checkpoint is malformed or does not match the model."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint's architecture (model_type) has no implementation in tokenloom."""


class TokenizerError(ModelLoadError):
    """The tokenizer could not be built from the files or metadata given."""


class InvalidParameterError(TokenloomError, ValueError):
    """A generation parameter is out of range; the message names field, value and range."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"invalid value for '{field}': {value!r} (allowed: {allowed})")


class UnknownParameterError(InvalidParameterError):
    """A generation parameter that does not exist: refused, never ignored."""

    def __init__(self, field: str, value, known: str):
        self.field, self.value, self.allowed = field, value, known
        ValueError.__init__(self, f"unknown parameter '{field}' (known: {known})")


class PromptError(TokenloomError, ValueError):
    """The prompt is empty or does not fit into the model's context window."""
