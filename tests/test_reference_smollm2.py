"""Diverse beam search and contrastive search on the real SmolLM2-135M-Instruct GGUF, against the
outputs of transformers 4.51 on the same file (tests/data/smollm2_reference.json, made by
`tests/reference/make_references.py <tf451> --smollm2`; it also checked that transformers v5 gives
the same first-step logits as 4.51 on this file, so the reference is about the same model).

transformers stops only at the config's eos (id 2); tokenloom also stops at id 0 for SmolLM2, so the
like-with-like comparisons pass `eos_ids=[2]`; a separate test runs with the model's own EOS set.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

import tokenloom
from tokenloom.config import GenerationConfig
from tokenloom.engine.beam import beam_search
from tokenloom.engine.contrastive import contrastive_search

pytestmark = pytest.mark.slow

REFERENCE = json.loads((Path(__file__).parent / "data" / "smollm2_reference.json").read_text())
HF_EOS = [REFERENCE["eos_token_id"]]


@pytest.fixture(scope="module")
def model(smollm2_gguf_path):
    return tokenloom.load(smollm2_gguf_path, quantize="none")


def test_reference_is_for_this_file(smollm2_gguf_path, model):
    assert hashlib.sha256(Path(smollm2_gguf_path).read_bytes()).hexdigest() == REFERENCE["gguf_sha256"]
    assert [model.tokenizer.encode(p) for p in REFERENCE["prompts"]] == REFERENCE["prompt_ids"]
    assert REFERENCE["fingerprint"] == REFERENCE["fingerprint_v5"] or torch.allclose(
        torch.tensor(REFERENCE["fingerprint"]), torch.tensor(REFERENCE["fingerprint_v5"]), atol=1e-4)


def test_first_step_logits_match(model):
    net, got = model.network, []
    with torch.no_grad():
        for p in REFERENCE["prompt_ids"]:
            logits = net(torch.tensor([p]), torch.arange(len(p))[None], net.make_cache(1, len(p)))
            got.append(logits[0, -1, :16])
    diff = (torch.stack(got).float() - torch.tensor(REFERENCE["fingerprint"])).abs().max().item()
    assert diff < 1e-3, diff


@pytest.mark.parametrize("i", range(len(REFERENCE["group"])))
def test_diverse_beam_search_equals_transformers_451(model, i):
    case = REFERENCE["group"][i]
    hyps = beam_search(model.network, [case["prompt"]], GenerationConfig.from_dict(case["params"]), eos_ids=HF_EOS)[0]
    assert [h.token_ids for h in hyps] == case["sequences"]
    assert [h.score for h in hyps] == pytest.approx(case["scores"], abs=1e-4)


@pytest.mark.parametrize("i", range(len(REFERENCE["contrastive"])))
def test_contrastive_search_equals_transformers_451(model, i):
    case = REFERENCE["contrastive"][i]
    ids, reasons = contrastive_search(model.network, [case["prompt"]], GenerationConfig.from_dict(case["params"]),
                                      eos_ids=HF_EOS)
    assert ids == case["sequences"]
    assert reasons == ["stop" if case["sequences"][0][-1] in HF_EOS else "length"]


def test_model_eos_set_gives_the_same_outputs_here(model):
    """None of the reference outputs contains id 0, so SmolLM2's full EOS set changes nothing."""
    eos = model.tokenizer.eos_token_ids
    assert set(HF_EOS) < set(eos)
    for case in REFERENCE["contrastive"]:
        ids, _ = contrastive_search(model.network, [case["prompt"]], GenerationConfig.from_dict(case["params"]),
                                    eos_ids=eos)
        assert ids == case["sequences"]
    case = REFERENCE["group"][0]
    hyps = beam_search(model.network, [case["prompt"]], GenerationConfig.from_dict(case["params"]), eos_ids=eos)[0]
    assert [h.token_ids for h in hyps] == case["sequences"]
