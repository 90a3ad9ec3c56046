"""OpenAI request bodies -> engine inputs (prompts or messages, one GenerationConfig), checked once.

Completions and chat completions take OpenAI's fields, mapped onto GenerationConfig:
max_tokens / max_completion_tokens -> max_new_tokens, n -> num_return_sequences, stop, seed,
temperature, top_p, presence_penalty, frequency_penalty, logit_bias (string keys), and logprobs
(completions: an int; chat: logprobs true + top_logprobs). Every other GenerationConfig field is
accepted as an extra body field (top_k, min_p, repetition_penalty, num_beams, ...). A field
nobody knows, a feature we do not have (echo, suffix, best_of != n) or a value out of range is a
RequestError naming the field (HTTP 400): never ignored, never a bare 500.

A null OpenAI field means "not given" (as in OpenAI's API); a null extra field is passed on, since
null has a meaning there (top_k: null disables the filter).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenloom.config import GenerationConfig
from tokenloom.errors import InvalidParameterError


class RequestError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(400, message, param=param, code=code)


# OpenAI fields that become GenerationConfig fields under the same name (or a config alias)
_SHARED = ("max_tokens", "n", "stop", "seed", "temperature", "top_p", "presence_penalty", "frequency_penalty",
           "logit_bias")
_COMPLETION_ONLY = ("model", "prompt", "stream", "stream_options", "user", "echo", "suffix", "best_of", "logprobs")
_CHAT_ONLY = ("model", "messages", "stream", "stream_options", "user", "logprobs", "top_logprobs",
              "max_completion_tokens")
# OpenAI features this server does not have; null is accepted (some clients always send the key)
_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "parallel_tool_calls",
                "audio", "modalities", "prediction", "web_search_options", "reasoning_effort")
# GenerationConfig fields the serving engine cannot produce
_ENGINE_UNSUPPORTED = {"prompt_logprobs": "prompt logprobs are not returned by the server"}


@dataclass
class ParsedRequest:
    config: GenerationConfig
    stream: bool
    include_usage: bool
    model: str | None
    names: dict[str, str]  # GenerationConfig field -> the name the caller gave it (errors name the latter)
    prompts: list | None = None  # completions: strings or token id lists
    messages: list[dict] | None = None  # chat

    @property
    def max_tokens_param(self) -> str | None:
        """The caller's name for the length it set, if it set one (a prompt must leave room for it)."""
        return self.names.get("max_new_tokens")


def parse_completion(body, defaults: GenerationConfig) -> ParsedRequest:
    body = _object(body)
    _refuse_unknown(body, _COMPLETION_ONLY)
    if body.get("echo"):
        raise invalid("'echo' is not supported: the response holds only the generated text", "echo")
    if body.get("suffix"):
        raise invalid("'suffix' (insertion) is not supported", "suffix")
    best_of = body.get("best_of")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise invalid("'best_of' is not supported (it may only equal n); for beam search use num_beams", "best_of")
    if "prompt" not in body:
        raise invalid("'prompt' is required", "prompt")
    params, given_as = _generation_params(body, _COMPLETION_ONLY)
    if body.get("logprobs") is not None:
        params["logprobs"] = body["logprobs"]
    parsed = _finish(body, params, given_as, defaults)
    parsed.prompts = _prompts(body["prompt"])
    return parsed


def parse_chat(body, defaults: GenerationConfig) -> ParsedRequest:
    body = _object(body)
    _refuse_unknown(body, _CHAT_ONLY)
    params, given_as = _generation_params(body, _CHAT_ONLY)
    if body.get("max_completion_tokens") is not None:
        if "max_tokens" in params or "max_new_tokens" in params:
            raise invalid("give only one of 'max_completion_tokens' and 'max_tokens'", "max_completion_tokens")
        params["max_new_tokens"] = body["max_completion_tokens"]
        given_as["max_new_tokens"] = "max_completion_tokens"
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise invalid(f"'logprobs' must be true or false, got {logprobs!r}", "logprobs")
    if top is not None:
        if not logprobs:
            raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        params["logprobs"], given_as["logprobs"] = top, "top_logprobs"
    elif logprobs:
        params["logprobs"] = 0
    parsed = _finish(body, params, given_as, defaults)
    parsed.messages = parse_messages(body.get("messages"))
    return parsed


# ---------------------------------------------------------------------------------- pieces


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def _refuse_unknown(body: dict, own: tuple) -> None:
    names = set(GenerationConfig.field_names()) | set(GenerationConfig.ALIASES)
    for key, value in body.items():
        if key in own or key in _SHARED:
            continue
        if key in _UNSUPPORTED:
            if value is None:
                continue
            raise invalid(f"'{key}' is not supported by this server", key)
        if key in _ENGINE_UNSUPPORTED:
            raise invalid(f"'{key}' is not supported: {_ENGINE_UNSUPPORTED[key]}", key)
        if key not in names:
            raise invalid(f"unknown parameter '{key}' (the OpenAI fields and the generation parameters of "
                          "tokenloom.GenerationConfig are accepted)", key)


def _generation_params(body: dict, own: tuple) -> tuple[dict, dict]:
    """The body's generation parameters for GenerationConfig.from_dict, and canonical name -> the
    name the caller used (so that an error names the caller's field)."""
    params, given_as = {}, {}
    for key, value in body.items():
        if key in own or key in _UNSUPPORTED:
            continue
        if key in _SHARED and value is None:
            continue
        params[key] = value
        given_as[GenerationConfig.ALIASES.get(key, key)] = key
    return params, given_as


def _finish(body: dict, params: dict, given_as: dict, defaults: GenerationConfig) -> ParsedRequest:
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid(f"'stream' must be true or false, got {stream!r}", "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("'stream_options' takes only {\"include_usage\": true|false}", "stream_options")
        include_usage = options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise invalid("'stream_options.include_usage' must be true or false", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("'model' must be a string", "model")
    try:
        config = GenerationConfig.from_dict(params, base=defaults)
    except InvalidParameterError as e:
        raise invalid(str(e), given_as.get(e.field, e.field)) from None
    return ParsedRequest(config, stream, include_usage, model, given_as)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _prompts(value) -> list:
    """A string, a list of strings, a list of token ids or a list of such lists -> a list of prompts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return value
        if all(_is_int(t) for t in value):
            return [value]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
            return value
    raise invalid("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                  "prompt")


def parse_messages(value) -> list[dict]:
    """Check the messages; text content parts are joined into one string (templates want strings)."""
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a string 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise invalid(f"messages[{i}]: only text content parts are supported", "messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({**m, "content": content})
    return out
