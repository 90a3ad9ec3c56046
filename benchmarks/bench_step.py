"""One decode step of the network alone (no engine): milliseconds and aten ops per step.

    python benchmarks/bench_step.py [--quantize auto] [--batches 1,8,32] [--steps 24] [--threads 2]

For changes worth a few percent (fewer ops per step, a faster kernel), which the side-by-side
bench (bench_speed.py) cannot resolve on a noisy machine: the median of many steps of the same
shape, and the op count, which does not drift.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@torch.inference_mode()
def main() -> None:
    import tokenloom

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quantize", default="auto")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = tokenloom.load(args.model, quantize=args.quantize, progress=False)
    net, prompt = model.network, 32
    print(f"{args.model}, quantization={model.quantization or 'none'}, threads={args.threads}")
    print("| batch | ms per step (median) | tok/s | aten ops per step |\n|---|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        cache = net.make_cache(b, prompt + args.steps + 2)
        net(torch.randint(100, 1000, (b, prompt)), torch.arange(prompt).expand(b, prompt), cache, last_only=True)

        def step(t: int) -> None:
            net(torch.randint(100, 1000, (b, 1)), torch.full((b, 1), t), cache)

        times = []
        for t in range(prompt, prompt + args.steps):
            start = time.perf_counter()
            step(t)
            times.append(time.perf_counter() - start)
        with CountOps() as ops:
            step(prompt + args.steps)
        ms = statistics.median(times[2:]) * 1e3
        print(f"| {b} | {ms:.1f} | {b * 1e3 / ms:.1f} | {ops.n} |")


if __name__ == "__main__":
    main()
