"""Perplexity of tokenloom's fast (packed-weight) path against the float32 path, on a fixed text.

    python benchmarks/perplexity.py [--model smollm2-135m-instruct] [--text benchmarks/data/perplexity.txt]

The float32 path expands the file's weights to float32 (`quantize="none"`). The fast path runs
them packed (`quantize="auto"`), measured two ways: the prefill way (all tokens in one forward)
and the decode way (one token per step, as generation runs). Both run on tokenloom's kernels,
which quantize each product's activations to int8 per block of 32, so they should agree; the
two rows check that the prompt-chunk and one-token routes through the kernels do.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


@torch.inference_mode()
def nll_prefill(net, ids: list[int]) -> float:
    x = torch.tensor([ids])
    cache = net.make_cache(1, len(ids))
    logits = net(x, torch.arange(len(ids))[None], cache)[0].float()
    return torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:]).item()


@torch.inference_mode()
def nll_decode(net, ids: list[int]) -> float:
    cache = net.make_cache(1, len(ids))
    total = 0.0
    for t in range(len(ids) - 1):
        logits = net(torch.tensor([[ids[t]]]), torch.tensor([[t]]), cache)[0, -1].float()
        total -= logits.log_softmax(-1)[ids[t + 1]].item()
    return total / (len(ids) - 1)


def main() -> None:
    import tokenloom

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--text", default=str(ROOT / "data" / "perplexity.txt"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default="auto", help="the fast path's quantize setting (auto, int8, int4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = tokenloom.load(args.model, quantize="none")
    ids = ref.tokenizer.encode(Path(args.text).read_text(), add_special_tokens=False)
    rows = {"float32": nll_prefill(ref.network, ids)}
    del ref
    fast = tokenloom.load(args.model, quantize=args.quantize)
    rows[f"{fast.quantization}, prefill kernels"] = nll_prefill(fast.network, ids)
    start = time.perf_counter()
    rows[f"{fast.quantization}, decode kernels"] = nll_decode(fast.network, ids)
    print(f"({len(ids)} tokens; decode scoring took {time.perf_counter() - start:.1f} s)")
    base = math.exp(rows["float32"])
    print("| path | perplexity | vs float32 |\n|---|---|---|")
    for name, nll in rows.items():
        print(f"| {name} | {math.exp(nll):.4f} | {100 * (math.exp(nll) / base - 1):+.2f}% |")
    out = ROOT / "results" / f"perplexity-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"model": args.model, "tokens": len(ids),
                               "perplexity": {k: math.exp(v) for k, v in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()
