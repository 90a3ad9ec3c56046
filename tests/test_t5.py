"""T5 (v1.0 and v1.1 / flan style) against transformers on tiny random models: logits, cache, batch, greedy."""

import pytest
import torch

from tokenloom.models import build_model

VOCAB = 96
START = 0  # decoder start = pad id, as in T5
EOS = 1

STYLES = {
    # T5 v1.0: ReLU FFN, tied head with the d_model ** -0.5 rescale
    "v1.0": dict(feed_forward_proj="relu"),
    # T5 v1.1 / flan-T5: gated GELU (tanh), untied head, no rescale
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def make_hf(style: str, seed: int = 0):
    import transformers

    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=48, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                dropout_rate=0.0, pad_token_id=0, eos_token_id=EOS, decoder_start_token_id=START,
                                **STYLES[style])
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:  # random norm weights, so that every norm matters
                p.add_(torch.randn_like(p) * 0.3)
        if style == "v1.1":  # transformers 5 ties the head to `shared` at init; make it a head of its own
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    return model


@pytest.fixture(scope="module", params=list(STYLES))
def pair(request):
    hf = make_hf(request.param)
    ours = build_model(hf.config.to_dict(), hf.state_dict())
    return request.param, hf, ours


def sources():
    """Two sources of different lengths, right-padded (as transformers' tokenizers pad T5)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.bool)
    ids[1, 13:], mask[1, 13:] = 0, False
    return ids, mask


def decoder_ids(b: int = 2, t: int = 7):
    ids = torch.randint(2, VOCAB, (b, t), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = START
    return ids


def decode_full(model, memory, mask, dec):
    b, t = dec.shape
    cache = model.make_cache(b, t, memory=memory, memory_mask=mask)
    return model(dec, torch.arange(t).expand(b, t), cache)


@torch.no_grad()
def test_logits_equal_transformers(pair):
    style, hf, ours = pair
    ids, mask = sources()
    dec = decoder_ids()
    ref = hf(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec).logits
    memory = ours.encode(ids, mask)
    ref_memory = hf.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(memory[mask], ref_memory[mask], atol=1e-5, rtol=1e-4)
    got = decode_full(ours, memory, mask, dec)
    assert got.shape == ref.shape == (2, 7, VOCAB)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert ours.args.scale_decoder_outputs == (style == "v1.0")
    assert ours.decoder_start_token_id == START


@torch.no_grad()
def test_long_decoder_uses_far_buckets(pair):
    # 40 decoder tokens reach past relative_attention_max_distance (12): the log-spaced buckets
    _, hf, ours = pair
    ids, mask = sources()
    dec = decoder_ids(2, 40)
    ref = hf(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec).logits
    got = decode_full(ours, ours.encode(ids, mask), mask, dec)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_cached_decode_equals_full_pass(pair):
    _, _, ours = pair
    ids, mask = sources()
    dec = decoder_ids(2, 9)
    memory = ours.encode(ids, mask)
    full = decode_full(ours, memory, mask, dec)
    cache = ours.make_cache(2, 9, memory=memory, memory_mask=mask)
    steps = [ours(dec[:, :3], torch.arange(3).expand(2, 3), cache)]
    for t in range(3, 9):
        steps.append(ours(dec[:, t:t + 1], torch.full((2, 1), t), cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    last = ours(dec[:, :4], torch.arange(4).expand(2, 4), ours.make_cache(2, 4, memory=memory, memory_mask=mask),
                last_only=True)
    torch.testing.assert_close(last[:, 0], full[:, 3], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_padded_row_equals_source_alone(pair):
    _, _, ours = pair
    ids, mask = sources()
    dec = decoder_ids()
    batched = decode_full(ours, ours.encode(ids, mask), mask, dec)
    for row, n in ((0, 20), (1, 13)):
        alone_ids = ids[row:row + 1, :n]
        alone = decode_full(ours, ours.encode(alone_ids, torch.ones(1, n, dtype=torch.bool)), None, dec[row:row + 1])
        torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-4)
    # left padding gives the same result: relative positions do not see the padding side
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    left_ids[1, 7:], left_mask[1, 7:] = ids[1, :13], True
    left_ids[0], left_mask[0] = ids[0], True
    left = decode_full(ours, ours.encode(left_ids, left_mask), left_mask, dec)
    torch.testing.assert_close(left, batched, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_cache_select_repeats_rows(pair):
    _, _, ours = pair
    ids, mask = sources()
    dec = decoder_ids(2, 6)
    memory = ours.encode(ids, mask)
    full = decode_full(ours, memory, mask, dec)
    cache = ours.make_cache(2, 6, memory=memory, memory_mask=mask)
    ours(dec[:, :3], torch.arange(3).expand(2, 3), cache)
    rows = torch.tensor([1, 0, 1, 1])  # as beam search: reorder and repeat
    cache.select(rows)
    got = [ours(dec[rows, t:t + 1], torch.full((4, 1), t), cache) for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(got, dim=1), full[rows, 3:], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_greedy_loop_equals_transformers_generate(pair):
    _, hf, ours = pair
    ids, mask = sources()
    n = 10
    ref = hf.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, num_beams=1, max_new_tokens=n,
                      min_new_tokens=n, eos_token_id=EOS, pad_token_id=0)[:, 1:]  # drop the start token
    memory = ours.encode(ids, mask)
    cache = ours.make_cache(2, n, memory=memory, memory_mask=mask)
    tok = torch.full((2, 1), ours.decoder_start_token_id)
    out = []
    for t in range(n):
        logits = ours(tok, torch.full((2, 1), t), cache, last_only=True)
        logits[:, -1, EOS] = -float("inf")  # as min_new_tokens above: no early stop
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    assert torch.equal(torch.cat(out, dim=1), ref)


def test_sanitize_accepts_checkpoint_without_aliases(pair):
    # a saved checkpoint holds `shared` once (no embed_tokens aliases) and, when tied, no lm_head
    style, hf, ours = pair
    weights = {k: v for k, v in hf.state_dict().items() if "embed_tokens" not in k}
    if style == "v1.0":
        weights.pop("lm_head.weight")
    again = build_model(hf.config.to_dict(), weights)
    ids, mask = sources()
    with torch.no_grad():
        a = decode_full(again, again.encode(ids, mask), mask, decoder_ids())
        b = decode_full(ours, ours.encode(ids, mask), mask, decoder_ids())
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_config_variants():
    from tokenloom.models.t5 import ModelArgs

    base = dict(vocab_size=8, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)
    assert ModelArgs.from_config({**base}).scale_decoder_outputs  # old v1.0 configs: no tie key
    assert not ModelArgs.from_config({**base, "tie_word_embeddings": False}).scale_decoder_outputs
    assert not ModelArgs.from_config({**base, "scale_decoder_outputs": False, "tie_word_embeddings": True}).scale_decoder_outputs
    mt5 = ModelArgs.from_config({**base, "model_type": "mt5", "feed_forward_proj": "gated-gelu"})
    assert (mt5.gated, mt5.act, mt5.scale_decoder_outputs, mt5.num_decoder_layers) == (True, "gelu_new", False, 1)
    from tokenloom.errors import ModelLoadError
    with pytest.raises(ModelLoadError):
        ModelArgs.from_config({**base, "feed_forward_proj": "relu-gated"})
