"""llama.cpp's side of `tokenloom bench`, run by the llama-cpp-python venv's python (not tokenloom's).

    benchmarks/.venv-llama/bin/python benchmarks/llama_cpp_runner.py < spec.json

Reads the spec tokenloom/bench.py writes (the same token ids every engine gets) on stdin and
prints one JSON line: prefill and batch-1 decode tok/s, RSS, greedy tokens, and how often its next
token matches the other engines' greedy tokens (the spec's "forced"), fed their prefixes. It imports only
llama_cpp and numpy, since that venv has no torch or tokenloom. llama-cpp-python has no beam
search and no simple batched API, so batch > 1 and beams are left out (the table shows "—").
Greedy = argmax of the last position's logits, read straight from the context (`eval` keeps
no scores unless logits_all).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time

import llama_cpp
import numpy as np


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The highest RSS seen while the `with` block runs, sampled every 10 ms (as in tokenloom/bench.py)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while True:
            self.peak = max(self.peak, rss_bytes())
            if self._stop.wait(0.01):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def progress(text: str) -> None:
    print(f"[llama.cpp] {text}", file=sys.stderr, flush=True)


def main() -> int:
    spec = json.load(sys.stdin)
    reps, n = spec["reps"], spec["new_tokens"]
    longest = max(len(spec["prefill"]), len(spec["beam_prompt"]) + n,
                  max(len(p) for p in spec["agree_prompts"]) + spec["agree_tokens"])
    baseline = rss_bytes()
    llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=-(-(longest + 16) // 256) * 256, n_batch=512,
                          n_threads=spec["threads"], n_threads_batch=spec["threads"], verbose=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    def prefill(ids: list[int]) -> int:
        llm.reset()  # n_tokens = 0; eval drops the KV cache from there
        llm.eval(ids)
        return next_token()

    def greedy(ids: list[int], count: int) -> list[int]:
        out = [prefill(ids)]
        while len(out) < count:
            llm.eval([out[-1]])
            out.append(next_token())
        return out

    def prefill_rate() -> float:
        start = time.perf_counter()
        prefill(spec["prefill"])
        return len(spec["prefill"]) / (time.perf_counter() - start)

    def decode_rate() -> float:  # the (N - 1) one-token steps after the prompt, timed directly
        tok = prefill(spec["beam_prompt"])
        start = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = next_token()
        return (n - 1) / (time.perf_counter() - start)

    def forced_agreement(seqs: list[list[int]]) -> dict:
        """Along another engine's greedy tokens (prefix fed as it chose them): how often
        llama.cpp's own next choice is the same token. Unlike whole-sequence agreement, one
        near-tie does not decide the rest."""
        same = total = 0
        for prompt, seq in zip(spec["agree_prompts"], seqs):
            seq = seq[:spec["agree_tokens"]]
            choice = prefill(prompt)
            for t, tok in enumerate(seq):
                same += choice == tok
                total += 1
                if t + 1 < len(seq):
                    llm.eval([tok])
                    choice = next_token()
        return {"same": same, "positions": total}

    samples = {}
    with PeakRss() as rss:
        for key, case in (("prefill", prefill_rate), ("decode_b1", decode_rate)):
            samples[key] = [case() for _ in range(reps + 1)][1:]  # the first run is a warm-up
            progress(f"{key}: {statistics.median(samples[key]):.1f} tok/s (median of {reps})")
        tokens = [greedy(p, spec["agree_tokens"]) for p in spec["agree_prompts"]]
        progress(f"greedy tokens for {len(tokens)} agreement prompts")
        forced = {engine: forced_agreement(prompt_seqs) for engine, prompt_seqs in spec.get("forced", {}).items()}
    print(json.dumps({"tok_s": {k: statistics.median(v) for k, v in samples.items()}, "samples": samples,
                      "greedy": tokens, "forced": forced, "baseline_rss": baseline, "peak_rss": rss.peak,
                      "info": f"llama-cpp-python {llama_cpp.__version__}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
