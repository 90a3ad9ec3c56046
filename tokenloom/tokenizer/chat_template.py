"""Chat templates: the model's Jinja template rendered in a sandbox.

The template comes from tokenizer_config.json or GGUF metadata and is untrusted input: it runs
in jinja2's ImmutableSandboxedEnvironment (no attribute access to Python internals, no
mutation of the messages), and its output size is bounded.
"""

from __future__ import annotations

from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenloom.errors import TokenloomError

MAX_OUTPUT_CHARS = 4_000_000


class ChatTemplateError(TokenloomError):
    """The chat template is missing, invalid, or failed while rendering."""


def _raise(message: str):
    raise ChatTemplateError(f"chat template: {message}")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_chat(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra) -> str:
    """Render `messages` ([{"role", "content"}, ...]) with the model's template."""
    if not template:
        raise ChatTemplateError("the model has no chat template")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"message {i} must be an object with string 'role' and 'content'")
    try:
        out = _environment().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, **extra)
    except ChatTemplateError:
        raise
    except (TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise ChatTemplateError(f"failed to render: {type(e).__name__}: {e}") from None
    if len(out) > MAX_OUTPUT_CHARS:
        raise ChatTemplateError(f"rendered prompt is larger than {MAX_OUTPUT_CHARS} characters")
    return out
