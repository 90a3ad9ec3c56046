"""encoder_no_repeat_ngram_size: hand-computed cases, then equality with transformers'
EncoderNoRepeatNGramLogitsProcessor on random batched logits (its oracle), then the chain step."""

import pytest
import torch
from transformers.generation import logits_process as T

from tokenloom.config import GenerationConfig
from tokenloom.errors import InvalidParameterError
from tokenloom.sampling import processors as P
from tokenloom.sampling.chain import LogitsChain, SamplingState


def kept(x: torch.Tensor, row: int = 0) -> set[int]:
    return set(torch.nonzero(x[row] > float("-inf")).flatten().tolist())


def test_hand_computed():
    x = torch.zeros(1, 6)
    enc = torch.tensor([[1, 2, 3, 1, 4]])
    assert kept(P.encoder_no_repeat_ngram(x, torch.tensor([[0, 5, 1]]), enc, 2)) == {0, 1, 3, 5}  # 1->2, 1->4
    assert kept(P.encoder_no_repeat_ngram(x, torch.tensor([[0, 1, 2]]), enc, 3)) == {0, 1, 2, 4, 5}  # 1 2 -> 3
    assert kept(P.encoder_no_repeat_ngram(x, torch.tensor([[0, 2, 1]]), enc, 3)) == set(range(6))
    assert kept(P.encoder_no_repeat_ngram(x, torch.tensor([[0]]), enc, 1)) == {0, 5}  # every encoder token
    assert kept(P.encoder_no_repeat_ngram(x, torch.tensor([[1]]), enc, 3)) == set(range(6))  # history too short
    assert kept(P.encoder_no_repeat_ngram(x, torch.tensor([[0, 1]]), enc[:, :1], 2)) == set(range(6))


def test_padding_never_counts():
    x = torch.zeros(2, 6)
    enc = torch.tensor([[1, 2, -1, -1], [3, 1, 4, 5]])  # right-padded
    hist = torch.tensor([[-1, 0, 2], [-1, -1, 1]])        # left-padded
    out = P.encoder_no_repeat_ngram(x, hist, enc, 2)
    assert kept(out, 0) == set(range(6))  # "2 -1" is no n-gram
    assert kept(out, 1) == {0, 1, 2, 3, 5}
    hist = torch.tensor([[-1, -1, 1], [-1, -1, 0]])
    assert kept(P.encoder_no_repeat_ngram(x, hist, enc, 3)) == set(range(6))  # "-1 1" never matches
    assert torch.equal(x, torch.zeros(2, 6))  # input untouched


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("beams", [1, 3])
def test_equals_transformers(n, beams):
    g = torch.Generator().manual_seed(100 * n + beams)
    vocab, batch = 12, 4
    for case in range(8):
        src_len = int(torch.randint(1, 14, (1,), generator=g))
        enc = torch.randint(0, vocab, (batch, src_len), generator=g)
        cur = int(torch.randint(1, 10, (1,), generator=g))
        # decoder histories that often continue the encoder's n-grams
        hist = torch.randint(0, vocab, (batch * beams, cur), generator=g)
        for r in range(batch * beams):
            if cur >= 2 and src_len >= 2 and torch.rand(1, generator=g) < 0.7:
                k = min(cur, src_len, n - 1) if n > 1 else 0
                if k:
                    start = int(torch.randint(0, src_len - k + 1, (1,), generator=g))
                    hist[r, cur - k:] = enc[r // beams, start:start + k]
        logits = torch.randn(batch * beams, vocab, generator=g)
        want = T.EncoderNoRepeatNGramLogitsProcessor(n, enc)(hist, logits)
        ours = P.encoder_no_repeat_ngram(logits, hist, enc.repeat_interleave(beams, 0), n)
        assert torch.equal(ours, want), (n, beams, case)


def _state(hist, enc):
    return SamplingState(hist, torch.ones(hist.shape[0], dtype=torch.long), 1,
                         torch.full((hist.shape[0],), 8), None, encoder_tokens=enc)


def test_chain_step_and_beam_groups():
    g = torch.Generator().manual_seed(0)
    enc = torch.randint(0, 10, (2, 9), generator=g)
    hist = torch.cat([enc[:, 3:5].repeat_interleave(2, 0), torch.randint(0, 10, (4, 2), generator=g)], 1)
    hist[:, -2:] = enc[:, 5:7].repeat_interleave(2, 0)
    logits = torch.randn(4, 10, generator=g)
    chain = LogitsChain(GenerationConfig(encoder_no_repeat_ngram_size=3, num_beams=2), [], 10)
    want = T.EncoderNoRepeatNGramLogitsProcessor(3, enc)(hist, logits)
    assert torch.equal(chain.process(logits, _state(hist, enc)), want)  # 2 encoder rows for 4 beams
    assert torch.equal(chain.process(logits, _state(hist, enc.repeat_interleave(2, 0))), want)
    assert chain.process(logits, _state(hist, enc))[0, int(enc[0, 7])] == float("-inf")


def test_chain_needs_encoder_tokens():
    chain = LogitsChain(GenerationConfig(encoder_no_repeat_ngram_size=2), [], 10)
    hist = torch.tensor([[1, 2]])
    with pytest.raises(InvalidParameterError, match="encoder-decoder"):
        chain.process(torch.zeros(1, 10), _state(hist, None))


def test_config_field():
    assert GenerationConfig().encoder_no_repeat_ngram_size == 0
    assert LogitsChain(GenerationConfig(), [], 10).is_noop
    with pytest.raises(InvalidParameterError, match="encoder_no_repeat_ngram_size"):
        GenerationConfig(encoder_no_repeat_ngram_size=-1).validate()
