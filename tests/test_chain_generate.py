"""The logits chain inside generation, against transformers' generate: penalties and
constraints in greedy decoding, and logprobs (raw and processed)."""

import pytest
import torch

from tests.test_generate import prompts, run
from tests.tiny import make_hf_model
from tokenloom.config import GenerationConfig
from tokenloom.engine.generate import TokenLoop
from tokenloom.models import build_model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request):
    hf = make_hf_model(request.param)
    return hf, build_model(hf.config.to_dict(), hf.state_dict())


def hf_generate(hf, p, **kw):
    with torch.no_grad():
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          pad_token_id=0, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    return out


CASES = [
    dict(repetition_penalty=1.5),
    dict(no_repeat_ngram_size=2),
    dict(bad_words_ids=[[5], [7, 8]], repetition_penalty=1.2),
    dict(suppress_tokens=[10, 11, 12]),
    dict(min_new_tokens=5, repetition_penalty=0.8),
    dict(exponential_decay_length_penalty=(4, 1.5)),
    dict(forced_eos_token_id=[2]),
]


@pytest.mark.parametrize("params", CASES, ids=[",".join(c) for c in CASES])
def test_greedy_with_processors_equals_transformers(pair, params):
    hf, ours = pair
    for p in prompts(2, seed=11):
        ref = hf_generate(hf, p, max_new_tokens=12, eos_token_id=2, **params)
        ref_ids = ref.sequences[0, len(p):].tolist()
        ours_params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
        got, _ = run(ours, [p], max_new_tokens=12, eos_token_id=[2], **ours_params)
        assert got[0] == ref_ids


def test_logprobs_raw_and_processed_equal_transformers(pair):
    hf, ours = pair
    p = prompts(1, seed=12)[0]
    ref = hf_generate(hf, p, max_new_tokens=8, repetition_penalty=1.4, eos_token_id=None)
    cfg = GenerationConfig.from_dict({"max_new_tokens": 8, "repetition_penalty": 1.4, "logprobs": 3, "ignore_eos": True})
    loop = TokenLoop(ours, [p], cfg, eos_ids=[])
    while not loop.done:
        loop.step()
    seq = loop.seqs[0]
    assert seq.token_ids == ref.sequences[0, len(p):].tolist()
    for t, (tok, proc, raw) in enumerate(zip(seq.token_ids, ref.scores, ref.logits)):
        lp_proc, lp_raw = proc[0].log_softmax(-1), raw[0].log_softmax(-1)
        got = seq.logprobs[t]
        assert got.token_id == tok
        assert got.logprob == pytest.approx(lp_proc[tok].item(), abs=1e-4)
        assert got.raw_logprob == pytest.approx(lp_raw[tok].item(), abs=1e-4)
        assert [i for i, _ in got.top] == lp_proc.topk(3).indices.tolist()
        assert [i for i, _ in got.raw_top] == lp_raw.topk(3).indices.tolist()
        assert got.logprob != pytest.approx(got.raw_logprob, abs=1e-6) or t == 0


def test_forced_bos_is_the_first_generated_token(pair):
    # transformers forces BOS only when the decoder input is a single token (encoder-decoder);
    # for us it is the first generated token of any model
    _, ours = pair
    got, _ = run(ours, prompts(2, seed=13), max_new_tokens=4, forced_bos_token_id=42, ignore_eos=True)
    assert [g[0] for g in got] == [42, 42]


def test_api_beam_search_returns_nbest_with_scores(tmp_path):
    import tokenloom
    from tests.tiny import save_tiny

    save_tiny("llama", tmp_path)
    model = tokenloom.load(tmp_path)
    gs = model.generate(["Once upon a time", "The fox"], num_beams=4, num_return_sequences=3, max_new_tokens=6,
                        ignore_eos=True)
    assert [(g.prompt_index, g.index) for g in gs] == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]
    for group in (gs[:3], gs[3:]):
        scores = [g.score for g in group]
        assert scores == sorted(scores, reverse=True) and len({tuple(g.token_ids) for g in group}) == 3
        assert all(g.text == model.tokenizer.decode(g.token_ids) for g in group)
    streamed = list(model.stream("Once upon a time", num_beams=4, max_new_tokens=6, ignore_eos=True))
    assert len(streamed) == 1 and streamed[0].token_ids == gs[0].token_ids and streamed[0].score == gs[0].score
    cs = model.generate("Once upon a time", penalty_alpha=0.5, top_k=4, max_new_tokens=6, ignore_eos=True)
    assert len(cs.token_ids) == 6 and cs.score is None
