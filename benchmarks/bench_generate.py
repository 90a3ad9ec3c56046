"""Prefill and decode speed of tokenloom and transformers on the same model, side by side.

    python benchmarks/bench_generate.py [--model smollm2-135m-instruct] [--reps 3]

Both engines load the same GGUF file (transformers expands it to float32; so does tokenloom's
float32 path), run greedy decoding with end-of-sequence ignored, in the same process with the
same thread count, alternating, and the median of `--reps` runs is reported:
  prefill  = prompt tokens / time of a generate() call with max_new_tokens=1
  decode   = batch * (N - 1) new tokens / (time of generate(N) - time of generate(1))
Results go to benchmarks/results/generate-<timestamp>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent

WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old oak tree "
         "near the river and children play football in the park on a sunny afternoon").split()


def prompt_ids(tokenizer, n_tokens: int, offset: int = 0) -> list[int]:
    text = " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(n_tokens * 2))
    return tokenizer.encode(text, add_special_tokens=False)[:n_tokens]


class Ours:
    name = "tokenloom"

    def __init__(self, model_spec: str):
        import tokenloom
        from tokenloom.config import GenerationConfig
        from tokenloom.engine.generate import TokenLoop

        self.model = tokenloom.load(model_spec, dtype="float32", quantize="none")
        self.tokenizer = self.model.tokenizer
        self._cfg, self._loop = GenerationConfig, TokenLoop

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        cfg = self._cfg.from_dict({"max_new_tokens": new_tokens, "ignore_eos": True})
        loop = self._loop(self.model.network, prompts, cfg, eos_ids=[], dtype=self.model.dtype)
        while not loop.done:
            loop.step()
        return sum(len(s.token_ids) for s in loop.seqs)


class Transformers:
    name = "transformers"

    def __init__(self, gguf_path: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                          dtype=torch.float32).eval()

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as for decoder-only generation
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=0)
        return (out.shape[1] - width) * len(prompts)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name or .gguf path")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tokenloom.loading.resolve import resolve_model

    gguf_path = resolve_model(args.model).path
    engines = [Ours(args.model), Transformers(gguf_path)]
    tok = engines[0].tokenizer
    long_prompt = [prompt_ids(tok, args.prefill_tokens)]
    batches = [int(b) for b in args.batches.split(",")]
    short = {b: [prompt_ids(tok, 12 + (i % 5), offset=i) for i in range(b)] for b in batches}

    for e in engines:  # warm-up: first calls allocate and pick kernels
        e.run(short[batches[0]], 4)

    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.reps):
        for e in engines:  # alternate engines inside each repetition
            t = timed(e.run, long_prompt, 1)
            samples.setdefault((e.name, "prefill"), []).append(args.prefill_tokens / t)
            for b in batches:
                t1 = timed(e.run, short[b], 1)
                tn = timed(e.run, short[b], args.new_tokens)
                samples.setdefault((e.name, f"decode b{b}"), []).append(b * (args.new_tokens - 1) / (tn - t1))

    metrics = ["prefill"] + [f"decode b{b}" for b in batches]
    table = {m: {e.name: statistics.median(samples[(e.name, m)]) for e in engines} for m in metrics}
    lines = [f"threads={args.threads}, model={args.model}, float32, median of {args.reps}",
             "| metric (tok/s) | tokenloom | transformers | ratio |", "|---|---|---|---|"]
    for m in metrics:
        ours, ref = table[m]["tokenloom"], table[m]["transformers"]
        lines.append(f"| {m} | {ours:.1f} | {ref:.1f} | {ours / ref:.2f}x |")
    print("\n".join(lines))
    out_dir = ROOT / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"generate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "median_tok_s": table,
                               "samples": {f"{k[0]}/{k[1]}": v for k, v in samples.items()}}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
