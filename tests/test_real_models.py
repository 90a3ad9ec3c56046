"""Real model files: SmolLM2 (GGUF Q4_1) and Gemma 3 270M (GGUF Q4_K_M) against transformers
loading the same file. Prompts are tokenized by us (transformers' GGUF tokenizer splits
SmolLM2's digits wrongly), and both engines decode greedily from the same ids."""

import pytest
import torch

import tokenloom
from tokenloom.config import GenerationConfig
from tokenloom.engine.generate import TokenLoop

pytestmark = pytest.mark.slow

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "Here is a list of fruits: apples, bananas,",
    "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n",
]


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def ours_greedy(model, ids, n):
    # min_new_tokens = n on both sides: end-of-sequence is suppressed, so 32 tokens always come
    cfg = GenerationConfig.from_dict({"max_new_tokens": n, "min_new_tokens": n})
    loop = TokenLoop(model.network, [ids], cfg, model.tokenizer.eos_token_ids)
    while not loop.done:
        loop.step()
    return loop.seqs[0].token_ids


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return tokenloom.load(smollm2_gguf_path, quantize="none"), hf_model(smollm2_gguf_path)


def test_smollm2_greedy_equals_transformers(smollm2):
    ours, hf = smollm2
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        assert ours_greedy(ours, ids, 32) == hf_greedy(hf, ids, 32), prompt


def test_smollm2_logits_equal_transformers(smollm2):
    ours, hf = smollm2
    ids = ours.tokenizer.encode(PROMPTS[3])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits
        got = ours.network(torch.tensor([ids]), torch.arange(len(ids))[None], ours.network.make_cache(1, len(ids)))
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_smollm2_batch_equals_alone(smollm2):
    ours, _ = smollm2
    batch = ours.generate(PROMPTS[:4], max_new_tokens=16, ignore_eos=True)
    for prompt, g in zip(PROMPTS[:4], batch):
        assert g.token_ids == ours.generate(prompt, max_new_tokens=16, ignore_eos=True).token_ids


def test_smollm2_digits_are_split_one_by_one(smollm2):
    ours, _ = smollm2
    ids = ours.tokenizer.encode("12345")
    assert len(ids) == 5 and ours.tokenizer.decode(ids) == "12345"


def test_gemma3_greedy_equals_transformers(gemma3_gguf_path):
    ours, hf = tokenloom.load(gemma3_gguf_path, quantize="none"), hf_model(gemma3_gguf_path)
    for prompt in PROMPTS[:3]:
        ids = ours.tokenizer.encode(prompt)
        assert ids[0] == ours.tokenizer.bos_token_id
        assert ours_greedy(ours, ids, 16) == hf_greedy(hf, ids, 16), prompt
