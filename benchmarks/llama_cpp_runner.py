"""llama.cpp's side of `tokenloom bench`, run by the llama-cpp-python venv's python (not tokenloom's).

    benchmarks/.venv-llama/bin/python benchmarks/llama_cpp_runner.py < spec.json

Reads the spec tokenloom/bench.py writes (the same token ids every engine gets) on stdin and
prints one JSON line: prefill and batch-1 decode tok/s, RSS, greedy tokens, and how often its next
token matches the other engines' greedy tokens (the spec's "forced"), fed their prefixes. It imports only
llama_cpp, gguf and numpy, since that venv has no torch or tokenloom. llama-cpp-python has no beam
search and no simple batched API, so batch > 1 and beams are left out (the table shows "—").
Greedy = argmax of the last position's logits, read straight from the context (`eval` keeps
no scores unless logits_all).

llama.cpp's own floor, as tokenloom measures its own (tokenloom/bench.py `nudged_agreement`):
llama.cpp fed its token embeddings as input vectors (the table read with gguf, dequantized as
llama.cpp's get_rows does, exactly), then the same vectors times (1 + 1e-7 N(0, 1)), about one
float32 ulp: how many greedy texts stay identical and how often it picks the same next token.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import sys
import threading
import time

import gguf
import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaBatch


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


def token_embeddings(path: str) -> np.ndarray:
    """The (vocab, n_embd) float32 input table, as llama.cpp's get_rows makes each row (a Q8_0
    row is scale x int8, exact in float32)."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    return np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def nudged_floor(llm, spec: dict, plain: list[list[int]], next_token, eps: float = 1e-7, seed: int = 1) -> dict:
    """llama.cpp against itself with its input vectors nudged by ~1 ulp: the measure of
    tokenloom's `nudged_agreement`. `exact`: whether the un-nudged vectors give the token-fed
    greedy tokens (`plain`), as they must for the floor to be llama.cpp's own."""
    table, rng, n = token_embeddings(spec["path"]), np.random.default_rng(seed), spec["agree_tokens"]
    batch = LlamaBatch(n_tokens=max(len(p) for p in spec["agree_prompts"]), embd=table.shape[1], n_seq_max=1,
                       verbose=False)

    def feed(ids: list[int], start: int, nudge: bool) -> int:
        x = table[ids]
        if nudge:
            x = np.ascontiguousarray(x * (1 + np.float32(eps) * rng.standard_normal(x.shape, dtype=np.float32)))
        if start == 0:
            llm.reset()
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        ctypes.memmove(batch.batch.embd, x.ctypes.data, x.nbytes)
        for i in range(len(ids)):
            batch.batch.pos[i], batch.batch.n_seq_id[i], batch.batch.logits[i] = start + i, 1, i == len(ids) - 1
            batch.batch.seq_id[i][0] = 0
        batch.batch.n_tokens = len(ids)
        llm._ctx.decode(batch)
        return next_token()

    def run(prompt: list[int], nudge: bool, forced: list[int] | None = None) -> list[int]:
        out = [feed(prompt, 0, nudge)]
        while len(out) < n:
            out.append(feed([(forced or out)[len(out) - 1]], len(prompt) + len(out) - 1, nudge))
        return out

    exact = [run(p, False) for p in spec["agree_prompts"]] == [s[:n] for s in plain]
    texts = [run(p, True) for p in spec["agree_prompts"]]
    steps = [run(p, True, ref) for p, ref in zip(spec["agree_prompts"], plain)]
    batch.close()
    return {"eps": eps, "exact": exact, "identical": sum(a == b[:n] for a, b in zip(texts, plain)),
            "prompts": len(plain), "same": sum(a == b for s, ref in zip(steps, plain) for a, b in zip(s, ref)),
            "positions": len(plain) * n}


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
    nudged = nudged_floor(llm, spec, tokens, next_token)  # after the peak: it holds a float32 copy of the table
    progress(f"floor: {nudged['identical']}/{nudged['prompts']} texts and {nudged['same']}/{nudged['positions']} "
             f"next tokens unchanged by a ~1 ulp nudge (un-nudged vectors = tokens: {nudged['exact']})")
    print(json.dumps({"tok_s": {k: statistics.median(v) for k, v in samples.items()}, "samples": samples,
                      "greedy": tokens, "forced": forced, "nudged": nudged, "baseline_rss": baseline, "peak_rss": rss.peak,
                      "info": f"llama-cpp-python {llama_cpp.__version__}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
