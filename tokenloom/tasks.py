"""Applications on top of generation: translation and summarization.

How each kind of model is asked:
- T5-style (t5, mt5): the task prefix it was trained with ("translate English to German: ",
  "summarize: ");
- mBART: the source language code after the text, the target language code forced as the first
  generated token; Marian: a ">>xx<<" target token when the model has one, else the text as is;
- decoder-only models: an instruction, through the chat template when the model has one.
A document longer than the model's input window is split at sentence ends into chunks that fit,
the chunks are summarized in one batch, and the summaries are joined (and summarized again
when the joined text is still too long).
"""

from __future__ import annotations

import re

from tokenloom.errors import InvalidParameterError, PromptError

LANGUAGES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian", "es": "Spanish", "it": "Italian",
             "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "ko": "Korean",
             "ar": "Arabic", "hi": "Hindi", "pl": "Polish", "sv": "Swedish", "tr": "Turkish", "uk": "Ukrainian",
             "cs": "Czech", "fi": "Finnish", "da": "Danish", "el": "Greek", "he": "Hebrew", "hu": "Hungarian"}

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n+")


def language_name(code_or_name: str) -> str:
    """'de', 'de_DE', 'German' -> 'German'."""
    key = code_or_name.split("_")[0].split("-")[0].lower()
    return LANGUAGES.get(key, code_or_name)


def _model_type(model) -> str:
    return str(model.config.get("model_type", ""))


def _is_seq2seq(model) -> bool:
    return bool(getattr(model.network, "is_encoder_decoder", False))


def _window(model) -> int:
    """Input tokens one request may use."""
    if _is_seq2seq(model):
        return int(model.config.get("n_positions") or model.config.get("max_position_embeddings") or 512)
    return model.context_length // 2  # leave the other half for the instruction and the output


def _generate(model, prompt_ids: list[list[int]], params: dict) -> list[str]:
    cfg = model.generation_config(None, **params)
    return [g.text.strip() for g in model.generate_ids(prompt_ids, cfg)]


def _instruction_ids(model, instruction: str, text: str) -> list[int]:
    if model.tokenizer.chat_template:
        return model.chat_prompt_ids([{"role": "user", "content": f"{instruction}\n\n{text}"}])
    return model.encode_prompts([f"{instruction}\n\n{text}\n\nAnswer:"])[0]


def _as_list(text) -> tuple[list[str], bool]:
    if isinstance(text, str):
        return [text], True
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return list(text), False
    raise PromptError("text must be a string or a list of strings")


# ------------------------------------------------------------------------------ translation


def translate(model, text, source: str | None = None, target: str | None = None, **params):
    texts, single = _as_list(text)
    for t in texts:
        if not t.strip():
            raise PromptError("the text to translate is empty")
    kind, ids = _model_type(model), None
    if kind in ("t5", "mt5"):
        prefix = f"translate {language_name(source or 'en')} to {language_name(target or 'de')}: "
        ids = model.encode_prompts([prefix + t for t in texts])
    elif kind == "mbart":
        ids = _mbart_inputs(model, texts, source, target, params)
    elif kind == "marian":
        tag = f">>{target}<<" if target else None
        use_tag = tag is not None and model.tokenizer.token_to_id(tag) is not None
        ids = model.encode_prompts([f"{tag} {t}" if use_tag else t for t in texts])
    elif _is_seq2seq(model):
        ids = model.encode_prompts(texts)
    else:
        src = f" from {language_name(source)}" if source else ""
        instruction = (f"Translate the following text{src} to {language_name(target or 'en')}. "
                       "Reply with the translation only.")
        ids = [_instruction_ids(model, instruction, t) for t in texts]
    out = _generate(model, ids, params)
    return out[0] if single else out


def _mbart_inputs(model, texts, source, target, params) -> list[list[int]]:
    tok = model.tokenizer
    if not target:
        raise InvalidParameterError("target", target, "an mBART language code such as de_DE")
    target_id = tok.token_to_id(target)
    if target_id is None:
        raise InvalidParameterError("target", target, "a language code in the model's vocabulary, such as de_DE")
    params.setdefault("forced_bos_token_id", target_id)
    suffix = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if source:
        source_id = tok.token_to_id(source)
        if source_id is None:
            raise InvalidParameterError("source", source, "a language code in the model's vocabulary, such as en_XX")
        suffix.append(source_id)
    return [tok.encode(t, add_special_tokens=False) + suffix for t in texts]


# ------------------------------------------------------------------------------ summarization


def summarize(model, text, **params):
    texts, single = _as_list(text)
    out = [_summarize_document(model, t, params, depth=0) for t in texts]
    return out[0] if single else out


def _summarize_document(model, text: str, params: dict, depth: int) -> str:
    if not text.strip():
        raise PromptError("the text to summarize is empty")
    chunks = split_into_chunks(model, text, _window(model) - 16)
    summaries = _generate(model, [_summary_ids(model, c) for c in chunks], dict(params))
    joined = " ".join(s for s in summaries if s)
    if len(chunks) > 1 and depth < 2 and len(model.tokenizer.encode(joined)) > _window(model) - 16:
        return _summarize_document(model, joined, params, depth + 1)
    return joined


def _summary_ids(model, chunk: str) -> list[int]:
    kind = _model_type(model)
    if kind in ("t5", "mt5"):
        return model.encode_prompts(["summarize: " + chunk])[0]
    if _is_seq2seq(model):
        return model.encode_prompts([chunk])[0]
    return _instruction_ids(model, "Summarize the following text in a few sentences.", chunk)


def split_into_chunks(model, text: str, max_tokens: int) -> list[str]:
    """Greedy packing of sentences into chunks of at most max_tokens tokens (a sentence that is
    longer on its own is cut by tokens)."""
    tok = model.tokenizer
    pieces: list[str] = []
    for sentence in (s for s in _SENTENCE_END.split(text) if s.strip()):
        ids = tok.encode(sentence, add_special_tokens=False)
        if len(ids) <= max_tokens:
            pieces.append(sentence)
        else:
            pieces.extend(tok.decode(ids[i:i + max_tokens]) for i in range(0, len(ids), max_tokens))
    chunks, current, used = [], [], 0
    for piece in pieces:
        n = len(tok.encode(piece, add_special_tokens=False)) + 1
        if current and used + n > max_tokens:
            chunks.append(" ".join(current))
            current, used = [], 0
        current.append(piece)
        used += n
    if current:
        chunks.append(" ".join(current))
    return chunks or [text]
