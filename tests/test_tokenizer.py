"""Tokenizer: tokenizer.json folders and GGUF metadata, on tiny hand-made vocabularies.

The GGUF SentencePiece path is checked against a direct Python port of llama.cpp's
`llm_tokenizer_spm` (merge the adjacent pair forming the highest-scoring token, leftmost on
ties, bytes for what no token covers); the byte-level path against hand-worked splits for
each `tokenizer.ggml.pre`. The slow test runs the real SmolLM2 GGUF against transformers.
"""

from __future__ import annotations

import json
import logging
import random

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from tokenloom.errors import TokenizerError
from tokenloom.tokenizer.tokenizer import Tokenizer

VARIED_TEXTS = [
    "Hello world",
    "Hello, world! How are you doing today?",
    "I'm sure they'll say it's fine, but we've seen what you'd do.",
    "def foo(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "Numbers: 12345 and 3.14159 and 1,000,000 and -42",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧 and ❤️",
    "中文测试：你好，世界！",
    "日本語のテキストです。",
    "Ünïcödé àccents: café, naïve, résumé, Ångström",
    "multiple   spaces    here",
    "  leading and trailing  ",
    "tabs\tand\ttabs",
    "line one\nline two\n\nline four\n\n\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "mixed<|im_end|>special<|im_start|>tokens",
    "JSON: {\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "Math: ∑ x² ≤ ∞ ± √2",
    "",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (how byte-level vocabularies spell bytes)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_CHARS = [bytes_to_unicode()[b] for b in range(256)]


def byte_level_metadata(pre: str, merges: list[str], specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                        **extra) -> dict:
    """Tiny "gpt2" GGUF metadata: special tokens, the 256 byte characters, then merged tokens."""
    tokens = list(specials) + BYTE_CHARS
    for merge in merges:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        **extra,
    }


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.id_to_token(i) for i in tok.encode(text, add_special_tokens=False)]


# -- byte-level BPE from GGUF ---------------------------------------------------------------

MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "12 3", "Ġ 1", "i n", "Ġ in", "' s"]


def test_smollm_splits_digits_one_by_one_gpt2_does_not():
    smol = Tokenizer.from_gguf_metadata(byte_level_metadata("smollm", MERGES))
    gpt2 = Tokenizer.from_gguf_metadata(byte_level_metadata("gpt-2", MERGES))
    assert pieces(smol, "12345") == ["1", "2", "3", "4", "5"]
    assert pieces(smol, " 123") == ["Ġ", "1", "2", "3"]
    # GPT-2's regex keeps " 123" one piece, so the merges join it
    assert pieces(gpt2, "12345") == ["123", "4", "5"]
    assert pieces(gpt2, " 123") == ["Ġ", "123"]


def test_llama3_groups_digits_by_three_and_splits_contractions():
    tok = Tokenizer.from_gguf_metadata(byte_level_metadata("llama-bpe", MERGES))
    assert pieces(tok, "1231231") == ["123", "123", "1"]
    # case-insensitive contractions: "'S" is its own piece, not glued to the letters
    assert pieces(tok, "it'S") == ["i", "t", "'", "S"]
    # llama3 files add BOS unless they say otherwise
    no_flag = byte_level_metadata("llama-bpe", MERGES)
    del no_flag["tokenizer.ggml.add_bos_token"]
    assert Tokenizer.from_gguf_metadata(no_flag).encode("in") == [1, tok.token_to_id("in")]


def test_qwen2_splits_digits_and_keeps_punctuation_before_letters():
    tok = Tokenizer.from_gguf_metadata(byte_level_metadata("qwen2", MERGES))
    assert pieces(tok, "123") == ["1", "2", "3"]
    assert pieces(tok, " the") == ["Ġthe"]


def test_unknown_pre_tokenizer_falls_back_to_gpt2_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        tok = Tokenizer.from_gguf_metadata(byte_level_metadata("no-such-pre", MERGES))
    assert "no-such-pre" in caplog.text
    assert pieces(tok, " 123") == ["Ġ", "123"]


def test_control_tokens_are_single_ids_and_skipped_when_decoding():
    tok = Tokenizer.from_gguf_metadata(byte_level_metadata("smollm", MERGES))
    ids = tok.encode("<|im_start|>user\nthe<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nthe"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nthe<|im_end|>"


def test_byte_level_round_trip_and_attributes():
    tok = Tokenizer.from_gguf_metadata(byte_level_metadata(
        "smollm", MERGES, **{"tokenizer.chat_template": "{{ messages }}"}))
    for text in VARIED_TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.vocab_size == 3 + 256 + len(MERGES)
    assert tok.bos_token_id == 1 and not tok.add_bos
    assert tok.pad_token_id == 0
    # EOS from the metadata, plus <|endoftext|> and <|im_end|> that llama.cpp treats as end of generation
    assert tok.eos_token_ids[0] == 2 and set(tok.eos_token_ids) == {0, 2}
    assert tok.chat_template == "{{ messages }}"
    assert tok.byte_fallback_ids == frozenset()


def test_user_defined_tokens_match_whole_but_are_not_special():
    meta = byte_level_metadata("qwen2", MERGES, specials=("<|endoftext|>", "<think>"))
    meta["tokenizer.ggml.token_type"][1] = 4
    tok = Tokenizer.from_gguf_metadata(meta)
    ids = tok.encode("<think>in")
    assert ids == [1, tok.token_to_id("in")]
    assert tok.decode(ids) == "<think>in"


def test_encode_batch_matches_encode():
    tok = Tokenizer.from_gguf_metadata(byte_level_metadata("smollm", MERGES, **{"tokenizer.ggml.add_bos_token": True}))
    texts = ["the 123", "", "<|im_start|>in"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_special_tokens=False) == [tok.encode(t, False) for t in texts]
    assert tok.encode("the")[0] == 1 and tok.encode("the", add_special_tokens=False)[0] != 1


def test_gguf_errors_are_tokenizer_errors():
    with pytest.raises(TokenizerError, match="unsupported"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
    meta = byte_level_metadata("gpt2", MERGES)
    del meta["tokenizer.ggml.merges"]
    with pytest.raises(TokenizerError, match="merges"):
        Tokenizer.from_gguf_metadata(meta)


# -- SentencePiece ("llama") from GGUF ------------------------------------------------------

def spm_metadata(pieces_scores: dict[str, float], space_prefix: bool = True, specials=("<start_of_turn>",),
                 user_defined=(), **extra) -> dict:
    """Tiny "llama" GGUF metadata: <unk> <s> </s>, the 256 byte tokens, specials, then pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for t in specials:
        tokens.append(t); types.append(3); scores.append(0.0)
    for t in user_defined:
        tokens.append(t); types.append(4); scores.append(0.0)
    for t, s in pieces_scores.items():
        tokens.append(t); types.append(1); scores.append(s)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": space_prefix,
        **extra,
    }


def reference_spm(text: str, vocab: dict[str, int], scores: list[float], space_prefix: bool) -> list[int]:
    """llama.cpp's llm_tokenizer_spm, naively: best-scoring adjacent pair first, leftmost on ties."""
    text = (" " + text if space_prefix else text).replace(" ", "▁")
    symbols = list(text)
    while True:
        best = None
        for i in range(len(symbols) - 1):
            merged = symbols[i] + symbols[i + 1]
            if merged in vocab and (best is None or scores[vocab[merged]] > scores[vocab[best[1]]]):
                best = (i, merged)
        if best is None:
            break
        symbols[best[0]:best[0] + 2] = [best[1]]
    ids = []
    for s in symbols:
        if s in vocab:
            ids.append(vocab[s])
        else:
            ids.extend(vocab[f"<0x{b:02X}>"] for b in s.encode("utf-8"))
    return ids


def test_spm_merges_by_score_not_by_position():
    # "bc" outranks "ab": SentencePiece gives a + bc; a left-to-right merge would give ab + c
    tok = Tokenizer.from_gguf_metadata(spm_metadata({"a": -1, "b": -2, "c": -3, "ab": -20, "bc": -10}, False))
    assert pieces(tok, "abc") == ["a", "bc"]
    tok = Tokenizer.from_gguf_metadata(spm_metadata({"a": -1, "b": -2, "c": -3, "ab": -10, "bc": -20}, False))
    assert pieces(tok, "abc") == ["ab", "c"]


def test_spm_space_prefix_byte_fallback_and_specials():
    vocab = {"▁": -1, "h": -2, "i": -3, "▁h": -4, "▁hi": -5}
    tok = Tokenizer.from_gguf_metadata(spm_metadata(vocab, space_prefix=True))
    assert pieces(tok, "hi hi") == ["▁hi", "▁hi"]
    # not in the vocabulary: UTF-8 bytes
    assert pieces(tok, "é") == ["▁", "<0xC3>", "<0xA9>"]
    # llama.cpp puts the dummy prefix after every special token too
    assert pieces(tok, "hi<start_of_turn>hi") == ["▁hi", "<start_of_turn>", "▁hi"]
    ids = tok.encode("hi hi")
    assert ids[0] == 1 and tok.add_bos  # SentencePiece GGUFs add BOS unless they say otherwise
    assert tok.decode(ids) == "hi hi"  # the dummy prefix is stripped again
    assert tok.decode(tok.encode("é hi")) == "é hi"
    assert tok.byte_fallback_ids == frozenset(range(3, 259))
    no_prefix = Tokenizer.from_gguf_metadata(spm_metadata(vocab, space_prefix=False))
    assert pieces(no_prefix, "hi hi") == ["h", "i", "▁hi"]
    assert no_prefix.decode(no_prefix.encode(" hi")) == " hi"


def test_spm_user_defined_tokens_keep_their_spaces():
    # Gemma's GGUF stores runs of spaces and newlines as user-defined tokens with real spaces
    tok = Tokenizer.from_gguf_metadata(spm_metadata({"▁": -1, "a": -2, "b": -3, "▁b": -4}, False,
                                                    user_defined=("  ", "\n\n")))
    assert pieces(tok, "a  b\n\na") == ["a", "  ", "b", "\n\n", "a"]
    assert tok.decode(tok.encode("a  b\n\na")) == "a  b\n\na"


@pytest.mark.parametrize("space_prefix", [True, False])
def test_spm_matches_llama_cpp_algorithm_on_random_text(space_prefix):
    rng = random.Random(1234)
    alphabet = "abcde▁"
    pool = set(alphabet)
    while len(pool) < 80:  # random multi-character pieces, each with a distinct score
        pool.add("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5))))
    ordered = sorted(pool)
    rng.shuffle(ordered)
    meta = spm_metadata({t: -float(i) for i, t in enumerate(ordered)}, space_prefix, specials=())
    tok = Tokenizer.from_gguf_metadata(meta)
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    for _ in range(300):
        text = "".join(rng.choice("abcde  xé") for _ in range(rng.randint(1, 30)))
        expected = reference_spm(text, vocab, meta["tokenizer.ggml.scores"], space_prefix)
        assert tok.encode(text, add_special_tokens=False) == expected, text
        assert tok.decode(expected) == text


def test_spm_needs_scores():
    meta = spm_metadata({"a": -1})
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(TokenizerError, match="score"):
        Tokenizer.from_gguf_metadata(meta)


def test_gguf_eos_ids_include_eot_and_end_of_turn():
    meta = spm_metadata({"▁": -1, "a": -2}, specials=("<start_of_turn>", "<end_of_turn>"),
                        **{"tokenizer.ggml.eot_token_id": 259, "tokenizer.ggml.add_bos_token": False})
    tok = Tokenizer.from_gguf_metadata(meta)
    end_of_turn = tok.token_to_id("<end_of_turn>")
    assert tok.eos_token_ids == [2, 259, end_of_turn]
    assert not tok.add_bos and tok.encode("a") == [tok.token_to_id("▁"), tok.token_to_id("a")]


# -- tokenizer.json folders -----------------------------------------------------------------

def make_backend(post_bos: bool = False, post_eos: bool = False) -> tokenizers.Tokenizer:
    """Byte-level BPE over the 256 byte characters, with <s> </s> <pad> as ids 0..2."""
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for c in BYTE_CHARS:
        vocab[c] = len(vocab)
    vocab["Ġt"] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab, [("Ġ", "t")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>", "<pad>")])
    if post_bos or post_eos:
        single = ("<s> " if post_bos else "") + "$A" + (" </s>" if post_eos else "")
        backend.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[("<s>", 0), ("</s>", 1)])
    return backend


def write_folder(path, backend=None, tokenizer_config=None, **files):
    (backend or make_backend()).save(str(path / "tokenizer.json"))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, content in files.items():
        (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_folder_reads_special_tokens_in_both_forms(tmp_path):
    write_folder(tmp_path, tokenizer_config={
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False},
        "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True})
    tok = Tokenizer.from_folder(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (0, [1], 2)
    assert tok.encode("a t") == [0] + tok.encode("a t", add_special_tokens=False)
    assert tok.decode(tok.encode("a t")) == "a t"


def test_post_processor_bos_is_not_added_twice(tmp_path):
    write_folder(tmp_path, make_backend(post_bos=True), {"bos_token": "<s>", "add_bos_token": True})
    tok = Tokenizer.from_folder(tmp_path)
    ids = tok.encode("a")
    assert ids[0] == 0 and ids.count(0) == 1


def test_post_processor_decides_when_config_is_silent(tmp_path):
    write_folder(tmp_path, make_backend(post_bos=True, post_eos=True), {"bos_token": "<s>", "eos_token": "</s>"})
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.add_bos and tok.add_eos
    plain = tok.encode("a", add_special_tokens=False)
    assert tok.encode("a") == [0] + plain + [1]


def test_config_can_turn_off_what_post_processor_adds(tmp_path):
    write_folder(tmp_path, make_backend(post_bos=True), {"bos_token": "<s>", "add_bos_token": False})
    tok = Tokenizer.from_folder(tmp_path)
    assert not tok.add_bos
    assert tok.encode("a") == tok.encode("a", add_special_tokens=False)
    assert 0 not in tok.encode("a")


def test_eos_ids_are_the_union_of_all_configs(tmp_path):
    write_folder(tmp_path, tokenizer_config={"eos_token": "</s>"},
                 **{"config.json": {"eos_token_id": [1, 2]}, "generation_config.json": {"eos_token_id": 5}})
    assert Tokenizer.from_folder(tmp_path).eos_token_ids == [1, 2, 5]
    # explicit dicts win over the files in the folder
    tok = Tokenizer.from_folder(tmp_path, generation_config={"eos_token_id": [7, 1]}, config={})
    assert tok.eos_token_ids == [1, 7]


def test_special_tokens_map_and_named_chat_templates(tmp_path):
    write_folder(tmp_path, tokenizer_config={"chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]},
        **{"special_tokens_map.json": {"bos_token": "<s>", "pad_token": {"content": "<pad>"}}})
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.chat_template == "DEFAULT"
    assert tok.bos_token_id == 0 and tok.pad_token_id == 2
    assert not tok.add_bos


def test_chat_template_jinja_file(tmp_path):
    write_folder(tmp_path, tokenizer_config={}, **{"chat_template.jinja": "{{ bos_token }}"})
    assert Tokenizer.from_folder(tmp_path).chat_template == "{{ bos_token }}"


def test_folder_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}))
    with pytest.raises(TokenizerError):
        Tokenizer.from_folder(tmp_path)


def test_token_lookups(tmp_path):
    tok = Tokenizer.from_folder(write_folder(tmp_path))
    assert tok.token_to_id("Ġt") == tok.vocab_size - 1
    assert tok.id_to_token(tok.vocab_size - 1) == "Ġt"
    assert tok.token_to_id("no such token") is None
    assert tok.id_to_token(10**6) is None


# -- the real SmolLM2 GGUF ------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_gguf_against_transformers(smollm2_gguf_path):
    import re
    from pathlib import Path

    import transformers

    from tokenloom.loading.gguf import read_gguf

    path = Path(smollm2_gguf_path)
    tok = Tokenizer.from_gguf_metadata(read_gguf(path).metadata)
    assert pieces(tok, "12345") == ["1", "2", "3", "4", "5"]
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [tok.token_to_id("<|im_start|>")]
    assert not tok.add_bos and tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    assert tok.eos_token_ids[0] == tok.token_to_id("<|im_end|>")
    for text in VARIED_TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text

    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in VARIED_TEXTS:
        if not re.search(r"\d", text):  # transformers' GGUF tokenizer does not split digits
            assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text


# Ids llama.cpp (llama-cpp-python 0.3.36, vocab_only) gives for the Gemma 3 270M GGUF, BOS included.
# transformers' GGUF tokenizer differs on the 32 spaces (16 + 16 + "Version").
GEMMA3_LLAMA_CPP_IDS = {
    "Hello world, 12345!": [2, 9259, 1902, 236764, 236743, 236770, 236778, 236800, 236812, 236810, 236888],
    "multiple   spaces    here\n\n\nend": [2, 43819, 139, 35220, 140, 8472, 109, 643],
    "<start_of_turn>user\nHi there<end_of_turn>\n": [2, 105, 2364, 107, 10979, 993, 106, 107],
    " " * 32 + "Version": [2, 167, 16811],
    "Emoji: 😀🎉👍🏽 中文 café": [2, 127268, 236787, 163543, 242061, 240493, 242713, 17346, 237364, 33443],
}


@pytest.mark.slow
def test_gemma3_gguf_against_llama_cpp(gemma3_gguf_path):
    from tokenloom.loading.gguf import read_gguf

    tok = Tokenizer.from_gguf_metadata(read_gguf(gemma3_gguf_path).metadata)
    for text, ids in GEMMA3_LLAMA_CPP_IDS.items():
        assert tok.encode(text) == ids, text
    for text in VARIED_TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_ids == [tok.token_to_id("<eos>"), tok.token_to_id("<end_of_turn>")]
    assert tok.vocab_size == 262144 and len(tok.byte_fallback_ids) == 256
