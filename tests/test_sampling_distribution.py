"""Sampling draws from the processed distribution, reproducibly and independently per row."""

import pytest
import torch
from scipy.stats import chisquare

from tokenloom.config import GenerationConfig
from tokenloom.sampling.chain import LogitsChain, SamplingState
from tokenloom.sampling.sampler import make_generators, row_seed

V = 30
NEG = float("-inf")


def logits_row() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return (torch.randn(1, V, generator=g) * 1.5).sort(descending=True).values  # a smooth, long tail


def state(n: int, seeds: list[int], step: int = 0) -> SamplingState:
    tokens = torch.zeros(n, 1, dtype=torch.long)
    return SamplingState(tokens, torch.ones(n, dtype=torch.long), step, torch.full((n,), 100), make_generators(seeds))


def chain(**params) -> LogitsChain:
    return LogitsChain(GenerationConfig.from_dict(params), [0], V)


def check_counts(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Zero draws outside the kept set; chi-squared on the kept set (expected counts >= 5 pooled)."""
    keep = probs > 0
    assert counts[~keep].sum() == 0
    n = counts.sum()
    p = probs[keep].double()
    expected = p / p.sum() * n
    observed = counts[keep].double()
    small = expected < 5
    if small.any():  # pool the rare tokens into one bin
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
    if len(expected) > 1:
        assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


CASES = [dict(temperature=0.7), dict(temperature=1.0, top_k=5), dict(temperature=1.0, top_p=0.8),
         dict(temperature=1.0, min_p=0.1), dict(temperature=1.0, typical_p=0.7),
         dict(temperature=1.3, top_k=10, top_p=0.9, min_p=0.05)]


@pytest.mark.parametrize("params", CASES, ids=lambda p: ",".join(p))
def test_processed_distribution_is_sampled(params):
    x = logits_row()
    ch = chain(**params)
    probs = ch.process(x, state(1, [0]))[0].softmax(-1)
    if any(k in params for k in ("top_k", "top_p", "min_p", "typical_p")):
        assert 1 < int((probs > 0).sum()) < V  # the filter really filtered
    g = torch.Generator().manual_seed(1234)
    draws = torch.multinomial(probs, 20_000, replacement=True, generator=g)
    check_counts(torch.bincount(draws, minlength=V), probs)
    # the per-row path: choose() with one generator per row, fewer draws
    n = 1500
    ids = ch.choose(x.expand(n, V).clone(), state(n, list(range(n))))
    check_counts(torch.bincount(ids, minlength=V), probs)


def test_temperature_changes_the_distribution():
    x = logits_row()
    cold = chain(temperature=0.5).process(x, state(1, [0]))[0].softmax(-1)
    torch.testing.assert_close(cold, (x[0] / 0.5).softmax(-1))
    n = 1500
    ids = chain(temperature=0.5).choose(x.expand(n, V).clone(), state(n, list(range(n))))
    counts = torch.bincount(ids, minlength=V)
    # the plain distribution is rejected for these draws: the test can tell them apart
    plain = x[0].softmax(-1).double() * n
    assert chisquare(counts[:5].double().numpy(), (plain[:5] / plain[:5].sum() * counts[:5].sum()).numpy()).pvalue < 1e-3


def test_same_seeds_same_tokens():
    x = logits_row().expand(6, V).clone()
    params = dict(temperature=1.2, top_p=0.95, xtc_probability=0.5, xtc_threshold=0.05)
    runs = [[chain(**params).choose(x, state(6, [row_seed(42, i) for i in range(6)], step)).tolist()
             for step in range(3)] for _ in range(2)]
    gens = make_generators([row_seed(42, i) for i in range(6)])
    ch = chain(**params)
    seq = [ch.choose(x, SamplingState(torch.zeros(6, 1, dtype=torch.long), torch.ones(6), s, torch.full((6,), 9), gens))
           for s in range(5)]
    gens = make_generators([row_seed(42, i) for i in range(6)])
    seq2 = [ch.choose(x, SamplingState(torch.zeros(6, 1, dtype=torch.long), torch.ones(6), s, torch.full((6,), 9), gens))
            for s in range(5)]
    assert runs[0] == runs[1]
    assert all(torch.equal(a, b) for a, b in zip(seq, seq2))
    assert len({tuple(t.tolist()) for t in seq}) > 1  # the generators advance


@pytest.mark.parametrize("params", [dict(temperature=1.0, top_k=20), dict(temperature=1.0, xtc_probability=0.5),
                                    dict(temperature=1.0, mirostat=2)], ids=["top_k", "xtc", "mirostat"])
def test_rows_are_independent(params):
    """Row 0's tokens depend only on its seed and logits, not on the other rows."""
    x = logits_row()
    g = torch.Generator().manual_seed(3)

    def run(others: torch.Tensor, other_seeds: list[int]) -> list[int]:
        batch = torch.cat([x, others])
        gens = make_generators([11] + other_seeds)
        ch = chain(**params)
        out = []
        for step in range(8):
            st = SamplingState(torch.zeros(len(batch), 1, dtype=torch.long), torch.ones(len(batch)), step,
                               torch.full((len(batch),), 50), gens)
            out.append(int(ch.choose(batch, st)[0]))
        return out

    alone = run(torch.empty(0, V), [])
    assert run(torch.randn(3, V, generator=g), [1, 2, 3]) == alone
    assert run(torch.randn(5, V, generator=g) * 4, [9, 8, 7, 6, 5]) == alone


def test_greedy_is_argmax_and_needs_no_generators():
    x = logits_row().expand(3, V).clone()
    st = SamplingState(torch.zeros(3, 1, dtype=torch.long), torch.ones(3), 0, torch.full((3,), 5), None)
    assert chain().choose(x, st).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="generator"):
        chain(temperature=0.8).choose(x, st)
