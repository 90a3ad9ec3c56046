"""How much of a greedy text survives a one-ulp nudge of the model's input?

    python benchmarks/greedy_noise_floor.py [--model smollm2-135m-instruct] [--quantize auto,none]

The bench's agreement row asks for greedy tokens identical to llama.cpp's. This script measures
how far that can go for an engine that is not llama.cpp's bit-for-bit twin. It runs the bench's
8 agreement prompts greedily, then runs them again with every input embedding multiplied by
(1 + eps * N(0, 1)), eps = 1e-7, about one float32 ulp. Two numbers are reported per setting:
- identical texts: how many of the 8 perturbed greedy texts equal the unperturbed ones;
- same next token: fed the unperturbed text, how often the perturbed run picks the same next
  token (the bench's step-by-step row, with the perturbed run in llama.cpp's place).

With packed weights, each product quantizes its activations to int8 per block of 32, as llama.cpp
does. A one-ulp difference can move a value across a rounding boundary, and one code that moves
changes the rest of the network by the quantization step. So a different summation order alone
(llama.cpp sums 8 float lanes per row, we sum exact integer blocks) parts texts at near-ties.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tokenloom.bench import AGREEMENT_PROMPTS, greedy_run, nudged_agreement


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quantize", default="auto,none", help="comma-separated settings to measure")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt (the bench's --agree-tokens)")
    ap.add_argument("--eps", type=float, default=1e-7, help="relative size of the nudge (default: 1e-7, ~1 ulp)")
    ap.add_argument("--seeds", type=int, default=3, help="nudges tried per setting")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import tokenloom
    rows = []
    for quantize in args.quantize.split(","):
        model = tokenloom.load(args.model, quantize=quantize, progress=False)
        net, n = model.network, args.tokens
        prompts = [model.tokenizer.encode(p, add_special_tokens=False) for p in AGREEMENT_PROMPTS]
        plain = [greedy_run(net, p, n) for p in prompts]
        for seed in range(1, args.seeds + 1):
            row = {"quantize": quantize, "seed": seed, **nudged_agreement(net, prompts, n, args.eps, seed, plain)}
            rows.append(row)
            print(f"quantize={quantize} eps={args.eps:g} seed={seed}: identical texts "
                  f"{row['identical']}/{row['prompts']}, same next token {row['same']}/{row['positions']}",
                  file=sys.stderr, flush=True)
        del model, net
    out = Path(__file__).resolve().parent / "results" / f"noise-floor-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"model": args.model, "tokens": args.tokens, "runs": rows}, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
