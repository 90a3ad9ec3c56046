"""Encoder-decoder generation through the engine and the API, against transformers' generate."""

import pytest
import torch

from tests.tiny import train_tokenizer
from tokenloom.config import GenerationConfig
from tokenloom.engine.beam import beam_search
from tokenloom.engine.generate import TokenLoop
from tokenloom.models import build_model

VOCAB = 320


def tiny_t5(seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=48, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
                                num_heads=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        hf.lm_head.weight.copy_(torch.randn_like(hf.lm_head.weight) * 0.5)
    return hf


@pytest.fixture(scope="module")
def pair():
    hf = tiny_t5()
    return hf, build_model(hf.config.to_dict(), hf.state_dict())


SOURCES = [[5, 17, 33, 90, 2], [44, 12, 2], [7, 8, 9, 10, 11, 12, 13, 2]]


def hf_generate(hf, sources, **kw):
    width = max(map(len, sources))
    ids = torch.zeros(len(sources), width, dtype=torch.long)
    mask = torch.zeros(len(sources), width, dtype=torch.long)
    for i, s in enumerate(sources):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True,
                           output_scores=True, **kw)


def test_greedy_batch_equals_transformers(pair):
    hf, ours = pair
    ref = hf_generate(hf, SOURCES, max_new_tokens=10, min_new_tokens=10, num_beams=1)
    loop = TokenLoop(ours, SOURCES, GenerationConfig.from_dict({"max_new_tokens": 10, "min_new_tokens": 10}), [2])
    while not loop.done:
        loop.step()
    for i, seq in enumerate(loop.seqs):
        assert seq.token_ids == ref.sequences[i, 1:].tolist()  # transformers keeps the start token


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, True), (2.0, False), (0.5, "never")])
def test_beam_search_equals_transformers(pair, length_penalty, early_stopping):
    hf, ours = pair
    ref = hf_generate(hf, SOURCES, max_new_tokens=8, num_beams=3, num_return_sequences=2,
                      length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=2)
    cfg = GenerationConfig.from_dict({"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2,
                                      "length_penalty": length_penalty, "early_stopping": early_stopping})
    got = beam_search(ours, SOURCES, cfg, [2])
    for i, hyps in enumerate(got):
        for j, h in enumerate(hyps):
            ref_ids = [t for t in ref.sequences[2 * i + j, 1:].tolist()]
            while ref_ids and ref_ids[-1] == 0 and len(ref_ids) > len(h.token_ids):
                ref_ids.pop()  # transformers pads shorter hypotheses
            assert h.token_ids == ref_ids
            assert h.score == pytest.approx(ref.sequences_scores[2 * i + j].item(), rel=1e-5, abs=1e-5)


def test_api_on_a_t5_folder(tmp_path, pair):
    import json

    import tokenloom

    hf, _ = pair
    hf.save_pretrained(tmp_path)
    train_tokenizer(VOCAB).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    model = tokenloom.load(tmp_path)
    g = model.generate("translate English to German: The fox.", max_new_tokens=6, min_new_tokens=6)
    src = model.tokenizer.encode("translate English to German: The fox.")
    ref = hf_generate(hf, [src], max_new_tokens=6, min_new_tokens=6, num_beams=1)
    assert g.token_ids == ref.sequences[0, 1:].tolist()
    assert model.translate("The fox.", target="de", max_new_tokens=6, min_new_tokens=6) == g.text.strip()
    beams = model.generate("summarize: The fox ran.", num_beams=2, num_return_sequences=2, max_new_tokens=5)
    assert len(beams) == 2 and beams[0].score >= beams[1].score
    assert isinstance(model.summarize("The fox ran. The dog slept.", max_new_tokens=5), str)


@pytest.mark.parametrize("kind", ["bart", "marian"])
def test_api_bart_family_uses_config_defaults_like_transformers(tmp_path, kind):
    import json

    import transformers

    import tokenloom

    torch.manual_seed(1)
    common = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0 if kind == "marian" else 2,
                  forced_eos_token_id=2)
    if kind == "bart":
        hf = transformers.BartForConditionalGeneration(transformers.BartConfig(**common)).eval()
    else:
        hf = transformers.MarianMTModel(transformers.MarianConfig(**common)).eval()
    hf.save_pretrained(tmp_path)
    train_tokenizer(VOCAB).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    (tmp_path / "generation_config.json").unlink(missing_ok=True)  # defaults from config.json, as older checkpoints
    model = tokenloom.load(tmp_path)
    assert model.defaults.forced_eos_token_id == [2]
    src = model.tokenizer.encode("The quick brown fox.")
    for beams in (1, 3):
        ref = hf_generate(hf, [src], max_new_tokens=7, num_beams=beams, forced_eos_token_id=2, eos_token_id=2)
        g = model.generate("The quick brown fox.", max_new_tokens=7, num_beams=beams)
        g = g[0] if isinstance(g, list) else g
        ref_ids = ref.sequences[0, 1:].tolist()
        assert g.token_ids == ref_ids[:len(g.token_ids)] and set(ref_ids[len(g.token_ids):]) <= {0}
        assert g.token_ids[-1] == 2  # forced end of sequence at the last step


def test_cli_translate_and_summarize(tmp_path, pair):
    import json
    import subprocess
    import sys

    hf, _ = pair
    hf.save_pretrained(tmp_path)
    train_tokenizer(VOCAB).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    lines = tmp_path / "in.txt"
    lines.write_text("The fox.\n\nA bird sings.\n")

    def cli(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "tokenloom", *args], input=stdin, capture_output=True,
                              text=True, timeout=120)

    r = cli("translate", "-m", str(tmp_path), "--target", "de", "-f", str(lines), "--json", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["input"] for x in records] == ["The fox.", "A bird sings."]
    import tokenloom

    model = tokenloom.load(tmp_path)
    assert records[0]["output"] == model.translate("The fox.", target="de", max_new_tokens=4)
    r = cli("summarize", "-m", str(tmp_path), "--max-new-tokens", "4", stdin="The fox ran. The dog slept.\n")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
    r = cli("summarize", "-m", str(tmp_path), stdin="\n\n")
    assert r.returncode == 1 and r.stderr.startswith("tokenloom: error:") and "empty" in r.stderr


def test_encoder_no_repeat_ngram_in_generation(pair):
    hf, ours = pair
    src = [5, 17, 33, 90, 2]
    params = dict(max_new_tokens=8, min_new_tokens=8, encoder_no_repeat_ngram_size=1)
    ref = hf_generate(hf, [src], num_beams=1, **params)
    loop = TokenLoop(ours, [src], GenerationConfig.from_dict(params), [2])
    while not loop.done:
        loop.step()
    assert loop.seqs[0].token_ids == ref.sequences[0, 1:].tolist()
    assert not set(loop.seqs[0].token_ids) & {5, 17, 33, 90}


def test_api_mbart_translate_forces_the_target_language(tmp_path):
    import json

    import transformers

    import tokenloom
    from tokenizers import AddedToken

    torch.manual_seed(2)
    tok = train_tokenizer(VOCAB - 2)
    tok.add_special_tokens([AddedToken("en_XX", special=True), AddedToken("de_DE", special=True)])
    en, de = tok.token_to_id("en_XX"), tok.token_to_id("de_DE")
    cfg = transformers.MBartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                   decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    hf = transformers.MBartForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    model = tokenloom.load(tmp_path)
    out = model.generate_ids  # the ids translate() builds: text, </s>, source language code
    src = model.tokenizer.encode("The fox.", add_special_tokens=False) + [2, en]
    ref = hf_generate(hf, [src], max_new_tokens=6, num_beams=1, forced_bos_token_id=de, forced_eos_token_id=2,
                      eos_token_id=2)
    text = model.translate("The fox.", source="en_XX", target="de_DE", max_new_tokens=6)
    g = out([src], model.generation_config(max_new_tokens=6, forced_bos_token_id=de))[0]
    assert g.token_ids[0] == de and g.token_ids == ref.sequences[0, 1:].tolist()[:len(g.token_ids)]
    assert text == g.text.strip()
    with pytest.raises(Exception, match="target"):
        model.translate("The fox.", source="en_XX", target="xx_YY")


def test_cli_translate_with_a_decoder_only_model(tmp_path):
    import subprocess
    import sys

    from tests.tiny import save_tiny

    save_tiny("llama", tmp_path)
    r = subprocess.run([sys.executable, "-m", "tokenloom", "translate", "-m", str(tmp_path), "--target", "fr",
                        "--max-new-tokens", "3", "--ignore-eos"], input="The fox.\nA bird.\n", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import tokenloom

    model = tokenloom.load(tmp_path)
    expected = model.translate(["The fox.", "A bird."], target="fr", max_new_tokens=3, ignore_eos=True)
    assert r.stdout.splitlines() == expected


def test_encoder_no_repeat_ngram_with_beam_search(tmp_path, pair):
    import json

    import tokenloom

    hf, _ = pair
    hf.save_pretrained(tmp_path)
    train_tokenizer(VOCAB).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    model = tokenloom.load(tmp_path)
    src = model.tokenizer.encode("The quick brown fox jumps.")
    params = dict(max_new_tokens=6, num_beams=3, encoder_no_repeat_ngram_size=2)
    ref = hf_generate(hf, [src], eos_token_id=2, **params)
    g = model.generate("The quick brown fox jumps.", **params)
    assert g.token_ids == [t for t in ref.sequences[0, 1:].tolist()][:len(g.token_ids)]
    assert g.score == pytest.approx(ref.sequences_scores[0].item(), rel=1e-5, abs=1e-5)


def test_contrastive_search_for_encoder_decoder(pair):
    from tokenloom.engine.contrastive import contrastive_search

    _, ours = pair
    params = dict(max_new_tokens=8, min_new_tokens=8, top_k=4)
    greedy_loop = TokenLoop(ours, SOURCES, GenerationConfig.from_dict({"max_new_tokens": 8, "min_new_tokens": 8}), [2])
    while not greedy_loop.done:
        greedy_loop.step()
    zero, _ = contrastive_search(ours, SOURCES, GenerationConfig.from_dict({**params, "penalty_alpha": 0.0}), [2])
    assert zero == [s.token_ids for s in greedy_loop.seqs]  # alpha 0 is greedy
    cfg = GenerationConfig.from_dict({**params, "penalty_alpha": 0.9})
    batched, reasons = contrastive_search(ours, SOURCES, cfg, [2])
    assert batched != zero and reasons == ["length"] * 3
    for src, got in zip(SOURCES, batched):
        alone, _ = contrastive_search(ours, [src], cfg, [2])
        assert alone[0] == got


def test_diverse_beam_and_beam_sampling_run_for_encoder_decoder(pair):
    _, ours = pair
    base = {"max_new_tokens": 6, "num_beams": 4, "num_return_sequences": 2}
    plain = beam_search(ours, SOURCES, GenerationConfig.from_dict(base), [2])
    diverse = beam_search(ours, SOURCES, GenerationConfig.from_dict(
        {**base, "num_beam_groups": 2, "diversity_penalty": 5.0}), [2])
    assert [len(h) for h in diverse] == [2, 2, 2]
    assert any(d[1].token_ids[0] != d[0].token_ids[0] for d in diverse)  # groups start differently
    assert diverse != plain
    sampled = {"do_sample": True, "temperature": 1.5, "seed": 3}
    a = beam_search(ours, SOURCES, GenerationConfig.from_dict({**base, **sampled}), [2])
    b = beam_search(ours, SOURCES, GenerationConfig.from_dict({**base, **sampled}), [2])
    c = beam_search(ours, SOURCES, GenerationConfig.from_dict({**base, **sampled, "seed": 4}), [2])
    assert [[h.token_ids for h in x] for x in a] == [[h.token_ids for h in x] for x in b]
    assert [[h.token_ids for h in x] for x in a] != [[h.token_ids for h in x] for x in c]
