"""Token log-probabilities of given text (`Model.score`, prompt logprobs) against transformers."""

import pytest
import torch

from tests.tiny import save_tiny
from tokenloom.engine import scoring
from tokenloom.errors import PromptError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import tokenloom

    folder = tmp_path_factory.mktemp("llama")
    hf = save_tiny("llama", folder)
    return tokenloom.load(folder), hf


def hf_logprobs(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].log_softmax(-1)


def test_score_equals_transformers(tiny):
    model, hf = tiny
    prompt, cont = "Once upon a time", " there was a little fox"
    s = model.score(prompt, cont)
    p_ids = model.tokenizer.encode(prompt)
    ids = p_ids + s.token_ids
    ref = hf_logprobs(hf, ids)
    expected = [ref[len(p_ids) + i - 1, t].item() for i, t in enumerate(s.token_ids)]
    assert s.token_ids == model.tokenizer.encode(cont, add_special_tokens=False)
    assert s.logprobs == pytest.approx(expected, abs=1e-5)
    assert s.total == pytest.approx(sum(expected), abs=1e-4)
    assert "".join(s.tokens) == cont


def test_sequence_logprobs_top_alternatives_and_chunks(tiny, monkeypatch):
    model, hf = tiny
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    ref = hf_logprobs(hf, ids)
    monkeypatch.setattr(scoring, "CHUNK", 7)  # force several chunks
    out = scoring.sequence_logprobs(model.network, ids, 0, top_n=3)
    assert len(out) == len(ids) - 1
    for pos, t in enumerate(out, start=1):
        assert t.token_id == ids[pos]
        assert t.logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-5)
        top_ids = [i for i, _ in t.top]
        assert top_ids == ref[pos - 1].topk(3).indices.tolist()


def test_score_refuses_empty_continuation(tiny):
    model, _ = tiny
    with pytest.raises(PromptError, match="continuation is empty"):
        model.score("Hello", "")
