"""SentencePiece model files (`*.spm`, `*.model`) without the `sentencepiece` package, and Marian folders.

A SentencePiece model is a `ModelProto` protobuf (sentencepiece_model.proto). We read the few
fields we need with a hand-written wire-format parser:

    ModelProto      1: pieces (repeated SentencePiece)  2: trainer_spec  3: normalizer_spec
    SentencePiece   1: piece (string)  2: score (float)  3: type (1 normal, 2 unknown, 3 control,
                    4 user defined, 5 unused, 6 byte)
    TrainerSpec     3: model_type (1 unigram, 2 bpe, 3 word, 4 char)  35: byte_fallback
    NormalizerSpec  1: name  2: precompiled_charsmap  3: add_dummy_prefix
                    4: remove_extra_whitespaces  5: escape_whitespaces

and rebuild the unigram tokenizer as transformers' `SpmConverter` does: the precompiled normalizer
(nmt_nfkc for Opus-MT), runs of spaces collapsed, Metaspace ("▁") pre-tokenizer, Unigram model.

Opus-MT (Marian) checkpoints ship `source.spm`, `target.spm` and `vocab.json` but no
`tokenizer.json`. Following transformers' `MarianTokenizer`: text is segmented by the source spm,
each piece mapped through `vocab.json` (pieces it lacks become `<unk>`), then `</s>` appended;
decoding joins the pieces of `vocab.json` and turns "▁" into spaces.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from tokenloom.errors import TokenizerError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM = 1


@dataclass
class SentencePieceModel:
    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    normalizer_name: str = "nmt_nfkc"
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _fields(buf: bytes):
    """(field number, wire type, value) of each field of one protobuf message."""
    pos, end = 0, len(buf)

    def varint():
        nonlocal pos
        shift = result = 0
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    while pos < end:
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            yield num, wire, varint()
        elif wire == 1:
            yield num, wire, buf[pos:pos + 8]
            pos += 8
        elif wire == 2:
            n = varint()
            yield num, wire, buf[pos:pos + n]
            pos += n
        elif wire == 5:
            yield num, wire, buf[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def parse_model(data: bytes) -> SentencePieceModel:
    """Read a SentencePiece `ModelProto`."""
    m = SentencePieceModel()
    for num, _, value in _fields(data):
        if num == 1:
            piece, score, kind = "", 0.0, NORMAL
            for n, _, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            m.pieces.append(piece)
            m.scores.append(score)
            m.types.append(kind)
        elif num == 2:
            for n, _, v in _fields(value):
                if n == 3:
                    m.model_type = v
                elif n == 35:
                    m.byte_fallback = bool(v)
        elif num == 3:
            for n, _, v in _fields(value):
                if n == 1:
                    m.normalizer_name = v.decode("utf-8")
                elif n == 2:
                    m.precompiled_charsmap = bytes(v)
                elif n == 3:
                    m.add_dummy_prefix = bool(v)
                elif n == 4:
                    m.remove_extra_whitespaces = bool(v)
                elif n == 5:
                    m.escape_whitespaces = bool(v)
    return m


def read_model(path: str | Path) -> SentencePieceModel:
    try:
        return parse_model(Path(path).read_bytes())
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise TokenizerError(f"cannot read SentencePiece model {path}: {e}") from e


def unigram_backend(m: SentencePieceModel, path: str | Path = "") -> tokenizers.Tokenizer:
    """The unigram tokenizer `m` describes, with SentencePiece's ids (control and unused pieces are
    never matched from text, so they are left out of the lattice under an impossible spelling)."""
    if m.model_type != UNIGRAM:
        raise TokenizerError(f"{path}: only unigram SentencePiece models are supported "
                             f"(model_type {m.model_type})")
    if UNKNOWN not in m.types:
        raise TokenizerError(f"{path}: the SentencePiece model has no unknown piece")
    vocab = [(p if t not in (CONTROL, UNUSED) else f"\u0000{i}\u0000", s)
             for i, (p, s, t) in enumerate(zip(m.pieces, m.scores, m.types))]
    backend = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=m.types.index(UNKNOWN),
                                                  byte_fallback=m.byte_fallback))
    steps = []
    if m.precompiled_charsmap:
        steps.append(normalizers.Precompiled(m.precompiled_charsmap))
    elif m.normalizer_name in ("nfkc", "nmt_nfkc"):
        steps.append(normalizers.NFKC())
    if m.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    scheme = "always" if m.add_dummy_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    user = [p for p, t in zip(m.pieces, m.types) if t == USER_DEFINED]
    if user:
        backend.add_tokens([AddedToken(p, normalized=False, special=False) for p in user])
    return backend


def marian_backends(folder: Path, tok_config: dict) -> tuple[tokenizers.Tokenizer, tokenizers.Tokenizer,
                                                                  dict[str, int]]:
    """(source segmenter over spm ids, backend over vocab.json ids for decoding, vocab.json)."""
    source = folder / tok_config.get("source_spm", "source.spm")
    vocab_path = folder / tok_config.get("vocab", "vocab.json")
    if tok_config.get("separate_vocabs"):
        raise TokenizerError(f"{folder}: Marian tokenizers with separate source/target vocabularies "
                             "are not supported")
    if not source.is_file() or not vocab_path.is_file():
        raise TokenizerError(f"no tokenizer.json, nor source.spm + vocab.json, in {folder}")
    try:
        vocab = {str(k): int(v) for k, v in json.loads(vocab_path.read_text(encoding="utf-8")).items()}
    except (ValueError, AttributeError) as e:
        raise TokenizerError(f"cannot read {vocab_path}: {e}") from e
    segmenter = unigram_backend(read_model(source), source)

    unk = _special(tok_config, "unk_token", "<unk>")
    if unk not in vocab:
        raise TokenizerError(f"{vocab_path}: the unknown token {unk!r} is not in the vocabulary")
    decoder = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=unk))
    decoder.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = [t for t in (_special(tok_config, "eos_token", "</s>"), unk,
                            _special(tok_config, "pad_token", "<pad>")) if t in vocab]
    codes = [t for t in vocab if t.startswith(">>") and t.endswith("<<")]  # language codes
    for backend in (segmenter, decoder):
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
        if codes:
            backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in codes])
    return segmenter, decoder, vocab


def _special(tok_config: dict, name: str, default: str) -> str:
    value = tok_config.get(name, default)
    if isinstance(value, dict):
        value = value.get("content", default)
    return str(value)
