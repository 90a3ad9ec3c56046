"""Our architectures against transformers on tiny random models: logits, caching, batching."""

import pytest
import torch

from tests.tiny import VOCAB, make_hf_model
from tokenloom.models import build_model

MODEL_TYPES = ["gpt2", "llama", "mistral", "qwen2", "gemma3_text"]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def pair(request):
    hf = make_hf_model(request.param)
    ours = build_model(hf.config.to_dict(), hf.state_dict())
    return hf, ours


def full_logits(model, ids, pos=None):
    b, t = ids.shape
    pos = torch.arange(t).expand(b, t) if pos is None else pos
    with torch.no_grad():
        return model(ids, pos, model.make_cache(b, t))


def test_logits_equal_transformers(pair):
    hf, ours = pair
    ids = torch.randint(3, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    got = full_logits(ours, ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_cached_decode_equals_full_recompute(pair):
    _, ours = pair
    ids = torch.randint(3, VOCAB, (2, 14), generator=torch.Generator().manual_seed(2))
    full = full_logits(ours, ids)
    cache = ours.make_cache(2, 14)
    steps = [ours(ids[:, :6], torch.arange(6).expand(2, 6), cache)]
    with torch.no_grad():
        for t in range(6, 14):
            steps.append(ours(ids[:, t:t + 1], torch.full((2, 1), t), cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_left_padded_row_equals_alone(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(3, VOCAB, (1, 5), generator=g), torch.randint(3, VOCAB, (1, 12), generator=g)
    ids = torch.zeros(2, 12, dtype=torch.long)
    ids[0, 7:], ids[1] = short[0], long[0]
    pos = torch.stack([torch.cat([torch.full((7,), -1), torch.arange(5)]), torch.arange(12)])
    batched = full_logits(ours, ids, pos)
    torch.testing.assert_close(batched[0, 7:], full_logits(ours, short)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched[1], full_logits(ours, long)[0], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(batched).all()


def test_last_only_matches_last_position(pair):
    _, ours = pair
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        last = ours(ids, torch.arange(9).expand(2, 9), ours.make_cache(2, 9), last_only=True)
    torch.testing.assert_close(last[:, 0], full_logits(ours, ids)[:, -1])
