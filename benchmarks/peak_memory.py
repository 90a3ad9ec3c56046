"""Peak resident memory, measurement by measurement, in one process.

    python benchmarks/peak_memory.py [--quantize auto] [--threads 2]

The side-by-side bench reports one peak for a whole run; this says which workload sets it
(a 512-token prefill, batch 8, batch 32, 4-beam search; 32-token prompts, 32 new tokens), and
what stays resident after each, with its time. For memory changes: run it before and after.
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def main() -> None:
    import tokenloom
    from tokenloom.bench import PeakRss, rss_bytes
    from tokenloom.config import GenerationConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quantize", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    before = rss_bytes()
    model = tokenloom.load(args.model, quantize=args.quantize, progress=False)
    print(f"{args.model}, quantization={model.quantization or 'none'}: RSS {before / 1e6:.1f} MB before load, "
          f"{rss_bytes() / 1e6:.1f} after")
    rng = random.Random(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(n)]

    cases = [("prefill 512", prompts(1, 512), 1, 1), ("batch 8", prompts(8, 32), 32, 1),
             ("batch 32", prompts(32, 32), 32, 1), ("beam 4", prompts(1, 32), 32, 4)]
    print("| workload | peak RSS (MB) | RSS after (MB) | seconds |\n|---|---|---|---|")
    for name, ids, n, beams in cases:
        cfg = GenerationConfig.from_dict({"max_new_tokens": n, "ignore_eos": True, "temperature": 0, "num_beams": beams})
        start = time.perf_counter()
        with PeakRss() as peak:
            model.generate_ids(ids, cfg)
        print(f"| {name} | {peak.peak / 1e6:.1f} | {rss_bytes() / 1e6:.1f} | {time.perf_counter() - start:.2f} |")


if __name__ == "__main__":
    main()
