"""StreamDetokenizer: streamed text == decode(ids), never half a character, O(1) per token.

Two tiny tokenizers: byte-level BPE (characters cut across byte tokens) and SentencePiece with
byte fallback (characters spelled as `<0xAB>` runs, a leading "▁" that decode strips).
"""

from __future__ import annotations

import random

import pytest

from tests.test_tokenizer import MERGES, byte_level_metadata, spm_metadata
from tokenloom.tokenizer.detokenizer import StreamDetokenizer
from tokenloom.tokenizer.tokenizer import Tokenizer

TEXTS = [
    "Hello world, the 123 in",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧 ❤️!",
    "中文测试：你好，世界！ 日本語",
    "café naïve résumé Ångström",
    "  spaces   and\ttabs\n\nnewlines\n",
    "<|im_start|>user\nhi<|im_end|>",
    "a<start_of_turn>b é",
    "",
]


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(byte_level_metadata("smollm", MERGES))


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    vocab = {"▁": -1, "a": -2, "b": -3, "h": -4, "i": -5, "▁a": -6, "▁h": -7, "▁hi": -8, "é": -9, "▁é": -10}
    return Tokenizer.from_gguf_metadata(spm_metadata(vocab, space_prefix=True))


@pytest.fixture(scope="module", params=["byte_level", "spm"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def stream(tok: Tokenizer, ids: list[int], prompt_ids=None, skip_special_tokens=True) -> list[str]:
    det = StreamDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    parts = [det.add(i) for i in ids] + [det.flush()]
    assert det.text == "".join(parts)
    return parts


@pytest.mark.parametrize("skip", [True, False])
def test_streamed_text_equals_decode_on_texts(tok, skip):
    for text in TEXTS:
        ids = tok.encode(text)
        parts = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(parts) == tok.decode(ids, skip_special_tokens=skip)
        # each piece is whole characters: nothing streamed before the end holds U+FFFD
        assert not any("\ufffd" in p for p in parts)


@pytest.mark.parametrize("skip", [True, False])
def test_streamed_text_equals_decode_on_random_ids(tok, skip):
    rng = random.Random(7)
    for _ in range(400):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 25))]
        assert "".join(stream(tok, ids, skip_special_tokens=skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_random_ids_mostly_bytes_of_valid_characters(tok):
    # sequences of pieces of real multi-byte characters, shuffled and cut: the hard cases
    rng = random.Random(11)
    pool = [i for text in TEXTS for i in tok.encode(text, add_special_tokens=False)]
    for _ in range(300):
        start = rng.randrange(len(pool))
        ids = pool[start:start + rng.randint(1, 12)]
        if rng.random() < 0.5:
            rng.shuffle(ids)
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_a_character_is_held_until_its_last_byte(tok):
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # cut across tokens in both tiny vocabularies
    det = StreamDetokenizer(tok)
    parts = [det.add(i) for i in ids]
    assert parts[:-1] == [""] * (len(ids) - 1)
    # SentencePiece byte runs are final only once a normal token follows (or at flush)
    assert parts[-1] + det.flush() in ("😀", " 😀")
    assert tok.decode(ids) in ("😀", " 😀")


def test_spm_first_generated_token_keeps_its_space_after_a_prompt(spm):
    prompt = spm.encode("hi a")
    hi = spm.token_to_id("▁hi")
    det = StreamDetokenizer(spm, prompt)
    assert det.add(hi) == " hi"
    assert det.add(spm.token_to_id("▁a")) == " a"
    # without a prompt the text starts at the first token, whose dummy-prefix space decode drops
    det = StreamDetokenizer(spm)
    assert det.add(hi) == "hi"
    assert det.add(hi) == " hi"


def test_prompt_context_does_not_leak_into_the_output(byte_level):
    prompt = byte_level.encode("the prompt with 😀")
    gen = byte_level.encode(" in the 12", add_special_tokens=False)
    det = StreamDetokenizer(byte_level, prompt)
    text = "".join(det.add(i) for i in gen) + det.flush()
    assert text == " in the 12"
    assert det.text == text


def test_special_tokens_are_skipped_or_kept(byte_level):
    ids = byte_level.encode("<|im_start|>in<|im_end|>")
    assert "".join(stream(byte_level, ids)) == "in"
    assert "".join(stream(byte_level, ids, skip_special_tokens=False)) == "<|im_start|>in<|im_end|>"


def test_window_stays_short(tok):
    ids = tok.encode("hi a " * 400, add_special_tokens=False)
    det = StreamDetokenizer(tok)
    longest = 0
    for i in ids:
        det.add(i)
        longest = max(longest, len(det._ids))
    assert longest <= 4
    assert det.text + det.flush() == tok.decode(ids)


def test_flush_twice_and_add_after_flush(byte_level):
    det = StreamDetokenizer(byte_level)
    ids = byte_level.encode("é", add_special_tokens=False)
    assert det.add(ids[0]) == ""
    assert det.flush() == "\ufffd"  # an unfinished character is replaced, as decode does
    assert det.flush() == ""
    assert det.add(byte_level.token_to_id("in")) == "in"
