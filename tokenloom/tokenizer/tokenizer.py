"""The tokenizer: a `tokenizers.Tokenizer` (the Rust library) plus what generation needs.

Two sources:

* a Hugging Face folder: `tokenizer.json` runs as is; `tokenizer_config.json`,
  `special_tokens_map.json`, `config.json` and `generation_config.json` say which ids are
  BOS / EOS / PAD, whether BOS / EOS are added, and give the chat template;
* a Marian (Opus-MT) folder with `source.spm` + `vocab.json` and no `tokenizer.json`: the source
  SentencePiece model segments the text, `vocab.json` numbers the pieces (see sentencepiece.py);
* a GGUF file's metadata: there is no `tokenizer.json`, so we rebuild the tokenizer llama.cpp
  runs from the vocabulary, merges, scores and token types.

For GGUF we follow llama.cpp (src/llama-vocab.cpp), not transformers' GGUF converter:
byte-level BPE ("gpt2") splits text with the regexes llama.cpp picks for `tokenizer.ggml.pre`
(transformers gets SmolLM2's one-digit-per-token split wrong), and SentencePiece ("llama")
merges by token score, the way llama.cpp's `llm_tokenizer_spm` and SentencePiece's BPE do.

BOS / EOS are never added by the Rust post-processor: `encode` adds them itself, so they are
added once, whatever `tokenizer.json` does.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from tokenloom.errors import TokenizerError
from tokenloom.tokenizer.sentencepiece import marian_backends

logger = logging.getLogger(__name__)


class Tokenizer:
    """Text <-> token ids for one model.

    Attributes:
        bos_token_id: id prepended by `encode` when `add_bos` (None: the model has none).
        eos_token_ids: every id that ends generation, the tokenizer's EOS first.
        pad_token_id: id used to pad batches (None: none declared).
        add_bos / add_eos: whether `encode(..., add_special_tokens=True)` adds BOS / EOS.
        chat_template: the Jinja chat template, if the model ships one.
        vocab_size: number of ids the tokenizer knows, added tokens included.
        byte_fallback_ids: ids of SentencePiece `<0xAB>` byte tokens that the decoder joins
            into characters (the streaming detokenizer must not cut through a run of them).
        special_ids: ids `decode(..., skip_special_tokens=True)` leaves out.
        segmenter: when set, splits text into pieces instead of `backend`, each piece then numbered by
            its spelling in `backend`'s vocabulary, unknown pieces as `unk_token_id` (Marian).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        byte_fallback_ids: frozenset[int] = frozenset(),
        prefix_ids: list[int] | None = None,
        suffix_ids: list[int] | None = None,
        segmenter: tokenizers.Tokenizer | None = None,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids or [])
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        self.byte_fallback_ids = byte_fallback_ids
        self.segmenter = segmenter
        self._piece_ids = backend.get_vocab(with_added_tokens=True) if segmenter is not None else {}
        self._lock = threading.Lock()
        self.special_ids = frozenset(
            i for i, added in backend.get_added_tokens_decoder().items() if added.special)
        # Ids other than BOS/EOS that tokenizer.json's post-processor wraps text in ([CLS] ...).
        self._prefix_ids = list(prefix_ids or [])
        self._suffix_ids = list(suffix_ids or [])
        if add_bos and bos_token_id is None:
            raise TokenizerError("the tokenizer should add a BOS token but declares none")
        if add_eos and not self.eos_token_ids:
            raise TokenizerError("the tokenizer should add an EOS token but declares none")

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={self.eos_token_ids}, add_bos={self.add_bos}, add_eos={self.add_eos})")

    # -- encoding / decoding ---------------------------------------------------------------

    def _wrap(self, ids: list[int]) -> list[int]:
        head = ([self.bos_token_id] if self.add_bos else []) + self._prefix_ids
        tail = self._suffix_ids + ([self.eos_token_ids[0]] if self.add_eos else [])
        return head + ids + tail

    def encode(self, text: str, add_special_tokens: bool = True, special_as_text: bool = False) -> list[int]:
        """Token ids of `text`; BOS/EOS added as the model's config says when `add_special_tokens`.

        Special tokens written in the text (`<|im_start|>`) become their single id, unless
        `special_as_text`: then they are split like any other text (for text a user typed).
        """
        return self.encode_batch([text], add_special_tokens, special_as_text)[0]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True,
                     special_as_text: bool = False) -> list[list[int]]:
        encodings = self._encode(list(texts), special_as_text)
        if self.segmenter is None:
            ids = [e.ids for e in encodings]
        else:
            pieces, unk = self._piece_ids, self.unk_token_id
            ids = [[pieces.get(t, unk) for t in e.tokens] for e in encodings]
        return [self._wrap(i) for i in ids] if add_special_tokens else ids

    def _encode(self, texts: list[str], special_as_text: bool = False) -> list[tokenizers.Encoding]:
        splitter = self.segmenter if self.segmenter is not None else self.backend
        # `encode_special_tokens` is a setting of the shared Rust tokenizer, not of one call: it
        # is switched on only under the lock, which every encode takes, and always switched back.
        with self._lock:
            if not special_as_text:
                return splitter.encode_batch(texts, add_special_tokens=False)
            splitter.encode_special_tokens = True
            try:
                return splitter.encode_batch(texts, add_special_tokens=False)
            finally:
                splitter.encode_special_tokens = False

    def split_special(self, text: str) -> list[tuple[str, int | None]]:
        """`text` cut at the special tokens `encode` would find in it: (piece, None) for the text
        between them, (token text, id) for each special token, in order."""
        if self.segmenter is not None:  # Marian: special tokens never come from text
            return [(text, None)]
        (encoding,) = self._encode([text])
        out, start = [], 0
        for i, (begin, end) in zip(encoding.ids, encoding.offsets):
            if i in self.special_ids:
                out.append((text[start:begin], None))
                out.append((text[begin:end], i))
                start = end
        out.append((text[start:], None))
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def token_to_id(self, s: str) -> int | None:
        return self.backend.token_to_id(s)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path, generation_config: dict | None = None,
                    config: dict | None = None) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`).

        `config` / `generation_config` are the model's `config.json` / `generation_config.json`;
        when not given they are read from the folder if there.
        """
        folder = Path(folder)
        path = folder / "tokenizer.json"
        tok_config = _read_json(folder / "tokenizer_config.json")
        segmenter = None
        if path.is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # the Rust side raises bare Exceptions with a serde message
                raise TokenizerError(f"cannot read {path}: {e}") from e
        elif (folder / tok_config.get("source_spm", "source.spm")).is_file():
            segmenter, backend, _ = marian_backends(folder, tok_config)
        else:
            raise TokenizerError(f"no tokenizer.json in {folder}")
        special_map = _read_json(folder / "special_tokens_map.json")
        if config is None:
            config = _read_json(folder / "config.json")
        if generation_config is None:
            generation_config = _read_json(folder / "generation_config.json")

        def special_id(name: str) -> int | None:
            text = _token_text(tok_config.get(name)) or _token_text(special_map.get(name))
            if text is None:
                return None
            found = backend.token_to_id(text)
            if found is None:
                logger.warning("%s %r is not in the vocabulary; ignoring it", name, text)
            return found

        bos = special_id("bos_token")
        if bos is None:
            bos = _first_id(generation_config.get("bos_token_id"), config.get("bos_token_id"))
        eos_ids = _unique([special_id("eos_token"), *_id_list(config.get("eos_token_id")),
                           *_id_list(generation_config.get("eos_token_id"))])
        pad = special_id("pad_token")
        if pad is None:
            pad = _first_id(generation_config.get("pad_token_id"), config.get("pad_token_id"))

        # What tokenizer.json's post-processor wraps text in; BOS/EOS in it count as "adds BOS".
        prefix, suffix = _probe_post_processor(backend)
        add_bos = tok_config.get("add_bos_token")
        if add_bos is None:
            add_bos = bos is not None and bos in prefix
        add_eos = tok_config.get("add_eos_token")
        if add_eos is None:
            # MarianTokenizer always appends </s>
            add_eos = bool(eos_ids) and (eos_ids[0] in suffix or segmenter is not None)
        # Our own BOS/EOS replace the post-processor's; anything else it adds stays.
        prefix = [i for i in prefix if i != bos]
        suffix = [i for i in suffix if not eos_ids or i != eos_ids[0]]

        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            pad_token_id=pad,
            unk_token_id=special_id("unk_token"),
            add_bos=bool(add_bos) and bos is not None,
            add_eos=bool(add_eos) and bool(eos_ids),
            chat_template=_chat_template(tok_config, folder),
            byte_fallback_ids=_byte_fallback_ids(backend),
            prefix_ids=prefix,
            suffix_ids=suffix,
            segmenter=segmenter,
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (`metadata`: its key/values as plain Python)."""
        kind = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("the GGUF has no tokenizer.ggml.tokens; cannot build a tokenizer")
        types = metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
        pre = metadata.get("tokenizer.ggml.pre") or "default"

        if kind == "gpt2":
            merges = metadata.get("tokenizer.ggml.merges")
            if merges is None:
                raise TokenizerError("byte-level BPE GGUF without tokenizer.ggml.merges")
            backend = _byte_level_backend(tokens, merges, pre)
            byte_ids: frozenset[int] = frozenset()
            default_add_bos = pre in _ADD_BOS_PRE
        elif kind == "llama":
            scores = metadata.get("tokenizer.ggml.scores")
            if scores is None or len(scores) != len(tokens):
                raise TokenizerError("SentencePiece GGUF without a score for every token")
            space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            backend = _sentencepiece_backend(tokens, scores, types, space_prefix)
            byte_ids = frozenset(i for i, t in enumerate(types) if t == _BYTE)
            default_add_bos = True
        else:
            raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2', 'llama')")
        _add_gguf_special_tokens(backend, tokens, types)

        def token_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        bos = token_id("bos_token_id")
        eos_ids = _unique([token_id("eos_token_id"), token_id("eot_token_id"), token_id("eom_token_id")]
                          + [i for i, t in enumerate(tokens) if t in _EOG_TEXTS])
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)) and bos is not None
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and bool(eos_ids)
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            pad_token_id=token_id("padding_token_id"),
            unk_token_id=token_id("unknown_token_id"),
            add_bos=add_bos,
            add_eos=add_eos,
            chat_template=metadata.get("tokenizer.chat_template"),
            byte_fallback_ids=byte_ids,
        )


# -- helpers for from_folder ---------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _first_id(*values) -> int | None:
    for value in values:
        ids = _id_list(value)
        if ids:
            return ids[0]
    return None


def _unique(ids) -> list[int]:
    return list(dict.fromkeys(i for i in ids if i is not None))


def _probe_post_processor(backend: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a text (BOS, [CLS], </s> ...)."""
    text = "Hello world"
    plain = backend.encode(text, add_special_tokens=False).ids
    full = backend.encode(text, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    logger.warning("cannot tell what tokenizer.json's post-processor adds; adding nothing")
    return [], []


def _chat_template(tok_config: dict, folder: Path) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    # Newer transformers save the template next to tokenizer_config.json instead.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return _read_json(folder / "chat_template.json").get("chat_template")


def _byte_fallback_ids(backend: tokenizers.Tokenizer) -> frozenset[int]:
    decoder = backend.decoder
    if decoder is None or b"ByteFallback" not in decoder.__getstate__():
        return frozenset()
    return frozenset(i for t, i in backend.get_vocab().items() if _is_byte_token(t))


def _is_byte_token(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">")


# -- GGUF: token types, pre-tokenizer regexes ----------------------------------------------

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Tokens llama.cpp treats as end-of-generation by their text, whatever the metadata says.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<|return|>", "<|call|>",
})

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LLM = (
    r"[\r\n]",
    # cased letters; escaped because some (U+1FD3, U+2126, U+212A ...) change under Unicode
    # normalization, which an editor or a copy may apply, and ranges then break
    "\\s?["
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-"
    "\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-"
    "\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00"
    "-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-"
    "\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-"
    "\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-"
    "\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
    "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13"
    "-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
    "]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


def _names(splits: tuple[str, ...], *names: str) -> dict[str, tuple[str, ...]]:
    return {name: splits for name in names}


# tokenizer.ggml.pre -> regexes applied one after the other, each splitting the pieces the
# previous ones left (llama.cpp's unicode_regex_split; unmatched text stays a piece of its own).
_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    # llama.cpp's own "default" is a punctuation-first mix that no HF tokenizer uses; files
    # marked "default" (or unmarked) are old GPT-2-style ones, so they get GPT-2's regex.
    **_names((_GPT2,), "default", "gpt2", "gpt-2", "phi-2", "jina-es", "jina-de", "jina-v1-en",
             "jina-v2-es", "jina-v2-de", "jina-v2-code", "roberta-bpe", "gigachat", "mpt", "olmo",
             "jais", "exaone4", "trillion", "granite-docling", "a.x-4.0", "mellum"),
    **_names((_LLAMA3,), "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
             "midm-2.0", "lfm2", "dbrx", "smaug-bpe", "glm4", "chatglm-bpe"),
    **_names((_QWEN2,), "qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "megrez", "hunyuan",
             "grok-2"),
    # SmolLM / StarCoder: every digit alone, then GPT-2's regex.
    **_names((r"\p{N}", _GPT2), "smollm", "starcoder", "refact", "command-r", "codeshell",
             "exaone", "minerva-7b"),
    **_names((_TEKKEN,), "tekken"),
    **_names((_GPT4O,), "gpt-4o", "llama4", "minimax-m2"),
    **_names((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"), "falcon"),
    **_names((r" ?[^(\s|.,!?…。，、।۔،)]+",), "poro-chat", "bloom", "gpt3-finnish"),
    **_names((r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"), "viking"),
    **_names(_DEEPSEEK_LLM, "deepseek-llm"),
    **_names(_DEEPSEEK_CODER, "deepseek-coder"),
    **_names(_DEEPSEEK_V3, "deepseek-v3", "hunyuan-dense"),
}

# Pre-tokenizers for which llama.cpp takes a whole word found in the vocabulary without merging
# (tokenizer.json's "ignore_merges") and adds BOS unless the file says otherwise.
_IGNORE_MERGES_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                "midm-2.0", "lfm2", "tekken"})
_ADD_BOS_PRE = _IGNORE_MERGES_PRE | {"chameleon"}


# -- GGUF: building the Rust tokenizer -----------------------------------------------------

def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in vocab:  # the Rust BPE maps text -> id, so a repeated text keeps its first id
            logger.warning("GGUF vocabulary repeats token %r (ids %d and %d)", token, vocab[token], i)
            continue
        vocab[token] = i
    return vocab


def _byte_level_backend(tokens: list[str], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    splits = _PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        logger.warning("unknown tokenizer.ggml.pre %r; splitting text with GPT-2's regex", pre)
        splits = (_GPT2,)
    pairs = []
    for merge in merges:
        # llama.cpp splits at the first space after the first character
        cut = merge.find(" ", 1)
        if cut < 0:
            raise TokenizerError(f"malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((merge[:cut], merge[cut + 1:]))
    try:
        model = models.BPE(_vocab(tokens), pairs, ignore_merges=pre in _IGNORE_MERGES_PRE)
    except Exception as e:
        raise TokenizerError(f"cannot build a BPE tokenizer from the GGUF vocabulary: {e}") from e
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int],
                          vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges equivalent to SentencePiece BPE: every way to cut a token into two tokens.

    llama.cpp (and SentencePiece) merge whichever adjacent pair forms the token with the
    highest score, so a pair's rank is its result's score; ties go to the lower id.
    """
    mergeable = {t for t, i in vocab.items() if types[i] == _NORMAL}
    ranked = []
    for token in mergeable:
        i = vocab[token]
        for cut in range(1, len(token)):
            if token[:cut] in mergeable and token[cut:] in mergeable:
                ranked.append((-scores[i], i, cut))
    ranked.sort()
    return [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in ranked]


def _sentencepiece_backend(tokens: list[str], scores: list[float], types: list[int],
                           space_prefix: bool) -> tokenizers.Tokenizer:
    vocab = _vocab(tokens)
    unk = next((t for t, i in vocab.items() if types[i] == _UNKNOWN), None)
    try:
        model = models.BPE(vocab, _sentencepiece_merges(tokens, scores, types, vocab),
                           unk_token=unk, byte_fallback=True, fuse_unk=True)
    except Exception as e:
        raise TokenizerError(f"cannot build a SentencePiece tokenizer from the GGUF vocabulary: {e}") from e
    backend = tokenizers.Tokenizer(model)
    # llama.cpp puts the dummy-prefix space before every piece of text that follows a special
    # token, not only at the start: the normalizer runs once per such piece, so Prepend does that.
    steps = [normalizers.Replace(" ", "▁")]
    if space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps)
    # No pre-tokenizer: SentencePiece merges across the whole text, spaces included.
    backend.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_gguf_special_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Make control / unknown tokens special and user-defined ones added tokens.

    llama.cpp cuts these out of the text before tokenizing (user-defined ones always, control
    ones when parsing special tokens), so `<|im_start|>` or Gemma's "\\n\\n" is one id; they keep
    their ids since they are in the vocabulary already. normalized=False: matched in the raw text.
    """
    special = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, types) if kind in (_CONTROL, _UNKNOWN) and t]
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types) if kind == _USER_DEFINED and t]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
