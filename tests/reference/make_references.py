"""Reference outputs of diverse beam search and contrastive search, from transformers 4.51.

transformers v5 moved both strategies out of the core (to Hub repos we cannot fetch), so the
oracle is the last in-core implementation. This script builds the tiny random models of
tests/tiny.py with the installed transformers, hands their weights to a subprocess that imports
transformers 4.51.3 from a folder (its dependency-version check stubbed out: it only objects to
the newer tokenizers), runs `generate` there and writes tests/data/beam_contrastive_reference.json.

    pip download transformers==4.51.3 --no-deps -d /tmp/tf451
    python -m zipfile -e /tmp/tf451/transformers-4.51.3-py3-none-any.whl /tmp/tf451/src
    python tests/reference/make_references.py /tmp/tf451/src

`--smollm2` does the same on the real SmolLM2-135M-Instruct GGUF (needs the `gguf` package):
prompts tokenized by tokenloom's tokenizer, diverse beam search and contrastive search run by
4.51, and the first-step logits checked against the installed transformers (v5) on that file.
It writes tests/data/smollm2_reference.json.

    python tests/reference/make_references.py /tmp/tf451/src --smollm2
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "beam_contrastive_reference.json"
MODEL_TYPES = ["gpt2", "llama", "qwen2", "gemma3_text"]
PROMPTS = [[5, 9, 33, 100, 7], [40, 41, 250, 17, 3, 88, 90, 12, 61], [200, 6]]
FINGERPRINT_IDS = [[5, 9, 33, 100, 7, 12]]

GROUP_CASES = [
    dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=4, max_new_tokens=10),
    dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=2, max_new_tokens=10,
         early_stopping=True, eos="liked"),
    dict(num_beams=6, num_beam_groups=3, diversity_penalty=0.5, num_return_sequences=3, max_new_tokens=10,
         length_penalty=2.0, early_stopping="never", eos="liked"),
    dict(num_beams=4, num_beam_groups=4, diversity_penalty=2.0, num_return_sequences=4, max_new_tokens=8,
         length_penalty=0.0, eos="liked", min_new_tokens=4),
]
CONTRASTIVE_CASES = [
    dict(penalty_alpha=0.6, top_k=4, max_new_tokens=16),
    dict(penalty_alpha=0.3, top_k=6, max_new_tokens=12, eos="liked"),
    dict(penalty_alpha=0.6, top_k=4, max_new_tokens=12, eos="liked", min_new_tokens=6),
]


SMOLLM2_OUT = ROOT / "tests" / "data" / "smollm2_reference.json"
SMOLLM2_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
                   "def fibonacci(n):\n    "]
SMOLLM2_GROUP = dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=2, max_new_tokens=16)
SMOLLM2_CONTRASTIVE = dict(penalty_alpha=0.6, top_k=4, max_new_tokens=24)


def liked_token(model, prompt: list[int]) -> int:
    """The third greedy token: an EOS that the model reaches, so hypotheses end early."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return int(out[0, -1])


def child(folder: str) -> None:
    """Runs under transformers 4.51: read weights, generate every case, print JSON."""
    import torch
    import transformers
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    from tests.tiny import configs

    result = {"transformers": transformers.__version__, "models": {}}
    for mt in MODEL_TYPES:
        cls_name, cfg_name, kwargs = configs()[mt]
        model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kwargs)).eval()
        missing, unexpected = model.load_state_dict(load_file(f"{folder}/{mt}.safetensors"), strict=False)
        assert not [m for m in missing if "lm_head" not in m] and not unexpected, (missing, unexpected)
        model.tie_weights()
        with torch.no_grad():
            fp = model(torch.tensor(FINGERPRINT_IDS)).logits[0, -1, :8].tolist()
        entry = {"fingerprint": fp, "group": [], "contrastive": []}
        for kind, cases in (("group", GROUP_CASES), ("contrastive", CONTRASTIVE_CASES)):
            for case in cases:
                params = {k: v for k, v in case.items() if k != "eos"}
                for prompt in PROMPTS:
                    eos = liked_token(model, prompt) if case.get("eos") else None
                    if kind == "contrastive" and mt == "gemma3_text":
                        continue  # 4.51 refuses Gemma 3's sliding-window HybridCache in contrastive search
                    with torch.no_grad():
                        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                             do_sample=False, eos_token_id=eos, pad_token_id=0, output_scores=True,
                                             return_dict_in_generate=True, **params)
                    gen = out.sequences[:, len(prompt):].tolist()
                    # a hypothesis ends at its EOS, or runs to max_new_tokens (4.51's group beam_indices
                    # are not a reliable length); the rest of a row is padding
                    seqs = [g[:g.index(eos) + 1] if eos is not None and eos in g else g for g in gen]
                    assert all(len(g) == params["max_new_tokens"] or g[-1] == eos for g in seqs)
                    scores = out.sequences_scores.tolist() if kind == "group" else None
                    entry[kind].append({"params": params, "prompt": prompt, "eos": eos, "sequences": seqs,
                                        "scores": scores})
        result["models"][mt] = entry
    print(json.dumps(result))


def load_gguf(path: str):
    import torch
    import transformers

    p = Path(path)
    return transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                             torch_dtype=torch.float32).eval()


def first_logits(model, prompts: list[list[int]]) -> list[list[float]]:
    """The logits of the first generated position, first 16 entries, for each prompt."""
    import torch

    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0, -1, :16].tolist() for p in prompts]


def child_smollm2(path: str, prompts_json: str) -> None:
    """Runs under transformers 4.51 on the SmolLM2 GGUF: print JSON."""
    import torch
    import transformers

    prompts = json.loads(prompts_json)
    model = load_gguf(path)
    eos = model.generation_config.eos_token_id
    result = {"transformers": transformers.__version__, "eos_token_id": eos,
              "fingerprint": first_logits(model, prompts), "group": [], "contrastive": []}
    for kind, params in (("group", SMOLLM2_GROUP), ("contrastive", SMOLLM2_CONTRASTIVE)):
        for prompt in prompts:
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     do_sample=False, eos_token_id=eos, pad_token_id=eos, output_scores=True,
                                     return_dict_in_generate=True, **params)
            gen = out.sequences[:, len(prompt):].tolist()
            seqs = [g[:g.index(eos) + 1] if eos in g else g for g in gen]
            scores = out.sequences_scores.tolist() if kind == "group" else None
            result[kind].append({"params": params, "prompt": prompt, "sequences": seqs, "scores": scores})
    print(json.dumps(result))


def main_smollm2(tf451_path: str) -> None:
    import hashlib

    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    import tokenloom
    from tokenloom.loading import registry

    path = str(registry.pull("smollm2-135m-instruct"))
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    tok = tokenloom.load(path).tokenizer
    prompts = [tok.encode(p) for p in SMOLLM2_PROMPTS]
    v5 = first_logits(load_gguf(path), prompts)
    env = {**os.environ, "PYTHONPATH": tf451_path}
    proc = subprocess.run([sys.executable, __file__, "--child-smollm2", path, json.dumps(prompts)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    diff = (torch.tensor(result["fingerprint"]) - torch.tensor(v5)).abs().max().item()
    print(f"first-step logits, transformers {result['transformers']} vs {transformers.__version__}: max |diff| {diff:.3g}")
    assert diff < 1e-4, diff
    result.update(gguf=Path(path).name, gguf_sha256=sha, prompts=SMOLLM2_PROMPTS, prompt_ids=prompts,
                  fingerprint_v5=v5, transformers_v5=transformers.__version__)
    SMOLLM2_OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {SMOLLM2_OUT}")


def main(tf451_path: str) -> None:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from tests.tiny import make_hf_model

    with tempfile.TemporaryDirectory() as folder:
        expected = {}
        for mt in MODEL_TYPES:
            model = make_hf_model(mt)
            state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
            save_file(state, f"{folder}/{mt}.safetensors")
            with torch.no_grad():
                expected[mt] = model(torch.tensor(FINGERPRINT_IDS)).logits[0, -1, :8].tolist()
        env = {**os.environ, "PYTHONPATH": tf451_path}
        proc = subprocess.run([sys.executable, __file__, "--child", folder], env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    for mt in MODEL_TYPES:  # the same weights on both sides
        got = torch.tensor(result["models"][mt]["fingerprint"])
        assert torch.allclose(got, torch.tensor(expected[mt]), atol=1e-4), (mt, got, expected[mt])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        import types

        stub = types.ModuleType("transformers.dependency_versions_check")
        stub.dep_version_check = lambda *a, **k: None
        sys.modules["transformers.dependency_versions_check"] = stub
        child(sys.argv[2])
    elif sys.argv[1] == "--child-smollm2":
        import types

        stub = types.ModuleType("transformers.dependency_versions_check")
        stub.dep_version_check = lambda *a, **k: None
        sys.modules["transformers.dependency_versions_check"] = stub
        child_smollm2(sys.argv[2], sys.argv[3])
    elif sys.argv[2:] == ["--smollm2"]:
        main_smollm2(sys.argv[1])
    else:
        main(sys.argv[1])
