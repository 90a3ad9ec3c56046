"""Marian (Opus-MT) folders: source.spm + vocab.json, no tokenizer.json.

A tiny SentencePiece unigram model is trained here (the `sentencepiece` package, test-only), put in
a fake Marian folder, and our encodings compared with transformers' MarianTokenizer.
"""

import json
import unicodedata

import pytest

spm = pytest.importorskip("sentencepiece")

from transformers import MarianTokenizer  # noqa: E402

from tokenloom.tokenizer.sentencepiece import UNKNOWN, read_model  # noqa: E402
from tokenloom.tokenizer.tokenizer import Tokenizer  # noqa: E402

CORPUS = """The quick brown fox jumps over the lazy dog.
A journey of a thousand miles begins with a single step.
Le renard brun rapide saute par-dessus le chien paresseux.
Der schnelle braune Fuchs springt über den faulen Hund.
Ｆｕｌｌｗｉｄｔｈ letters, ligatures ﬁ ﬂ and numbers ①②③ 12345 67890.
Translation models split words into pieces; rare words become many pieces.
Café, naïve, façade, jalapeño — déjà vu!  Spaces   and	tabs.
How are you today? I am fine, thank you. What time is it?
""" * 4

TEXTS = [
    "The quick brown fox.",
    "  leading and trailing spaces  ",
    "multiple    spaces\tand\ttabs\nnewlines",
    "Ｆｕｌｌｗｉｄｔｈ ﬁ ① ½",
    "Café naïve déjà vu",
    "unseen characters: 漢字 ✓ 🙂",
    "",
    "a",
    "The lazy dog </s> is asleep",
    "Numbers 3.14159 and 2,718",
    "zebra quixotic xylophone",
]


@pytest.fixture(scope="module")
def marian_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("marian")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "m"),
                                   vocab_size=120, model_type="unigram", normalization_rule_name="nmt_nfkc",
                                   character_coverage=1.0, minloglevel=2)
    data = (root / "m.model").read_bytes()
    (root / "source.spm").write_bytes(data)
    (root / "target.spm").write_bytes(data)
    proc = spm.SentencePieceProcessor(model_file=str(root / "m.model"))
    # like Opus-MT: specials first, then the pieces in another order; a few pieces left out (-> <unk>)
    pieces = [proc.id_to_piece(i) for i in range(proc.get_piece_size())]
    normal = [p for p in pieces if p not in ("<unk>", "<s>", "</s>")]
    vocab = {"</s>": 0, "<unk>": 1, ">>fr<<": 2}
    for p in reversed(normal[:-5]):
        vocab[p] = len(vocab)
    vocab["<pad>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"source_lang": "en", "target_lang": "fr", "unk_token": "<unk>", "eos_token": "</s>",
         "pad_token": "<pad>", "model_max_length": 512, "separate_vocabs": False}), encoding="utf-8")
    (root / "config.json").write_text(json.dumps(
        {"model_type": "marian", "eos_token_id": 0, "pad_token_id": len(vocab) - 1,
         "decoder_start_token_id": len(vocab) - 1}), encoding="utf-8")
    return root


def test_reads_the_model(marian_folder):
    m = read_model(marian_folder / "source.spm")
    proc = spm.SentencePieceProcessor(model_file=str(marian_folder / "source.spm"))
    assert m.pieces == [proc.id_to_piece(i) for i in range(proc.get_piece_size())]
    assert m.scores == pytest.approx([proc.get_score(i) for i in range(proc.get_piece_size())])
    assert m.types.index(UNKNOWN) == proc.unk_id()
    assert m.normalizer_name == "nmt_nfkc" and m.precompiled_charsmap


def test_pieces_equal_sentencepiece(marian_folder):
    ours = Tokenizer.from_folder(marian_folder)
    proc = spm.SentencePieceProcessor(model_file=str(marian_folder / "source.spm"))
    for text in TEXTS + CORPUS.splitlines():
        if "</s>" in text:
            continue
        got = ours.segmenter.encode(text, add_special_tokens=False).tokens
        assert got == proc.encode(text, out_type=str), text


def test_equals_transformers(marian_folder):
    ours = Tokenizer.from_folder(marian_folder)
    theirs = MarianTokenizer.from_pretrained(str(marian_folder))
    assert ours.eos_token_id == theirs.eos_token_id and ours.add_eos and not ours.add_bos
    assert ours.pad_token_id == theirs.pad_token_id and ours.unk_token_id == theirs.unk_token_id
    texts = TEXTS + CORPUS.splitlines()[:8] + [">>fr<< The quick brown fox."]
    for text in texts:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert ours.encode_batch(texts) == theirs(texts)["input_ids"]
    assert ours.encode("The fox", add_special_tokens=False) == theirs("The fox", add_special_tokens=False)["input_ids"]
    for text in texts:
        ids = theirs(text)["input_ids"]
        # MarianTokenizer strips the whole text; we keep a prefix-stable decode for streaming, so the
        # spaces of pieces next to skipped <unk>s at the ends may remain
        assert ours.decode(ids).strip() == theirs.decode(ids, skip_special_tokens=True), text


def test_decode_round_trip(marian_folder):
    ours = Tokenizer.from_folder(marian_folder)
    checked = 0
    for text in [t.strip() for t in CORPUS.splitlines()[:8]] + ["Café déjà vu", "How are you?"]:
        ids = ours.encode(text)
        if ours.unk_token_id not in ids:  # pieces left out of vocab.json come back as <unk>
            assert ours.decode(ids) == " ".join(unicodedata.normalize("NFKC", text).split()), text
            checked += 1
    assert checked >= 3
    assert ours.vocab_size == len(json.loads((marian_folder / "vocab.json").read_text()))
