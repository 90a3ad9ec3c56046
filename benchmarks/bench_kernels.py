"""The matrix products a SmolLM2-135M step is made of, per kernel, on this CPU.

    python benchmarks/bench_kernels.py [--threads 2] [--reps 3]

For all 30 layers' shapes (qkv 576x960, o 576x576, gate/up 576x3072, down 1536x576), each layer
with its own random weights so that they come from memory and not from cache, and M rows of
activations: tokenloom's own Q4_1 and Q8_0 kernels (tokenloom/kernels, int8 activations), where
they build; PyTorch's int4 (`_weight_int4pack_mm_for_cpu`, groups of 32) and int8 per channel
(`_weight_int8pack_mm`), both with bfloat16 activations (the fallback); and float32. The last
row is a 512-token prefill, where PyTorch's layers expand their weights to float32 for a GEMM
and ours stay packed. Float32 twice: MKL's sgemm, and tokenloom's float kernel (models/base.py
`linear`, whose rows do not depend on the row count; prefills run in MKL). Also the output head
(576 x 49152) at 1 and 32 rows. The CPU capability decides which kernels PyTorch dispatches to,
so the figures differ a lot between AVX2 and AVX-512 machines.
"""

from __future__ import annotations

import argparse
import time

import torch

from tokenloom import kernels
from tokenloom.models.base import linear
from tokenloom.models.quant import Int4Linear, Int8Linear, Q4Linear, Q8Linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in)
LAYERS = 30


def timed(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1000


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [[torch.randn(n, k) * 0.05 for n, k in SHAPES] for _ in range(LAYERS)]
    kinds = {"int4 (PyTorch)": Int4Linear, "int8 (PyTorch)": Int8Linear}
    if kernels.library() is not None:
        kinds = {"Q4_1 (ours)": Q4Linear, "Q8_0 (ours)": Q8Linear, **kinds}
    packed = {name: [[cls(w, None) for w in layer] for layer in weights] for name, cls in kinds.items()}
    own = f", our kernels {kernels.cpu_isa()}" if kernels.library() is not None else ""
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}{own}, {args.threads} threads, "
          f"ms for the products of all {LAYERS} layers")
    print("| rows M | " + " | ".join(packed) + " | float32 (MKL) | float32 (ours) |\n|---|" + "---|" * (len(packed) + 2))
    for m in (1, 4, 8, 32, 512):
        x = {k: torch.randn(m, 1, k) if m < 512 else torch.randn(1, m, k) for _, k in SHAPES}
        row = [timed(lambda: [lin(x[lin.in_features]) for layer in layers for lin in layer], args.reps)
               for layers in packed.values()]
        row.append(timed(lambda: [x[w.shape[1]] @ w.t() for layer in weights for w in layer], args.reps))
        row.append(timed(lambda: [linear(x[w.shape[1]], w) for layer in weights for w in layer], args.reps))
        print(f"| {m} | " + " | ".join(f"{t:.1f}" for t in row) + " |")
    head = torch.randn(49152, 576) * 0.05
    heads = [cls(head, None) for name, cls in kinds.items() if "8" in name]
    for m in (1, 32):
        x = torch.randn(m, 1, 576)
        print(f"output head 576x49152, {m} row(s): "
              + ", ".join(f"{type(h).__name__} {timed(lambda: h(x), 10):.2f} ms" for h in heads)
              + f", float32 MKL {timed(lambda: x @ head.t(), 10):.2f} ms, ours {timed(lambda: linear(x, head), 10):.2f} ms")

if __name__ == "__main__":
    main()
