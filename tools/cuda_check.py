"""The same calls on the CPU and on a CUDA GPU, on tiny random checkpoints; prints what agrees.

    python tools/cuda_check.py --make DIR   # here (needs the test extra): writes DIR/llama, DIR/t5
    python tools/cuda_check.py DIR          # on the GPU machine (tokenloom's dependencies only)

Checks, for a decoder (Llama) and an encoder-decoder (T5): greedy and beam tokens on the GPU
equal the CPU's; a seeded sample repeats; bfloat16 runs; a prompt batched with 10 others gets
its tokens (and log-probabilities, to 1e-5) alone; streaming gives generate's text. Exits 1 if
a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import tokenloom  # noqa: E402

PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog", "def add(a, b):", "A",
           "The fox and the dog", "Once", "The quick brown fox", "dog dog dog", "a b c d e f g h",
           "Once upon a time there was a fox", "The lazy dog", "fox"]


def make(root: Path) -> None:
    from tests.test_seq2seq import VOCAB, tiny_t5
    from tests.tiny import save_tiny, train_tokenizer
    save_tiny("llama", root / "llama")
    tiny_t5().save_pretrained(root / "t5")
    train_tokenizer(VOCAB).save(str(root / "t5" / "tokenizer.json"))
    (root / "t5" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))


def tokens(out) -> list[list[int]]:
    return [g.token_ids for g in out]


def checks(root: Path, device: str):
    p = PROMPTS[:4]
    for arch in ("llama", "t5"):
        cpu = tokenloom.load(root / arch, progress=False)
        dev = tokenloom.load(root / arch, device=device, progress=False)
        yield f"{arch}: greedy on cpu == on {device}", \
            lambda: tokens(cpu.generate(p, max_new_tokens=12)) == tokens(dev.generate(p, max_new_tokens=12))
        beam = dict(max_new_tokens=10, num_beams=4)
        yield f"{arch}: 4 beams on cpu == on {device}", \
            lambda: tokens(cpu.generate(p[:2], **beam)) == tokens(dev.generate(p[:2], **beam))
        sample = dict(do_sample=True, seed=3, max_new_tokens=12)
        yield f"{arch}: a seeded sample repeats on {device}", \
            lambda: tokens(dev.generate(p, **sample)) == tokens(dev.generate(p, **sample))

        def batched():
            one = dev.generate(PROMPTS[1], max_new_tokens=10, logprobs=1)
            many = dev.generate(PROMPTS, max_new_tokens=10, logprobs=1)[1]
            diff = max(abs(a.logprob - b.logprob) for a, b in zip(one.logprobs, many.logprobs))
            print(f"    alone {one.token_ids}, among 11 others {many.token_ids}, max |d logprob| {diff:.2g}")
            return one.token_ids == many.token_ids and diff < 1e-5
        yield f"{arch}: a prompt among 11 others on {device} gets its tokens alone", batched
        yield f"{arch}: streaming on {device} gives generate's text", \
            lambda: "".join(d.text for d in dev.stream(p[1], max_new_tokens=12)) == \
            dev.generate(p[1], max_new_tokens=12).text
    bf = tokenloom.load(root / "llama", device=device, dtype="bfloat16", progress=False)
    yield f"llama: bfloat16 on {device} runs", lambda: len(bf.generate(p[0], max_new_tokens=8).token_ids) == 8

    def timed():
        start = time.perf_counter()
        dev.generate(["hello"] * 32, max_new_tokens=64, min_new_tokens=64)
        print(f"    t5, 32 x 64 tokens on {device}: {time.perf_counter() - start:.2f} s")
        return True
    yield "t5: a batch of 32 runs", timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--make", action="store_true", help="write the tiny checkpoints into DIR and stop")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.make:
        return make(args.dir)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"torch {torch.__version__}, {gpu}")
    failed = 0
    for name, check in checks(args.dir, args.device):
        try:
            ok = check()
        except Exception:
            traceback.print_exc()
            ok = False
        print(f"[{'ok' if ok else 'FAILED'}] {name}")
        failed += not ok
    print(f"{failed} check(s) failed" if failed else "all checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
