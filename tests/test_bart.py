"""BART, mBART and Marian against transformers on tiny random models: logits, caching, batching, greedy."""

import pytest
import torch

from tokenloom.models import build_model

VOCAB, PAD, BOS, EOS = 96, 1, 0, 2
ATOL, RTOL = 1e-5, 1e-4


def make_hf(kind: str):
    import transformers

    common = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0,
                  init_std=0.3, forced_eos_token_id=None)  # wider weights: greedy output not constant
    if kind == "bart":
        cls, cfg = transformers.BartForConditionalGeneration, transformers.BartConfig(
            **common, decoder_start_token_id=EOS, scale_embedding=True)
    elif kind == "mbart":
        cls, cfg = transformers.MBartForConditionalGeneration, transformers.MBartConfig(
            **common, decoder_start_token_id=EOS, activation_function="relu")
    elif kind == "marian":  # Opus-MT style: pad id starts the decoder, swish, scaled embeddings
        cls, cfg = transformers.MarianMTModel, transformers.MarianConfig(
            **common, decoder_start_token_id=PAD, scale_embedding=True, activation_function="swish")
    else:  # Marian with a separate, differently sized target vocabulary and untied embeddings
        cls, cfg = transformers.MarianMTModel, transformers.MarianConfig(
            **common, decoder_vocab_size=80, share_encoder_decoder_embeddings=False,
            decoder_start_token_id=PAD, scale_embedding=True, activation_function="gelu")
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # random norms and biases (final_logits_bias included), so that they matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
        model.final_logits_bias.add_(torch.randn_like(model.final_logits_bias) * 0.1)
    return model


@pytest.fixture(scope="module", params=["bart", "mbart", "marian", "marian_untied"])
def pair(request):
    hf = make_hf(request.param)
    state = hf.state_dict()
    if request.param.startswith("marian"):
        state = {k: v for k, v in state.items() if "embed_positions" not in k}  # not saved by transformers
    return hf, build_model(hf.config.to_dict(), state)


def sources():
    """Two sources of different lengths, right-padded as transformers' tokenizers do."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    ids[:, -1] = EOS
    ids[1, 6] = EOS
    ids[1, 7:] = PAD
    mask = ids != PAD
    return ids, mask


def decoder_ids(ours, n=7):
    """Decoder input starting with the model's decoder start token."""
    ids = torch.randint(3, ours.args.decoder_vocab_size, (2, n), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = ours.decoder_start_token_id
    return ids


def run_decoder(ours, memory, mask, dec, steps=None):
    """Full decoder pass (steps=None) or one chunk at a time of the given sizes."""
    b, t = dec.shape
    cache = ours.make_cache(b, t, memory=memory, memory_mask=mask)
    out, start = [], 0
    for n in steps or [t]:
        out.append(ours(dec[:, start:start + n], torch.arange(start, start + n).expand(b, n), cache))
        start += n
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_logits_equal_transformers(pair):
    hf, ours = pair
    src, mask = sources()
    dec = decoder_ids(ours)
    ref = hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec)
    memory = ours.encode(src, mask)
    torch.testing.assert_close(memory[mask], ref.encoder_last_hidden_state[mask], atol=ATOL, rtol=RTOL)
    got = run_decoder(ours, memory, mask, dec)
    assert got.shape == ref.logits.shape
    torch.testing.assert_close(got, ref.logits, atol=ATOL, rtol=RTOL)
    print(f"max |logit diff| {hf.config.model_type}: {(got - ref.logits).abs().max().item():.2e}")


@torch.no_grad()
def test_cached_decode_equals_full_pass(pair):
    _, ours = pair
    src, mask = sources()
    dec = decoder_ids(ours, 9)
    memory = ours.encode(src, mask)
    full = run_decoder(ours, memory, mask, dec)
    torch.testing.assert_close(run_decoder(ours, memory, mask, dec, [1] * 9), full, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(run_decoder(ours, memory, mask, dec, [4, 1, 3, 1]), full, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_padded_row_equals_alone(pair):
    _, ours = pair
    src, mask = sources()
    dec = decoder_ids(ours)
    batched = run_decoder(ours, ours.encode(src, mask), mask, dec)
    for row in range(2):
        alone = src[row:row + 1, :int(mask[row].sum())]
        single = run_decoder(ours, ours.encode(alone, None), None, dec[row:row + 1])
        torch.testing.assert_close(batched[row], single[0], atol=ATOL, rtol=RTOL)
    # left padding (positions count real tokens only) gives the same as right padding
    n = int(mask[1].sum())
    left = torch.full_like(src[1:2], PAD)
    left[0, -n:] = src[1, :n]
    single = run_decoder(ours, ours.encode(left, left != PAD), left != PAD, dec[1:2])
    torch.testing.assert_close(single[0], batched[1], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_select_repeats_rows(pair):
    _, ours = pair
    src, mask = sources()
    dec = decoder_ids(ours, 6)
    memory = ours.encode(src, mask)
    full = run_decoder(ours, memory, mask, dec)
    cache = ours.make_cache(2, 6, memory=memory, memory_mask=mask)
    ours(dec[:, :3], torch.arange(3).expand(2, 3), cache)
    rows = torch.tensor([1, 1, 0, 1])  # beam search: reorder and repeat
    cache.select(rows)
    d = dec[rows]
    out = torch.cat([ours(d[:, t:t + 1], torch.full((4, 1), t), cache) for t in range(3, 6)], dim=1)
    torch.testing.assert_close(out, full[rows, 3:], atol=ATOL, rtol=RTOL)
    assert not torch.equal(out[0], out[2])  # rows really differ, so the check means something


@torch.no_grad()
def test_greedy_equals_transformers_generate(pair):
    hf, ours = pair
    from transformers import GenerationConfig

    src, mask = sources()
    n = 10
    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, min_length=0, no_repeat_ngram_size=0,
                           forced_bos_token_id=None, forced_eos_token_id=None, bad_words_ids=None,
                           repetition_penalty=1.0, decoder_start_token_id=hf.config.decoder_start_token_id,
                           eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS)
    ref = hf.generate(input_ids=src, attention_mask=mask.long(), generation_config=gen,
                      return_dict_in_generate=True, output_scores=True)
    ref_ids, ref_scores = ref.sequences[:, 1:], torch.stack(ref.scores, dim=1)  # (2, n), (2, n, V)

    memory = ours.encode(src, mask)
    cache = ours.make_cache(2, n, memory=memory, memory_mask=mask)
    tok = torch.full((2, 1), ours.decoder_start_token_id)
    ids, scores = [], []
    for t in range(n):
        logits = ours(tok, torch.full((2, 1), t), cache, last_only=True)[:, -1]  # (2, V)
        tok = logits.argmax(-1, keepdim=True)
        ids.append(tok)
        scores.append(logits)
    ids, scores = torch.cat(ids, dim=1), torch.stack(scores, dim=1)
    for row in range(2):  # transformers stops a row at EOS and pads the rest
        r = ref_ids[row].tolist()
        k = r.index(EOS) + 1 if EOS in r else n
        assert ids[row, :k].tolist() == r[:k]
        # the scores of every step too, so that a repetitive tiny model still checks each step
        torch.testing.assert_close(scores[row, :k], ref_scores[row, :k], atol=ATOL, rtol=RTOL)


def test_decoder_start_and_max_positions(pair):
    hf, ours = pair
    assert ours.is_encoder_decoder
    assert ours.decoder_start_token_id == hf.config.decoder_start_token_id
    assert ours.max_positions == hf.config.max_position_embeddings


def test_marian_sinusoids_match_transformers():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    from tokenloom.models.bart import sinusoidal_table

    for dim in (32, 33):
        ref = MarianSinusoidalPositionalEmbedding(40, dim).create_weight()
        torch.testing.assert_close(sinusoidal_table(40, dim), ref, atol=1e-6, rtol=0)


def test_forward_without_memory_is_an_error(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="memory"):
        ours(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), ours.make_cache(1, 4))


@torch.no_grad()
def test_saved_checkpoint_loads(pair, tmp_path):
    """A `save_pretrained` folder keeps one copy of tied weights (and no Marian sinusoids)."""
    from tokenloom.loading.checkpoint import load_hf_state_dict, read_hf_config

    hf, ours = pair
    hf.save_pretrained(tmp_path)
    config, weights = read_hf_config(tmp_path), load_hf_state_dict(tmp_path)
    assert "lm_head.weight" not in weights
    src, mask = sources()
    dec = decoder_ids(ours)
    ref = hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
    ours = build_model(config, weights)
    torch.testing.assert_close(run_decoder(ours, ours.encode(src, mask), mask, dec), ref, atol=ATOL, rtol=RTOL)
    # old checkpoints may lack final_logits_bias: transformers then uses zeros
    del weights["final_logits_bias"]
    ours = build_model(config, weights)
    got = run_decoder(ours, ours.encode(src, mask), mask, dec)
    torch.testing.assert_close(got, ref - hf.final_logits_bias, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_bfloat16_runs_close_to_float32(pair):
    hf, ours = pair
    low = build_model(hf.config.to_dict(), hf.state_dict(), dtype=torch.bfloat16)
    src, mask = sources()
    dec = decoder_ids(ours)
    memory = low.encode(src, mask)
    assert memory.dtype == torch.bfloat16
    cache = low.make_cache(2, dec.shape[1], dtype=torch.bfloat16, memory=memory, memory_mask=mask)
    got = low(dec, torch.arange(dec.shape[1]).expand(2, -1), cache).float()
    ref = run_decoder(ours, ours.encode(src, mask), mask, dec)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
