"""The Python API: `load` a model, then `generate` / `stream` text with it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from tokenloom.config import GenerationConfig
from tokenloom.errors import PromptError, TokenloomError
from tokenloom.outputs import Generation, Score, StreamDelta

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise TokenloomError(f"invalid dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
    return DTYPES[dtype]


QUANTIZE = ("auto", "none", "int8", "int4", "w8a8")


def load(model: str | os.PathLike | None = None, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
         quantize: str = "auto", allow_pickle: bool = False, progress: bool = True) -> "Model":
    """Load a model from a registry name, a checkpoint folder, a .gguf file or a Hub id.

    With no argument, the default model (pulled into the local model cache on first use).
    `quantize`: "auto" runs a quantized GGUF file's weights packed (int4 for a mostly 4-bit
    file, else int8) on CPU and leaves float checkpoints float; "int8" / "int4" quantize any
    model's weights at load time (CPU, float32 activations); "w8a8" runs int8 weights times
    int8 activations (x86 CPUs, FBGEMM): 8-bit weights at about twice the memory of "int4",
    which is faster where tokenloom's kernels run; "none" expands every weight to `dtype`.
    """
    from tokenloom.loading.registry import DEFAULT_MODEL
    from tokenloom.loading.resolve import resolve_model
    from tokenloom.models import build_model
    from tokenloom.tokenizer.tokenizer import Tokenizer

    torch_dtype = parse_dtype(dtype)
    try:
        device_t = torch.device(device)
    except RuntimeError as e:
        raise TokenloomError(f"invalid device {device!r}: {e}") from None
    if device_t.type == "cuda" and not torch.cuda.is_available():
        raise TokenloomError("device 'cuda' requested but no CUDA GPU is available")
    if quantize not in QUANTIZE:
        raise TokenloomError(f"invalid quantize {quantize!r} (allowed: {', '.join(QUANTIZE)})")
    if quantize not in ("auto", "none") and (device_t.type != "cpu" or torch_dtype != torch.float32):
        raise TokenloomError(f"quantize {quantize!r} runs on the CPU with dtype float32 "
                             f"(got device {device!r}, dtype {str(torch_dtype).removeprefix('torch.')!r})")
    if quantize == "w8a8":
        from tokenloom.models.quant import w8a8_supported
        if not w8a8_supported():
            raise TokenloomError("quantize 'w8a8' needs PyTorch's FBGEMM kernels, which this CPU lacks "
                                 "(x86 with AVX2 only); use 'int8' or 'int4'")
    source = resolve_model(model if model is not None else DEFAULT_MODEL, progress=progress)
    mode = None if quantize in ("auto", "none") else quantize
    if source.kind == "gguf":
        from tokenloom.loading.gguf import gguf_to_hf_config, load_gguf_state_dict, read_gguf
        f = read_gguf(source.path)
        config = gguf_to_hf_config(f)
        weights = load_gguf_state_dict(f, config, dtype=torch_dtype)
        tokenizer = Tokenizer.from_gguf_metadata(f.metadata)
        defaults: dict = {}
        if quantize == "auto" and device_t.type == "cpu" and torch_dtype == torch.float32:
            from tokenloom.loading.gguf import quantization_mode
            mode = quantization_mode(f)
    else:
        from tokenloom.loading.checkpoint import load_hf_state_dict, read_generation_config, read_hf_config
        config = read_hf_config(source.path)
        from tokenloom.models import model_module, text_config
        model_module(text_config(config).get("model_type"))  # an unknown architecture fails before any weight is read
        weights = load_hf_state_dict(source.path, dtype=torch_dtype, allow_pickle=allow_pickle)
        defaults = read_generation_config(source.path)
        if not defaults:  # older checkpoints (BART, Marian) keep their generation defaults in config.json
            names = set(GenerationConfig.field_names())
            defaults = {k: v for k, v in config.items() if k in names}
        tokenizer = Tokenizer.from_folder(source.path, generation_config=defaults, config=config)
    network = build_model(config, weights, torch_dtype, consume=True).to(device_t)
    del weights
    if mode is not None:
        from tokenloom.models.quant import quantize_model
        quantize_model(network, mode)
    return Model(network, tokenizer, GenerationConfig.from_model_defaults(defaults), name=source.name,
                 path=source.path, dtype=torch_dtype, device=device_t, config=config, quantization=mode)


def _prompt_list(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)):
        return list(prompt)
    raise PromptError(f"a prompt must be a string or a list of strings, got {type(prompt).__name__}")


class Model:
    """A loaded model with its tokenizer and default generation settings."""

    def __init__(self, network, tokenizer, defaults: GenerationConfig, *, name: str = "model",
                 path: Path | None = None, dtype=torch.float32, device=torch.device("cpu"), config: dict | None = None,
                 quantization: str | None = None):
        self.network, self.tokenizer, self.defaults = network, tokenizer, defaults
        self.name, self.path, self.dtype, self.device = name, path, dtype, device
        self.config = config or {}
        self.quantization = quantization  # "int4" / "int8" when the weights run packed

    @property
    def context_length(self) -> int:
        return self.network.max_positions

    def __repr__(self) -> str:
        quant = f", quantization={self.quantization!r}" if self.quantization else ""
        return f"Model({self.name!r}, dtype={self.dtype}, device={self.device}{quant})"

    # ------------------------------------------------------------------ generation

    def generation_config(self, config: GenerationConfig | dict | None = None, **params) -> GenerationConfig:
        """The settings a call would use: model defaults, then `config`, then keyword arguments."""
        base = self.defaults
        if isinstance(config, GenerationConfig):
            base = config
        elif isinstance(config, dict):
            params = {**config, **params}
        return GenerationConfig.from_dict(params, base=base)

    def generate(self, prompt: str | list[str], config: GenerationConfig | dict | None = None,
                 **params) -> Generation | list[Generation]:
        """Generate continuations. One prompt and one sequence -> a Generation; else a list
        (prompt-major: the `num_return_sequences` sequences of prompt 0 first)."""
        single = isinstance(prompt, str)
        cfg = self.generation_config(config, **params)
        out = self.generate_ids(self.encode_prompts(_prompt_list(prompt)), cfg)
        return out[0] if single and len(out) == 1 else out

    def generate_ids(self, prompt_ids: list[list[int]], cfg: GenerationConfig) -> list[Generation]:
        """Generate from already tokenized prompts (e.g. a rendered chat) -> all sequences, prompt-major."""
        results: dict[int, Generation] = {}
        for d in self._run(prompt_ids, cfg):
            g = results.setdefault(d.index, Generation("", [], None, d.index, d.prompt_index))
            g.text += d.text
            g.token_ids.extend(d.token_ids)
            g.finish_reason = d.finish_reason or g.finish_reason
            g.score = d.score if d.score is not None else g.score
            if d.logprobs is not None:
                g.logprobs = g.logprobs if g.logprobs is not None else []
                g.logprobs.extend(d.logprobs)
        out = [results[i] for i in sorted(results)]
        prompt_lps = self._prompt_logprobs(prompt_ids, cfg.prompt_logprobs)
        for g in out:
            g.prompt_tokens = len(prompt_ids[g.prompt_index])
            if cfg.logprobs is not None and g.logprobs is None:
                g.logprobs = []
            if prompt_lps is not None:
                g.prompt_logprobs = prompt_lps[g.prompt_index]
        return out

    # ------------------------------------------------------------------ chat and applications

    def chat_prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render `messages` with the model's chat template and tokenize the result. The template
        places the special tokens, so none are added around it; special-token text inside a
        message's content is tokenized as plain text (see chat_template.chat_ids)."""
        from tokenloom.tokenizer.chat_template import chat_ids

        ids = chat_ids(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)
        if len(ids) >= self.context_length:
            raise PromptError(f"the conversation has {len(ids)} tokens but the model's context window is "
                              f"{self.context_length} tokens")
        return ids

    def chat(self, messages: list[dict], config: GenerationConfig | dict | None = None, **params) -> Generation:
        """Reply to a conversation ([{"role": "user", "content": ...}, ...]) using the chat template."""
        cfg = self.generation_config(config, **params)
        return self.generate_ids([self.chat_prompt_ids(messages)], cfg)[0]

    def stream_chat(self, messages: list[dict], config: GenerationConfig | dict | None = None,
                    **params) -> Iterator[StreamDelta]:
        """Yield the reply to a conversation as it is generated, like `stream`.

        Parameters and the conversation are checked now, not at the first iteration."""
        cfg = self.generation_config(config, **params)
        return self._run([self.chat_prompt_ids(messages)], cfg)

    def translate(self, text: str | list[str], source: str | None = None, target: str | None = None,
                  **params) -> str | list[str]:
        """Translate text (one string or a list); see tokenloom.tasks for how each model is prompted."""
        from tokenloom.tasks import translate

        return translate(self, text, source, target, **params)

    def summarize(self, text: str | list[str], **params) -> str | list[str]:
        """Summarize text; documents longer than the model's window are summarized chunk by chunk."""
        from tokenloom.tasks import summarize

        return summarize(self, text, **params)

    def stream(self, prompt: str | list[str], config: GenerationConfig | dict | None = None,
               **params) -> Iterator[StreamDelta]:
        """Yield text as it is generated; each delta says which sequence (`index`) it extends.

        Parameters and prompts are checked now, not at the first iteration."""
        cfg = self.generation_config(config, **params)
        return self._run(self.encode_prompts(_prompt_list(prompt)), cfg)

    def _prompt_logprobs(self, prompt_ids: list[list[int]], top_n: int | None):
        if top_n is None:
            return None
        from tokenloom.engine.scoring import sequence_logprobs

        return [sequence_logprobs(self.network, ids, 1, top_n, self.dtype, self.device) for ids in prompt_ids]

    def score(self, prompt: str, continuation: str) -> Score:
        """Log-likelihood of `continuation` after `prompt`, token by token.

        The two are tokenized separately (the continuation without special tokens) and joined,
        so each continuation token is scored exactly as it was tokenized."""
        from tokenloom.engine.scoring import sequence_logprobs

        prompt_ids = self.encode_prompts([prompt])[0]
        cont_ids = self.tokenizer.encode(continuation, add_special_tokens=False) if continuation else []
        if not cont_ids:
            raise PromptError("the continuation is empty")
        ids = prompt_ids + cont_ids
        if len(ids) > self.context_length:
            raise PromptError(f"prompt and continuation have {len(ids)} tokens but the model's context window is "
                              f"{self.context_length} tokens")
        lps = sequence_logprobs(self.network, ids, len(prompt_ids), 0, self.dtype, self.device)
        values = [t.logprob for t in lps]
        tokens = [self.tokenizer.decode([i], skip_special_tokens=False) for i in cont_ids]
        return Score(cont_ids, tokens, values, float(sum(values)))

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        if not prompts:
            raise PromptError("no prompt given")
        for p in prompts:
            if not isinstance(p, str):
                raise PromptError(f"a prompt must be a string, got {type(p).__name__}")
            if not p:
                raise PromptError("the prompt is empty")
        ids = self.tokenizer.encode_batch(prompts)
        for p_ids in ids:
            if not p_ids:
                raise PromptError("the prompt is empty")
            if len(p_ids) >= self.context_length:
                raise PromptError(f"the prompt has {len(p_ids)} tokens but the model's context window is "
                                  f"{self.context_length} tokens (at least one must be left to generate)")
        return ids

    def _run(self, prompt_ids: list[list[int]], cfg: GenerationConfig) -> Iterator[StreamDelta]:
        """All prompts as requests of one engine, stepped here; deltas as they are made."""
        from tokenloom.engine.engine import Engine

        engine = Engine(self.network, self.dtype, self.device, max_batch=1 << 30)
        out: list[StreamDelta] = []
        requests = [self.make_request(ids, cfg, out.append, prompt_index=i) for i, ids in enumerate(prompt_ids)]
        for r in requests:
            engine.add(r)
        return self._drive(engine, requests, out)

    def _drive(self, engine, requests, out: list[StreamDelta]) -> Iterator[StreamDelta]:
        try:
            while engine.has_work:
                engine.step()
                failed = next((r for r in requests if r.error), None)
                if failed is not None:
                    raise TokenloomError(f"generation failed: {failed.error}")
                yield from out
                out.clear()
        finally:
            for r in requests:  # the caller stopped early: end the rest
                if not r.done:
                    engine.abort(r)

    def make_request(self, prompt_ids: list[int], cfg: GenerationConfig, emit, prompt_index: int = 0, rid=None):
        """An engine request whose text edge sends StreamDelta objects to `emit`."""
        from tokenloom.engine.generate import _vocab_size
        from tokenloom.engine.output import DeltaSink
        from tokenloom.engine.request import make_request

        sink = DeltaSink(self.tokenizer, prompt_ids, cfg, emit, prompt_index)
        return make_request(rid, prompt_ids, cfg, self.network, self.tokenizer.eos_token_ids,
                            _vocab_size(self.network), self.tokenizer, sink)
