"""Beam search against transformers: v5's `generate(num_beams=...)` for plain beam search, the
stored transformers 4.51 outputs (tests/reference/make_references.py) for diverse beam search."""

import json
from pathlib import Path

import pytest
import torch

from tests.tiny import make_hf_model
from tokenloom.config import GenerationConfig
from tokenloom.engine.beam import beam_search
from tokenloom.models import build_model

REFERENCE = json.loads((Path(__file__).parent / "data" / "beam_contrastive_reference.json").read_text())
MODEL_TYPES = ["gpt2", "llama", "qwen2", "gemma3_text"]
PROMPTS = [[5, 9, 33, 100, 7], [40, 41, 250, 17, 3, 88, 90, 12, 61], [200, 6]]
SETTINGS = [
    dict(num_beams=4, num_return_sequences=4, length_penalty=1.0, early_stopping=False),
    dict(num_beams=4, num_return_sequences=2, length_penalty=0.0, early_stopping=True),
    dict(num_beams=3, num_return_sequences=3, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=4, num_return_sequences=4, length_penalty=-1.0, early_stopping="never"),
    dict(num_beams=4, num_return_sequences=1, length_penalty=2.0, early_stopping=False, min_new_tokens=5),
]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def pair(request):
    hf = make_hf_model(request.param)
    return request.param, hf, build_model(hf.config.to_dict(), hf.state_dict())


def liked_token(hf, prompt):
    """The third greedy token: an EOS the beams reach, so hypotheses finish early."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return int(out[0, -1])


def reference(hf, prompt, eos, **params):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, eos_token_id=eos, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True, **params)
    lengths = (out.beam_indices >= 0).sum(1).tolist()
    return [s[len(prompt):len(prompt) + n] for s, n in zip(out.sequences.tolist(), lengths)], out.sequences_scores.tolist()


def run(model, prompts, eos=None, **params):
    return beam_search(model, prompts, GenerationConfig.from_dict(params), eos_ids=[] if eos is None else [eos])


def test_equals_transformers_generate(pair):
    _, hf, ours = pair
    worst, finished_early = 0.0, 0
    for params in SETTINGS:
        for prompt in PROMPTS[:2]:
            for eos in (None, liked_token(hf, prompt)):
                ref_ids, ref_scores = reference(hf, prompt, eos, max_new_tokens=10, **params)
                got = run(ours, [prompt], eos, max_new_tokens=10, **params)[0]
                assert [h.token_ids for h in got] == ref_ids, (params, prompt, eos)
                # relative: with length_penalty -1 scores reach hundreds (float32 sums of log-probs)
                worst = max(worst, max(abs(h.score - r) / max(1.0, abs(r)) for h, r in zip(got, ref_scores)))
                for h in got:
                    assert h.finish_reason == ("stop" if eos is not None and h.token_ids[-1] == eos else "length")
                    assert h.finish_reason == "length" or len(h.token_ids) > params.get("min_new_tokens", 0)
                    finished_early += len(h.token_ids) < 10
    assert worst < 1e-5
    assert finished_early > 0  # EOS was reachable: some hypotheses ended before the limit


def test_batch_of_different_lengths_equals_alone(pair):
    _, hf, ours = pair
    eos = liked_token(hf, PROMPTS[0])
    params = dict(num_beams=4, num_return_sequences=3, max_new_tokens=12, length_penalty=1.5)
    batched = run(ours, PROMPTS, eos, **params)
    for p, b in zip(PROMPTS, batched):
        alone = run(ours, [p], eos, **params)[0]
        assert [h.token_ids for h in b] == [h.token_ids for h in alone]
        assert [h.score for h in b] == pytest.approx([h.score for h in alone], abs=1e-5)
        assert [h.score for h in b] == sorted((h.score for h in b), reverse=True)


def test_beam_sampling_is_seeded(pair):
    _, _, ours = pair
    params = dict(num_beams=3, num_return_sequences=3, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50)
    a = run(ours, PROMPTS, seed=3, **params)
    b = run(ours, PROMPTS, seed=3, **params)
    c = run(ours, PROMPTS, seed=4, **params)
    greedy = run(ours, PROMPTS, num_beams=3, num_return_sequences=3, max_new_tokens=10)
    ids = lambda r: [[h.token_ids for h in hs] for hs in r]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert ids(a) != ids(greedy)
    assert all(len(h.token_ids) == 10 for hs in a for h in hs)


def test_diverse_beam_search_equals_transformers_451(pair):
    name, hf, ours = pair
    with torch.no_grad():  # the stored reference was made for exactly these weights
        fp = hf(torch.tensor([[5, 9, 33, 100, 7, 12]])).logits[0, -1, :8]
    assert torch.allclose(fp, torch.tensor(REFERENCE["models"][name]["fingerprint"]), atol=1e-4)
    if name == "gemma3_text":
        # 4.51's Gemma 3 (sliding window 6 here) disagrees with v5 once sequences pass the window
        # (suspected: sliding-window semantics changed between versions, not verified): no oracle
        pytest.skip("no trustworthy transformers 4.51 reference for Gemma 3 past its sliding window")
    cases = REFERENCE["models"][name]["group"]
    assert len(cases) == 12
    worst = 0.0
    for case in cases:
        got = run(ours, [case["prompt"]], case["eos"], **case["params"])[0]
        assert [h.token_ids for h in got] == case["sequences"], case
        worst = max(worst, max(abs(h.score - r) for h, r in zip(got, case["scores"])))
    assert worst < 1e-5


def test_diverse_groups_differ_from_plain(pair):
    _, _, ours = pair
    plain = run(ours, [PROMPTS[1]], num_beams=4, num_return_sequences=4, max_new_tokens=8)[0]
    diverse = run(ours, [PROMPTS[1]], num_beams=4, num_return_sequences=4, max_new_tokens=8, num_beam_groups=4,
                  diversity_penalty=5.0)[0]
    assert [h.token_ids for h in plain] != [h.token_ids for h in diverse]
    assert len({h.token_ids[0] for h in diverse}) == 4  # each group starts with a different token


def test_process_hook_sees_beams_and_applies(pair):
    _, _, ours = pair
    free = run(ours, [PROMPTS[0]], num_beams=2, max_new_tokens=4)[0][0].token_ids
    calls = []

    def ban(logits, tokens, step):
        calls.append((tokens.shape, step))
        out = logits.clone()
        out[:, free[0]] = float("-inf")
        return out

    got = beam_search(ours, [PROMPTS[0], PROMPTS[2]], GenerationConfig.from_dict(dict(num_beams=2, max_new_tokens=4)),
                      [], process=ban)
    assert free[0] not in got[0][0].token_ids
    assert calls[0] == (torch.Size([4, 5]), 0) and calls[3] == (torch.Size([4, 8]), 3)


@pytest.mark.slow
def test_smollm2_equals_transformers(smollm2_gguf_path):
    import tokenloom
    from transformers import AutoModelForCausalLM

    path = Path(smollm2_gguf_path)
    loaded = tokenloom.load(path, quantize="none")
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    worst = 0.0
    for text in ["The capital of France is", "def fibonacci(n):"]:
        prompt = loaded.tokenizer.encode(text)
        ref_ids, ref_scores = reference(hf, prompt, None, num_beams=4, num_return_sequences=2, max_new_tokens=24)
        got = run(loaded.network, [prompt], None, num_beams=4, num_return_sequences=2, max_new_tokens=24)[0]
        assert [h.token_ids for h in got] == ref_ids
        worst = max(worst, max(abs(h.score - r) for h, r in zip(got, ref_scores)))
    assert worst < 1e-4
