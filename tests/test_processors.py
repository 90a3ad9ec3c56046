"""The logits processors and the chain: hand-computed distributions, and equality with transformers."""

import pytest
import torch
from transformers.generation import logits_process as T

from tokenloom.config import GenerationConfig
from tokenloom.errors import InvalidParameterError
from tokenloom.sampling import processors as P
from tokenloom.sampling.chain import LogitsChain, SamplingState, dry_breakers
from tokenloom.sampling.sampler import make_generators

NEG = float("-inf")
PROBS = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
LOGP = PROBS.log()
B, V = 4, 50


def kept(x: torch.Tensor) -> set[int]:
    assert x.shape[0] == 1
    return set(torch.nonzero(x[0] != NEG).flatten().tolist())


def random_logits(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 3
    x[1, :5] = NEG  # an already-filtered row
    return x


def random_history(seed: int = 0, length: int = 16, high: int = 8) -> torch.Tensor:
    """Small token range so that repeats (and n-grams, bad-word prefixes) occur."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (B, length), generator=g)


def state(tokens, step, max_new=None, prompt_len=None, seeds=None):
    n = tokens.shape[0]
    return SamplingState(tokens, torch.full((n,), prompt_len if prompt_len is not None else tokens.shape[1] - step),
                         step, torch.full((n,), 100) if max_new is None else max_new,
                         make_generators(seeds) if seeds else None)


def chain(eos=(0,), tokenizer=None, **params):
    return LogitsChain(GenerationConfig.from_dict(params), list(eos), V, tokenizer=tokenizer)


def close(a, b):
    assert torch.equal(a == NEG, b == NEG)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ hand-computed distributions

def test_filters_hand_computed():
    assert kept(P.top_k(LOGP, 2)) == {0, 1}
    assert kept(P.top_k(LOGP, 1, min_keep=2)) == {0, 1}
    assert kept(P.top_p(LOGP, 0.8)) == {0, 1, 2}   # ascending cumulative 0.1 <= 0.2 is dropped, 0.25 is not
    assert kept(P.top_p(LOGP, 0.7)) == {0, 1}
    assert kept(P.top_p(LOGP, 0.01)) == {0}
    assert kept(P.min_p(LOGP, 0.3)) == {0, 1, 2}   # threshold 0.15
    assert kept(P.min_p(LOGP, 0.35)) == {0, 1}     # threshold 0.175
    assert kept(P.epsilon_cutoff(LOGP, 0.12)) == {0, 1, 2}
    assert kept(P.epsilon_cutoff(LOGP, 0.9)) == {0}   # the most likely always stays
    # entropy 1.2080 nats: eta = min(0.2, sqrt(0.2) * exp(-1.208)) = 0.1336
    assert kept(P.eta_cutoff(LOGP, 0.2)) == {0, 1, 2}
    # typical: |surprise - entropy| = 0.515, 0.178, 0.689, 1.095 -> order 1, 0, 2, 3; masses .25 .75 .9 1
    assert kept(P.typical_p(LOGP, 0.5)) == {0, 1}
    assert kept(P.typical_p(LOGP, 0.8)) == {0, 1, 2}
    assert kept(P.typical_p(LOGP, 0.2)) == {1}        # the most typical, not the most likely


def test_temperature_values():
    torch.testing.assert_close(P.temperature(torch.tensor([[2.0, -1.0]]), 0.5), torch.tensor([[4.0, -2.0]]))


def test_top_n_sigma_hand_computed():
    x = torch.tensor([[3.0, 2.0, 0.0, -1.0, NEG]])  # finite: mean 1, population std sqrt(2.5) = 1.581
    assert kept(P.top_n_sigma(x, 1.0)) == {0, 1}     # >= 3 - 1.581
    assert kept(P.top_n_sigma(x, 0.5)) == {0}
    assert kept(P.top_n_sigma(x, 3.0)) == {0, 1, 2, 3}
    torch.testing.assert_close(P.top_n_sigma(x, 1.0)[0, :2], x[0, :2])  # kept logits unchanged


def test_xtc_hand_computed():
    on, off = torch.tensor([0.0]), torch.tensor([0.99])
    assert kept(P.xtc(LOGP, 0.14, 0.5, on)) == {2, 3}   # candidates 0, 1, 2: all but the least likely go
    assert kept(P.xtc(LOGP, 0.14, 0.5, off)) == {0, 1, 2, 3}  # the coin said no
    assert kept(P.xtc(LOGP, 0.3, 1.0, on)) == {0, 1, 2, 3}    # one candidate: nothing to exclude
    assert kept(P.xtc(LOGP, 0.2, 1.0, on)) == {1, 2, 3}
    rows = P.xtc(torch.cat([LOGP, LOGP]), 0.14, 0.5, torch.tensor([0.1, 0.6]))
    assert (rows[0] == NEG).tolist() == [True, True, False, False] and not (rows[1] == NEG).any()


def test_mirostat_truncate_hand_computed():
    # surprises in bits: 1, 2, 2.74, 3.32
    assert kept(P.mirostat2_truncate(LOGP, torch.tensor([2.1]))) == {0, 1}
    assert kept(P.mirostat2_truncate(LOGP, torch.tensor([0.5]))) == {0}  # at least the top token
    assert kept(P.mirostat2_truncate(LOGP, torch.tensor([10.0]))) == {0, 1, 2, 3}


def test_penalties_hand_computed():
    x = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = P.repetition_penalty(x, torch.tensor([[-1, 0, 1, 0]]), 2.0)  # once per token, padding ignored
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))
    out = P.presence_frequency_penalty(x, torch.tensor([[0, 0, 2]]), 0.5, 0.25)
    torch.testing.assert_close(out, torch.tensor([[2.0 - 1.0, -2.0, 1.0 - 0.75, 0.5]]))
    assert kept(P.no_repeat_ngram(x, torch.tensor([[1, 2, 3, 1]]), 2)) == {0, 1, 3}  # "1 2" seen: 2 banned
    assert kept(P.no_repeat_ngram(x, torch.tensor([[1, 2, 3, 1]]), 3)) == {0, 1, 2, 3}
    single, multi = P.prepare_sequence_bias({(3,): NEG, (1, 2): NEG, (0, 0, 1): -1.0}, 4)
    out = P.sequence_bias(x, torch.tensor([[0, 0, 1]]), single, multi)
    assert kept(out) == {0, 1}
    assert out[0, 1] == -2.0 and out[0, 0] == 2.0
    out = P.sequence_bias(x, torch.tensor([[0, 0, 0]]), single, multi)
    assert out[0, 1] == -3.0 and kept(out) == {0, 1, 2}
    out = P.force(torch.cat([x, x]), torch.tensor([2]), torch.tensor([False, True]))
    assert torch.equal(out[0], x[0]) and out[1].tolist() == [NEG, NEG, 0.0, NEG]
    out = P.exponential_decay_length_penalty(x, torch.tensor([1]), start=2, factor=2.0, step=4)
    torch.testing.assert_close(out, torch.tensor([[2.0, -2.0 + 2.0 * 3, 1.0, 0.5]]))  # |x| * (2**2 - 1)
    assert torch.equal(P.exponential_decay_length_penalty(x, torch.tensor([1]), 2, 2.0, step=2), x)


class CharTokenizer:
    """One token per character of VOCAB ("<e>" is a special token)."""
    VOCAB = ["<e>", "a", "b", "c", "x", "\n", ": ", "y:", "z", "ca"] + [f"<{i}>" for i in range(10, V)]

    def encode(self, text, add_special_tokens=False):
        return [self.VOCAB.index(ch) for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.VOCAB[i] for i in ids)


def test_dry_breakers_like_llama_cpp():
    tok = CharTokenizer()
    out = dry_breakers(tok, ["\n", ":", "cab", ""], V)
    assert out[5] == [()] and out[6] == [()] and out[7] == [()]   # tokens containing a breaker
    assert out[3] == [(1, 2)]                                     # "c" + "a", "b"
    assert out[9] == [(2,)]                                       # "ca" + "b"
    assert set(out) == {3, 5, 6, 7, 9}


def test_dry_hand_computed():
    a, b, c, x, nl = 1, 2, 3, 4, 5
    logits = torch.zeros(1, V)
    # "a b c x a b": "a b" repeats, c followed it: repeat length 2 = allowed -> multiplier * base ** 0
    out = P.dry(logits, torch.tensor([[a, b, c, x, a, b]]), 0.8, 1.75, 2, -1, {})
    assert out[0, c] == pytest.approx(-0.8) and (out[0, torch.arange(V) != c] == 0).all()
    # "a b c x a b c x a b": "c x a b" ... the longest repeat ending before a c is 6 tokens
    hist = torch.tensor([[a, b, c, x, a, b, c, x, a, b]])
    out = P.dry(logits, hist, 0.8, 1.75, 2, -1, {})
    assert out[0, c] == pytest.approx(-0.8 * 1.75 ** 4)
    assert P.dry(logits, hist, 0.8, 1.75, 7, -1, {})[0, c] == 0            # too short to be penalised
    assert P.dry(logits, hist, 0.8, 1.75, 2, 4, {})[0, c] == 0             # last 4 tokens: "c x a b", no repeat
    # x is a breaker: repeats stop there, so only "a b" (length 2) counts
    assert P.dry(logits, hist, 0.8, 1.75, 2, -1, {x: [()]})[0, c] == pytest.approx(-0.8)
    # a breaker is never penalised itself: "a nl a" -> nl would extend "a" (allowed 1)
    out = P.dry(logits, torch.tensor([[a, nl, b, a]]), 1.0, 2.0, 1, -1, {nl: [()]})
    assert out[0, nl] == 0
    out = P.dry(logits, torch.tensor([[a, nl, b, a]]), 1.0, 2.0, 1, -1, {})
    assert out[0, nl] == -1.0
    # padding is not context
    padded = P.dry(logits, torch.tensor([[-1, -1, -1, a, b, c, x, a, b]]), 0.8, 1.75, 2, -1, {})
    assert padded[0, c] == pytest.approx(-0.8) and (padded[0, torch.arange(V) != c] == 0).all()


def test_dry_multi_token_breaker_in_chain():
    a, b, c, x, z = 1, 2, 3, 4, 8
    hist = torch.tensor([[c, a, b, x, z, c, a, b, x]])  # z would extend "c a b x"; breaker "cab" (3 tokens)
    ch = chain(tokenizer=CharTokenizer(), dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1,
               dry_sequence_breakers=["cab"])
    out = ch.process(torch.zeros(1, V), state(hist, 0))
    assert torch.equal(out, P.dry(torch.zeros(1, V), hist, 1.0, 2.0, 1, -1, {c: [(a, b)]}))
    unbroken = P.dry(torch.zeros(1, V), hist, 1.0, 2.0, 1, -1, {})
    assert unbroken[0, z] == -8.0   # repeat of 4: 2 ** (4 - 1)
    assert out[0, z] == -1.0        # repeats stop after the breaker's last token: only "x" (1) counts
    assert out[0, c] == 0           # c is only a head of a longer breaker, but "c" never followed a repeat of 1...
    # ...whereas with allowed_length 2 nothing reaches the limit
    assert torch.equal(P.dry(torch.zeros(1, V), hist, 1.0, 2.0, 2, -1, {c: [(a, b)]}), torch.zeros(1, V))


# ------------------------------------------------------------------ equality with transformers

@pytest.mark.parametrize("ours, theirs", [
    (lambda x: P.temperature(x, 0.7), T.TemperatureLogitsWarper(0.7)),
    (lambda x: P.top_k(x, 5), T.TopKLogitsWarper(5)),
    (lambda x: P.top_k(x, 1, 2), T.TopKLogitsWarper(1, min_tokens_to_keep=2)),
    (lambda x: P.top_p(x, 0.8), T.TopPLogitsWarper(0.8)),
    (lambda x: P.top_p(x, 0.3, 3), T.TopPLogitsWarper(0.3, min_tokens_to_keep=3)),
    (lambda x: P.min_p(x, 0.1), T.MinPLogitsWarper(0.1)),
    (lambda x: P.min_p(x, 0.9, 2), T.MinPLogitsWarper(0.9, min_tokens_to_keep=2)),
    (lambda x: P.typical_p(x, 0.9), T.TypicalLogitsWarper(0.9)),
    (lambda x: P.typical_p(x, 0.2, 2), T.TypicalLogitsWarper(0.2, min_tokens_to_keep=2)),
    (lambda x: P.epsilon_cutoff(x, 0.02), T.EpsilonLogitsWarper(0.02)),
    (lambda x: P.epsilon_cutoff(x, 0.5, 3), T.EpsilonLogitsWarper(0.5, min_tokens_to_keep=3)),
    (lambda x: P.eta_cutoff(x, 0.02), T.EtaLogitsWarper(0.02)),
    (lambda x: P.eta_cutoff(x, 0.9, 2), T.EtaLogitsWarper(0.9, min_tokens_to_keep=2)),
])
def test_filters_match_transformers(ours, theirs):
    for seed in range(3):
        x = random_logits(seed)
        x[2, 7] = x[2, 8] = x[2].max()  # a tie at the top
        before = x.clone()
        close(ours(x), theirs(None, x.clone()))
        assert torch.equal(x, before)  # does not modify its input


CHAIN_VS_HF = [
    (dict(repetition_penalty=1.3), lambda P_, S: T.RepetitionPenaltyLogitsProcessor(1.3)),
    (dict(repetition_penalty=0.7), lambda P_, S: T.RepetitionPenaltyLogitsProcessor(0.7)),
    (dict(no_repeat_ngram_size=2), lambda P_, S: T.NoRepeatNGramLogitsProcessor(2)),
    (dict(no_repeat_ngram_size=3), lambda P_, S: T.NoRepeatNGramLogitsProcessor(3)),
    (dict(bad_words_ids=[[3], [1, 2], [4, 5, 6], [0]]),
     lambda P_, S: T.NoBadWordsLogitsProcessor([[3], [1, 2], [4, 5, 6], [0]], eos_token_id=0)),
    (dict(logit_bias={4: 2.5, 9: -3.0, 49: -100.0}),
     lambda P_, S: T.SequenceBiasLogitsProcessor([[[4], 2.5], [[9], -3.0], [[49], -100.0]])),
    (dict(min_new_tokens=5), lambda P_, S: T.MinNewTokensLengthLogitsProcessor(P_, 5, [0, 7])),
    (dict(min_new_tokens=3), lambda P_, S: T.MinNewTokensLengthLogitsProcessor(P_, 3, [0, 7])),
    (dict(forced_eos_token_id=[2, 3]), lambda P_, S: T.ForcedEOSTokenLogitsProcessor(P_ + 5, [2, 3])),
    (dict(forced_eos_token_id=[2], _max_new=7), lambda P_, S: T.ForcedEOSTokenLogitsProcessor(P_ + 7, [2])),
    (dict(exponential_decay_length_penalty=[1, 1.5]),
     lambda P_, S: T.ExponentialDecayLengthPenalty((1, 1.5), [0, 7], P_)),
    (dict(exponential_decay_length_penalty=[4, 1.5]),
     lambda P_, S: T.ExponentialDecayLengthPenalty((4, 1.5), [0, 7], P_)),
    (dict(suppress_tokens=[1, 5, 8]), lambda P_, S: T.SuppressTokensLogitsProcessor([1, 5, 8])),
]


@pytest.mark.parametrize("params, make_hf", CHAIN_VS_HF)
def test_chain_penalties_match_transformers(params, make_hf):
    """Through the chain: state (prompt length, step, max_new_tokens) -> transformers' input_ids view."""
    prompt, step = 12, 4
    params = dict(params)
    max_new = params.pop("_max_new", 5)
    ch = chain(eos=(0, 7), **params)
    for seed in range(3):
        hist, x = random_history(seed, prompt + step), random_logits(seed)
        before = x.clone()
        ours = ch.process(x, state(hist, step, max_new=torch.full((B,), max_new)))
        close(ours, make_hf(prompt, step)(hist, x.clone()))
        assert torch.equal(x, before)


def test_forced_bos_matches_transformers():
    x = random_logits()
    ours = chain(forced_bos_token_id=3).process(x, state(random_history(0, 6), 0))
    close(ours, T.ForcedBOSTokenLogitsProcessor(3)(torch.zeros(B, 1, dtype=torch.long), x.clone()))
    later = chain(forced_bos_token_id=3).process(x, state(random_history(0, 6), 1))
    assert torch.equal(later, x)


def test_forced_eos_per_row_limit():
    x = random_logits()
    out = chain(forced_eos_token_id=[2]).process(x, state(random_history(0, 8), 3, max_new=torch.tensor([4, 9, 4, 3])))
    forced = [bool((out[i] != NEG).sum() == 1 and out[i, 2] == 0) for i in range(B)]
    assert forced == [True, False, True, False]
    assert torch.equal(out[1], x[1])


def test_presence_frequency_counts_only_generated():
    x = torch.zeros(1, V)
    hist = torch.tensor([[5, 5, 5, 6, 6, 7]])  # prompt 5 5 5, generated 6 6 7
    out = chain(presence_penalty=1.0, frequency_penalty=0.5).process(x, state(hist, 3))
    assert out[0, 5] == 0 and out[0, 6] == -2.0 and out[0, 7] == -1.5
    assert torch.equal(chain(presence_penalty=1.0).process(x, state(hist, 0)), x)


def test_padding_is_not_a_token():
    """A left-padded row gets what the same row alone gets."""
    x = random_logits()[:1].repeat(2, 1)
    row = torch.tensor([1, 2, 3, 1, 2, 4, 1, 2])
    hist = torch.stack([torch.cat([torch.full((3,), -1), row]), torch.cat([torch.tensor([9, 9, 9]), row])])
    for params, counts_9 in [(dict(repetition_penalty=1.5), True), (dict(no_repeat_ngram_size=2), False),
                             (dict(bad_words_ids=[[9, 1, 2, 3, 1, 2, 4, 1, 2, 5]]), True),
                             (dict(dry_multiplier=1.0, dry_sequence_breakers=[]), False)]:
        ch = chain(**params)
        padded = ch.process(x[:1], state(hist[:1], 2))
        alone = ch.process(x[:1], state(row[None], 2))
        assert torch.equal(padded, alone), params
        with_9 = ch.process(x[1:], state(hist[1:], 2))
        assert not torch.equal(with_9, x[:1]), params  # it acts
        assert torch.equal(padded, with_9) != counts_9, params


# ------------------------------------------------------------------ the chain

def test_default_chain_is_noop():
    assert chain().is_noop
    assert chain(temperature=0.0, top_k=5, top_p=0.5).is_noop  # greedy: no sampling filters
    assert chain(temperature=1.0).is_noop                      # plain sampling
    assert not chain(temperature=0.7).is_noop
    assert not chain(repetition_penalty=1.1).is_noop
    assert not chain(temperature=1.0, mirostat=2).is_noop
    x = random_logits()
    assert torch.equal(chain().process(x, state(random_history(), 2)), x)


def test_greedy_applies_penalties_not_filters():
    x = random_logits()
    ch = chain(repetition_penalty=1.5, top_k=2, do_sample=False)
    hist = random_history()
    out = ch.process(x, state(hist, 2))
    close(out, T.RepetitionPenaltyLogitsProcessor(1.5)(hist, x.clone()))
    assert torch.equal(ch.choose(x, state(hist, 2)), out.argmax(-1))


def test_sampler_order_matters():
    x = random_logits(3)
    s = state(random_history(), 1, seeds=[1, 2, 3, 4])
    default = chain(temperature=3.0, min_p=0.2).process(x, s)
    min_p_first = chain(temperature=3.0, min_p=0.2, sampler_order=["min_p", "temperature"]).process(x, s)
    close(default, P.min_p(P.temperature(x, 3.0), 0.2))
    close(min_p_first, P.temperature(P.min_p(x, 0.2), 3.0))
    assert ((min_p_first != NEG).sum(-1) < (default != NEG).sum(-1)).all()  # flattening first keeps more
    # top_k is blind to temperature, so that order does not matter
    a = chain(temperature=3.0, top_k=5).process(x, s)
    b = chain(temperature=3.0, top_k=5, sampler_order=["top_k", "temperature"]).process(x, s)
    close(a, b)
    # a filter left out of sampler_order does not run
    only_temp = chain(temperature=3.0, top_k=5, sampler_order=["temperature"]).process(x, s)
    close(only_temp, x / 3.0)


def test_transformers_warper_order():
    """Default order = transformers' (temperature, top_k, top_p, min_p, typical, epsilon, eta)."""
    x = random_logits(5)
    params = dict(temperature=0.8, top_k=20, top_p=0.95, min_p=0.02, typical_p=0.97, epsilon_cutoff=1e-3,
                  eta_cutoff=1e-3)
    ours = chain(**params).process(x, state(random_history(), 1))
    hf = x.clone()
    for proc in [T.TemperatureLogitsWarper(0.8), T.TopKLogitsWarper(20), T.TopPLogitsWarper(0.95),
                 T.MinPLogitsWarper(0.02), T.TypicalLogitsWarper(0.97), T.EpsilonLogitsWarper(1e-3),
                 T.EtaLogitsWarper(1e-3)]:
        hf = proc(None, hf)
    close(ours, hf)


def test_chain_validates_token_ids():
    with pytest.raises(InvalidParameterError, match="suppress_tokens"):
        chain(suppress_tokens=[V])
    with pytest.raises(InvalidParameterError, match="logit_bias"):
        chain(logit_bias={V + 3: 1.0})
    with pytest.raises(ValueError, match="tokenizer"):
        chain(dry_multiplier=0.5)  # default breakers need a tokenizer


def test_xtc_in_chain_uses_row_generators():
    x = LOGP.repeat(2, 1)
    x = torch.nn.functional.pad(x, (0, V - 4), value=NEG)
    ch = chain(temperature=1.0, xtc_probability=0.5, xtc_threshold=0.14)
    outs = [ch.process(x, state(torch.zeros(2, 1, dtype=torch.long), 0, seeds=[s, s])) for s in range(20)]
    removed = [bool(o[0, 0] == NEG) for o in outs]
    assert 3 <= sum(removed) <= 17              # about half the time
    assert all(torch.equal(o[0], o[1]) for o in outs)  # same seed, same coin


def test_mirostat_updates_mu_and_select_rows():
    ch = chain(temperature=1.0, mirostat=2, mirostat_tau=2.0, mirostat_eta=0.5)
    x = random_logits(1)
    x[1, :5] = 0.0
    s = state(random_history(), 1, seeds=[1, 2, 3, 4])
    ids = ch.choose(x, s)
    assert ch.mu.shape == (B,)
    # mu starts at 2 tau; each row moves by eta * (tau - surprise of its draw after truncation)
    kept_ = P.mirostat2_truncate(x, torch.full((B,), 4.0))
    surprise = -torch.log2(kept_.softmax(-1).gather(1, ids[:, None])[:, 0])
    torch.testing.assert_close(ch.mu, 4.0 - 0.5 * (surprise - 2.0))
    assert all(kept_[i, ids[i]] != NEG for i in range(B))
    mu = ch.mu.clone()
    ch.select_rows(torch.tensor([3, 1]))
    assert torch.equal(ch.mu, mu[[3, 1]])


def test_every_processor_leaves_its_input_alone():
    x, hist = random_logits(), random_history()
    before = x.clone()
    single, multi = P.prepare_sequence_bias({(1,): -1.0, (2, 3): NEG}, V)
    for out in [P.top_n_sigma(x, 1.0), P.xtc(x, 0.05, 1.0, torch.zeros(B)), P.mirostat2_truncate(x, torch.ones(B)),
                P.repetition_penalty(x, hist, 1.5), P.presence_frequency_penalty(x, hist, 1.0, 1.0),
                P.no_repeat_ngram(x, hist, 2), P.sequence_bias(x, hist, single, multi),
                P.suppress(x, torch.tensor([1])), P.force(x, torch.tensor([1])),
                P.exponential_decay_length_penalty(x, torch.tensor([1]), 0, 2.0, 3),
                P.dry(x, hist, 1.0, 1.75, 1, -1, {})]:
        assert not torch.equal(out, x)  # each one acted ...
        assert torch.equal(x, before)                    # ... on a copy
