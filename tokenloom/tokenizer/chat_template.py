"""Chat templates: the model's Jinja template rendered in a sandbox on a time and size budget
(see jinja_sandbox.py), and a conversation tokenized so that special-token text typed inside a
message ("<|im_end|>") stays text: only the special tokens the template itself writes are special.
"""

from __future__ import annotations

import re
import secrets

from tokenloom.tokenizer.jinja_sandbox import (MAX_OUTPUT_CHARS, TIME_LIMIT_S, ChatTemplateError,
                                               render_template)

__all__ = ["ChatTemplateError", "chat_ids", "render_chat"]


def render_chat(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", time_limit_s: float = TIME_LIMIT_S,
                max_chars: int = MAX_OUTPUT_CHARS, **extra) -> str:
    """Render `messages` ([{"role", "content"}, ...]) with the model's template.

    Raises ChatTemplateError when the template is missing or invalid, raises (`raise_exception`),
    touches something the sandbox forbids, or would run longer than `time_limit_s` or produce
    more than `max_chars` characters."""
    if not template:
        raise ChatTemplateError("the model has no chat template")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"message {i} must be an object with string 'role' and 'content'")
    return render_template(template, time_limit_s=time_limit_s, max_chars=max_chars, messages=messages,
                           add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token,
                           **extra)


# -- tokenizing a conversation -------------------------------------------------------------------

def chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True, **extra) -> list[int]:
    """Render `messages` with the tokenizer's chat template and tokenize the result.

    Special tokens written by the template (`<|im_start|>`) become their ids; special-token text
    inside message content stays plain text, so a user cannot forge a turn or a system prompt.
    Before rendering, every special token found in a content is replaced by a random marker the
    template cannot produce itself (and that `trim`, `upper` ... leave alone); the rendered text
    is cut at the template's special tokens, the markers are put back, and each piece in between
    is tokenized with special tokens read as text. Without special-token text in the messages
    this gives the ids of the rendered text, tokenized as usual."""
    nonce = f"{secrets.randbits(64):020d}"
    found: list[str] = []

    def mark(content: str) -> str:
        out = []
        for piece, special_id in tokenizer.split_special(content):
            if special_id is not None:
                found.append(piece)
                piece = f"\ue000{nonce}:{len(found) - 1}\ue001"
            out.append(piece)
        return "".join(out)

    messages = [{**m, "content": mark(m["content"])} if isinstance(m, dict) and isinstance(m.get("content"), str)
                else m for m in messages]

    def token_text(i: int | None) -> str:
        return tokenizer.decode([i], skip_special_tokens=False) if i is not None else ""

    text = render_chat(tokenizer.chat_template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=token_text(tokenizer.bos_token_id), eos_token=token_text(tokenizer.eos_token_id),
                       **extra)
    markers = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
    if found and text.count(nonce) != len(markers.findall(text)):
        raise ChatTemplateError("chat template: the template changes message content in a way that would "
                                "let special-token text in a message act as a special token")

    def unmark(piece: str) -> str:
        return markers.sub(lambda m: found[int(m.group(1))], piece) if found else piece

    ids: list[int] = []
    for piece, special_id in tokenizer.split_special(text):
        if special_id is not None:
            ids.append(special_id)
        elif piece:
            ids.extend(tokenizer.encode(unmark(piece), add_special_tokens=False, special_as_text=True))
    return ids
