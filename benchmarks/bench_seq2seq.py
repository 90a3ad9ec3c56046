"""Encoder-decoder generation speed of tokenloom and transformers on the same checkpoint, side by side.

    python benchmarks/bench_seq2seq.py [--reps 3] [--new-tokens 64]

No seq2seq checkpoint ships with the repository, so a random T5-small-sized model is built with
transformers (d_model 512, d_ff 2048, 6 + 6 layers, 8 heads, relu, vocab 32128), saved with
`save_pretrained` and loaded by both engines. Sources are 8 random ~40-token id lists; both sides
generate exactly `--new-tokens` tokens (EOS ignored: min_new_tokens = max_new_tokens), greedy and
beam 4, batch 1 and batch 8, in the same process, alternating; the median of `--reps` runs is
reported as generated tokens per second (beam: tokens of the returned sequence per prompt).
Results go to benchmarks/results/seq2seq-<timestamp>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def build_checkpoint(folder: Path, seed: int = 0) -> None:
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(seed)
    config = T5Config(d_model=512, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu",
                      vocab_size=32128, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).eval().save_pretrained(folder)


class Ours:
    name = "tokenloom"

    def __init__(self, folder: Path):
        from safetensors.torch import load_file
        from tokenloom.models import build_model
        config = json.loads((folder / "config.json").read_text())
        self.model = build_model(config, load_file(str(folder / "model.safetensors")))

    def run(self, sources: list[list[int]], new: int, beams: int) -> None:
        from tokenloom.config import GenerationConfig
        from tokenloom.engine.beam import beam_search
        from tokenloom.engine.generate import TokenLoop
        cfg = GenerationConfig.from_dict({"max_new_tokens": new, "min_new_tokens": new, "num_beams": beams})
        if beams > 1:
            beam_search(self.model, sources, cfg, [1])
            return
        loop = TokenLoop(self.model, sources, cfg, [1])
        while not loop.done:
            loop.step()


class Transformers:
    name = "transformers"

    def __init__(self, folder: Path):
        from transformers import T5ForConditionalGeneration
        self.model = T5ForConditionalGeneration.from_pretrained(folder).eval()

    def run(self, sources: list[list[int]], new: int, beams: int) -> None:
        width = max(len(s) for s in sources)
        ids = torch.zeros(len(sources), width, dtype=torch.long)
        mask = torch.zeros(len(sources), width, dtype=torch.long)
        for i, s in enumerate(sources):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                num_beams=beams, do_sample=False, early_stopping=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--source-tokens", type=int, default=40)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    sources = [torch.randint(2, 32000, (args.source_tokens + int(torch.randint(-4, 5, (1,), generator=g)),),
                             generator=g).tolist() + [1] for _ in range(8)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_checkpoint(folder)
        engines = [Ours(folder), Transformers(folder)]
        for beams in (1, 4):
            for batch in (1, 8):
                srcs = sources[:batch]
                times = {e.name: [] for e in engines}
                for e in engines:  # warm-up
                    e.run(srcs, 4, beams)
                for _ in range(args.reps):
                    for e in engines:
                        t0 = time.perf_counter()
                        e.run(srcs, args.new_tokens, beams)
                        times[e.name].append(time.perf_counter() - t0)
                tps = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
                rows.append({"search": "greedy" if beams == 1 else f"beam {beams}", "batch": batch,
                             "tokenloom_tok_s": tps["tokenloom"], "transformers_tok_s": tps["transformers"],
                             "ratio": tps["tokenloom"] / tps["transformers"], "times_s": times})
                print(f"done: {rows[-1]['search']} batch {batch}", flush=True)

    print(f"\nT5-small-sized random model, float32, {torch.get_num_threads()} threads, "
          f"{args.new_tokens} new tokens, median of {args.reps}\n")
    print("| search | batch | tokenloom tok/s | transformers tok/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['search']} | {r['batch']} | {r['tokenloom_tok_s']:.1f} | {r['transformers_tok_s']:.1f} "
              f"| {r['ratio']:.2f}x |")
    out = ROOT / "results" / f"seq2seq-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"model": "t5-small-sized random", "new_tokens": args.new_tokens,
                               "reps": args.reps, "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
