"""tokenloom, transformers and llama.cpp side by side: tok/s, memory and greedy agreement.

    tokenloom bench [-m MODEL] [--threads 2] [--reps 3] [--new-tokens 64] [--quick]
                    [--engines tokenloom,transformers,llama.cpp] [--tokenloom-quantize auto]

Every engine gets the same token ids (made by tokenloom's tokenizer from a fixed English text),
the same thread count, greedy decoding with end-of-sequence ignored, and runs in its own
subprocess, so that its memory is its own. Each measurement is run `reps + 1` times; the first
is a warm-up (allocation, kernel choice) and the median of the rest is reported:
  prefill   = prompt tokens / time of a generate call with max_new_tokens=1 (512-token prompt)
  decode bB = B * (N - 1) / (t(N) - t(1)) on B distinct 32-token prompts (N = --new-tokens)
  beam4     = N / time of a 4-beam search from one 32-token prompt
Memory: a thread in each runner reads /proc/self/statm every 10 ms while it generates; the
runtime baseline is the RSS after importing the engine and running torch's kernels once on
small dummy tensors (its thread pool and GEMM buffers, 12-17 MB measured here, which any torch program holds
after its first product), before loading the model; the RSS after the import alone is shown
beside it. tokenloom's
budget is baseline + 1.5 x the weight file + the KV cache the workload needs (what the engine
allocated is shown beside it: over-allocation counts against the budget).
Agreement: the first 32 greedy tokens of 8 short plain-text prompts, compared with llama.cpp's;
and, position by position along each engine's own greedy tokens, whether llama.cpp given the
same prefix picks the same next one (one near-tie early on decides all of a free-running text).
The floor under both: each engine against itself with its input embeddings nudged by ~1 ulp,
tokenloom here, llama.cpp in its runner (fed the embeddings as input vectors); with int8
activations a one-ulp change can move a code and, at the next near-tie, the text
(benchmarks/greedy_noise_floor.py does more nudges, and the float32 path).

The llama.cpp runner is benchmarks/llama_cpp_runner.py, run by the python of a separate venv
(benchmarks/setup_llama_cpp.sh builds one): llama-cpp-python is never a tokenloom dependency.
Runners take a JSON spec on stdin and print one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout: benchmarks/ lives next to the package
LLAMA_RUNNER = REPO / "benchmarks" / "llama_cpp_runner.py"
ENGINES = ("tokenloom", "transformers", "llama.cpp")

TEXT = (
    "The river runs slowly past the old mill, where the miller's family has lived for more than two "
    "hundred years. In the spring the water rises and covers the low fields, and the children watch "
    "the ducks swim between the willow trees. Every morning the baker opens his shop at six o'clock, "
    "and the smell of fresh bread fills the narrow street. Travellers who stop in the village often "
    "ask about the castle on the hill; the owner of the inn tells them that it was built by a duke "
    "who lost his fortune at cards and never finished the western tower. Scientists from the "
    "university come every summer to count the birds in the marsh, and they write long reports about "
    "herons, swallows and the rare blue kingfisher that nests under the bridge. "
)
AGREEMENT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The best way to learn a new programming language is",
    "Water boils at a temperature of",
    "My favourite season of the year is autumn because",
    "The three primary colours are",
    "To make a cup of tea, first",
    "In 1969, the first humans to walk on the Moon",
]


# ------------------------------------------------------------------ shared by the runners


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process's high-water mark is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    """The highest RSS seen while the `with` block runs, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def warm_runtime() -> int:
    """Run torch's CPU kernels once on dummy tensors (no model) and return the RSS after: the
    runtime's own memory (OpenMP threads, GEMM and attention buffers) before any weight."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        x = torch.randn(512, 576)
        torch.mm(x, torch.randn(576, 1536))
        F.scaled_dot_product_attention(*(torch.randn(1, 4, 512, 64) for _ in range(3)), is_causal=True)
        codes = torch.randint(0, 16, (64, 64), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        torch.ops.aten._weight_int4pack_mm_for_cpu(x[:4, :64].bfloat16(), packed, 32,
                                                   torch.ones(2, 64, 2, dtype=torch.bfloat16))
        torch.ops.aten._weight_int8pack_mm(x[:4, :64].bfloat16(), codes.to(torch.int8),
                                           torch.ones(64, dtype=torch.bfloat16))
        from tokenloom import kernels
        if kernels.library():  # our own kernels' library and its first call
            kernels.q8_mm(x[:4, :64], codes.to(torch.int8).view(8, 2, 256), torch.ones(8, 2, 8, dtype=torch.float16))
    return rss_bytes()


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def measure(name: str, generate, spec: dict) -> dict:
    """The timed measurements for an engine whose `generate(prompts, n, beams)` returns token lists."""
    reps, n = spec["reps"], spec["new_tokens"]
    cases = {"prefill": lambda: len(spec["prefill"]) / timed(generate, [spec["prefill"]], 1, 1)}
    for b, prompts in spec["batches"].items():
        cases[f"decode_b{b}"] = lambda p=prompts: len(p) * (n - 1) / (timed(generate, p, n, 1)
                                                                      - timed(generate, p, 1, 1))
    if spec["beams"] > 1:
        cases[f"beam{spec['beams']}"] = lambda: n / timed(generate, [spec["beam_prompt"]], n, spec["beams"])
    samples = {}
    for key, case in cases.items():
        samples[key] = [case() for _ in range(reps + 1)][1:]  # the first run is a warm-up
        progress(name, f"{key}: {statistics.median(samples[key]):.1f} tok/s (median of {reps})")
    greedy = [generate([p], spec["agree_tokens"], 1)[0] for p in spec["agree_prompts"]]
    progress(name, f"greedy tokens for {len(greedy)} agreement prompts")
    return {"tok_s": {k: statistics.median(v) for k, v in samples.items()}, "samples": samples, "greedy": greedy}


def greedy_run(net, prompt: list[int], n: int, forced: list[int] | None = None) -> list[int]:
    """The network's argmax at each of n positions after `prompt`, fed its own choices, or fed
    `forced`'s tokens when given (straight network calls, one token per step)."""
    import torch

    with torch.inference_mode():
        cache = net.make_cache(1, len(prompt) + n)
        logits = net(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, last_only=True)
        out = []
        for t in range(n):
            out.append(int(logits[0, -1].argmax()))
            if t + 1 < n:
                tok = forced[t] if forced is not None else out[-1]
                logits = net(torch.tensor([[tok]]), torch.tensor([[len(prompt) + t]]), cache, last_only=True)
    return out


class Nudged:
    """Within the block, the network's input embeddings are multiplied by (1 + eps * N(0, 1)):
    with eps = 1e-7, about one float32 ulp."""

    def __init__(self, net, eps: float, seed: int):
        import torch

        self.embed, self.eps, self.gen = net.embed_tokens, eps, torch.Generator().manual_seed(seed)

    def __enter__(self):
        import torch

        plain = type(self.embed).forward.__get__(self.embed)
        self.embed.forward = lambda ids: (x := plain(ids)) * (1 + self.eps * torch.randn(x.shape, generator=self.gen))

    def __exit__(self, *exc):
        del self.embed.forward


def nudged_agreement(net, prompts: list[list[int]], n: int, eps: float = 1e-7, seed: int = 1,
                     plain: list[list[int]] | None = None) -> dict:
    """The agreement rows' measure, between the network and itself with its inputs nudged by
    ~1 ulp: how many greedy texts stay identical, and how often the nudged network, fed the
    plain one's text, picks the same next token. With int8-quantized activations a one-ulp
    change can move a code, and that is the floor under agreement with any other engine whose
    arithmetic is not ours bit for bit (llama.cpp's included). `plain`: the un-nudged greedy
    tokens, when the caller already has them."""
    plain = plain if plain is not None else [greedy_run(net, p, n) for p in prompts]
    with Nudged(net, eps, seed):
        texts = [greedy_run(net, p, n) for p in prompts]
        steps = [greedy_run(net, p, n, forced=ref) for p, ref in zip(prompts, plain)]
    return {"eps": eps, "identical": sum(a == b for a, b in zip(texts, plain)), "prompts": len(prompts),
            "same": sum(a == b for s, ref in zip(steps, plain) for a, b in zip(s, ref)), "positions": len(prompts) * n}


def progress(name: str, text: str) -> None:
    print(f"[{name}] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ runners (in a subprocess each)


def run_tokenloom(spec: dict) -> dict:
    import torch

    import tokenloom
    from tokenloom import kernels
    from tokenloom.config import GenerationConfig
    from tokenloom.engine.slots import SlotCache

    torch.set_num_threads(spec["threads"])
    imported = rss_bytes()
    baseline = warm_runtime()
    model = tokenloom.load(spec["path"], quantize=spec["quantize"], progress=False)
    probe = SlotCache(model.network, model.dtype, model.device)  # its per-layer (heads, head_dim) for K and V
    per_token = sum(h * d for h, d in probe.kshapes + probe.vshapes) * torch.empty((), dtype=model.dtype).element_size()
    kv = [0]
    release = SlotCache.release

    def release_and_record(cache):  # the engine drops its cache when idle: note its size first
        if hasattr(cache, "k"):
            kv[0] = max(kv[0], cache.nbytes)
        release(cache)

    SlotCache.release = release_and_record

    def generate(prompts, n, beams):
        cfg = GenerationConfig.from_dict({"max_new_tokens": n, "ignore_eos": True, "temperature": 0,
                                          "num_beams": beams})
        return [g.token_ids for g in model.generate_ids(prompts, cfg)]

    with PeakRss() as rss:
        out = measure("tokenloom", generate, spec)
    out["nudged"] = nudged_agreement(model.network, spec["agree_prompts"], spec["agree_tokens"])
    progress("tokenloom", "greedy tokens with inputs nudged by one ulp")
    return {**out, "baseline_rss": baseline, "import_rss": imported, "peak_rss": rss.peak, "kv_bytes_per_token": per_token,
            "kv_allocated_bytes": kv[0], "info": f"quantization={model.quantization or 'none'}"
            + (f", kernels {kernels.cpu_isa()}" if kernels.library() else "")}


def run_transformers(spec: dict) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    transformers.utils.logging.disable_progress_bar()  # keep stderr to one progress line per measurement
    imported = rss_bytes()
    baseline = warm_runtime()
    path = Path(spec["path"])
    if path.is_file():  # GGUF: transformers dequantizes it to float32
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()

    def generate(prompts, n, beams):
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as for decoder-only generation
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        with torch.inference_mode():  # min_new_tokens holds EOS back: exactly n tokens
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 num_beams=beams, pad_token_id=0)
        return out[:, width:].tolist()

    with PeakRss() as rss:
        out = measure("transformers", generate, spec)
    return {**out, "baseline_rss": baseline, "import_rss": imported, "peak_rss": rss.peak, "info": "float32"}


def worker_main(argv: list[str]) -> int:
    """`python -m tokenloom.bench --worker ENGINE`: spec JSON on stdin, result JSON on stdout."""
    spec = json.load(sys.stdin)
    result = {"tokenloom": run_tokenloom, "transformers": run_transformers}[argv[1]](spec)
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------ the parent: prompts, runners, table


def load_tokenizer(source):
    """tokenloom's tokenizer for `source` without loading the weights."""
    from tokenloom.tokenizer.tokenizer import Tokenizer

    if source.kind == "gguf":
        from tokenloom.loading.gguf_file import read_gguf
        return Tokenizer.from_gguf_metadata(read_gguf(source.path).metadata)
    return Tokenizer.from_folder(source.path)


def weight_bytes(source) -> int:
    if source.kind == "gguf":
        return source.path.stat().st_size
    return sum(p.stat().st_size for p in source.path.iterdir()
               if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))


def make_spec(args, source) -> dict:
    """The workload every engine runs, as token ids."""
    tok = load_tokenizer(source)
    unit = tok.encode(TEXT, add_special_tokens=False)
    stride = 13  # prompt i starts 13 tokens after prompt i-1: distinct prompts from one text
    batches = [int(b) for b in args.batches.split(",")]
    need = max(args.prefill_tokens, stride * max(batches) + args.prompt_tokens)
    stream = unit * (need // len(unit) + 1)
    prompts = {b: [stream[i * stride:i * stride + args.prompt_tokens] for i in range(b)] for b in batches}
    return {"model": str(args.model), "path": str(source.path), "threads": args.threads, "reps": args.reps,
            "new_tokens": args.new_tokens, "prefill": stream[:args.prefill_tokens], "batches": prompts,
            "beams": args.beams, "beam_prompt": prompts[batches[0]][0], "agree_tokens": args.agree_tokens,
            "agree_prompts": [tok.encode(p, add_special_tokens=False) for p in AGREEMENT_PROMPTS]}


def llama_python(args) -> Path | None:
    if args.llama_python:
        return Path(args.llama_python)
    default = REPO / "benchmarks" / ".venv-llama" / "bin" / "python"
    return default if default.exists() else None


def run_engine(engine: str, spec: dict, args, source) -> dict:
    """One engine's results, or {"error": why} (shown in its column)."""
    if engine == "transformers" and importlib.util.find_spec("transformers") is None:
        return {"error": "not installed"}
    if engine == "llama.cpp":
        python = llama_python(args)
        if python is None or not python.exists():
            return {"error": "not available", "why": f"no llama.cpp python ({python or 'benchmarks/.venv-llama'}): "
                    "run benchmarks/setup_llama_cpp.sh or pass --llama-python"}
        if not LLAMA_RUNNER.exists():
            return {"error": "not available", "why": f"{LLAMA_RUNNER} not found (run from a tokenloom checkout)"}
        if source.kind != "gguf":
            return {"error": "not available", "why": "llama.cpp needs a .gguf model"}
        cmd = [str(python), str(LLAMA_RUNNER)]
    else:
        cmd = [sys.executable, "-m", "tokenloom.bench", "--worker", engine]
    progress(engine, "starting")
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false",
           # the runner imports this tokenloom, installed or not
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, input=json.dumps(spec), stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": "failed", "why": f"{engine} runner exited with status {proc.returncode} (see its stderr above)"}
    return json.loads(lines[-1])


def agreement(ours: list[list[int]], ref: list[list[int]], n: int) -> dict:
    same = sum(a[:n] == b[:n] for a, b in zip(ours, ref))
    prefixes = []
    for a, b in zip(ours, ref):
        k = 0
        while k < min(len(a), len(b), n) and a[k] == b[k]:
            k += 1
        prefixes.append(k)
    return {"identical": same, "prompts": len(ref), "mean_common_prefix": statistics.mean(prefixes)}


def workload_tokens(spec: dict) -> int:
    """The most tokens held in the KV cache at once by any measurement (prompt + new, all rows)."""
    n, beam = spec["new_tokens"], len(spec["beam_prompt"]) + spec["new_tokens"]
    return max([len(spec["prefill"]) + 1, spec["beams"] * beam, len(spec["agree_prompts"][0]) + spec["agree_tokens"]]
               + [sum(len(p) + n for p in prompts) for prompts in spec["batches"].values()])


def ours(results: dict) -> list[str]:
    """The tokenloom columns: "tokenloom", or "tokenloom <quantize>" for each of several settings."""
    return [e for e in results if e.startswith("tokenloom")]


def summarize(results: dict, spec: dict, weights: int) -> None:
    """Add the budget and the greedy agreement (with llama.cpp) to the results, in place.

    The budget's KV term is what the workload needs, not what the engine allocated: an engine
    that over-allocates should show up as over budget."""
    for e in ours(results):
        tl = results[e]
        if "error" not in tl:
            tl["kv_bytes"] = tl["kv_bytes_per_token"] * workload_tokens(spec)
            tl["budget"] = tl["baseline_rss"] + 1.5 * weights + tl["kv_bytes"]
    ref = results.get("llama.cpp", {})
    for engine in [*ours(results), "transformers"]:
        r = results.get(engine, {})
        if r and "error" not in r and ref and "error" not in ref:
            r["agreement"] = agreement(r["greedy"], ref["greedy"], spec["agree_tokens"])
            if engine in ref.get("forced", {}):
                r["forced_agreement"] = ref["forced"][engine]


def table(results: dict, spec: dict, args, weights: int) -> str:
    mine = ours(results)
    engines = mine + [e for e in ENGINES[1:] if e in results]
    ratios = [(a, b) for a in mine for b in engines if b not in mine]  # ratio columns
    mb = 1 / 2**20

    def value(r: dict, key: str, scale: float = 1.0) -> float | None:
        v = r.get("tok_s", {}).get(key) if key.startswith(("prefill", "decode", "beam")) else r.get(key)
        return None if v is None else v * scale

    rows = [("prefill", f"prefill {len(spec['prefill'])}-token prompt (tok/s)", 1.0)]
    rows += [(f"decode_b{b}", f"decode batch {b} (tok/s)", 1.0) for b in spec["batches"]]
    if spec["beams"] > 1:
        rows.append((f"beam{spec['beams']}", f"beam search, {spec['beams']} beams (tok/s)", 1.0))
    rows += [("peak_rss", "peak RSS while generating (MB)", mb), ("baseline_rss", "runtime baseline RSS (MB), kernels warmed", mb),
             ("import_rss", "RSS after import alone (MB)", mb),
             ("budget", "budget: runtime + 1.5 x weight file + KV (MB)", mb)]
    head = ["measurement", *engines, *[f"{a} / {b}" for a, b in ratios]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def number(e: str, key: str, scale: float) -> float | None:
        return None if "error" in results[e] else value(results[e], key, scale)

    for key, label, scale in rows:
        cells = []
        for e in engines:
            v = number(e, key, scale)
            cells.append(results[e]["error"] if "error" in results[e] else ("—" if v is None else f"{v:.1f}"))
        for a, b in ratios:
            x, y = number(a, key, scale), number(b, key, scale)
            cells.append(f"{x / y:.2f}x" if x and y else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{results[e]['kv_bytes'] * mb:.1f} / {results[e]['kv_allocated_bytes'] * mb:.1f}"
             if "kv_bytes" in results[e] else results[e].get("error", "—") for e in engines]
    lines.append("| KV cache: the workload needs / the engine allocated (MB) | "
                 + " | ".join(cells + ["—"] * len(ratios)) + " |")
    cells = []
    for e in engines:
        a = results[e].get("agreement")
        cells.append(f"{a['identical']}/{a['prompts']} (mean common prefix {a['mean_common_prefix']:.1f})" if a
                     else results[e].get("error", "—"))
    lines.append(f"| greedy agreement with llama.cpp (first {spec['agree_tokens']} tokens identical) | "
                 + " | ".join(cells + ["—"] * len(ratios)) + " |")
    cells = []
    for e in engines:
        f = results[e].get("forced_agreement")
        cells.append(f"{f['same']}/{f['positions']} ({f['same'] / f['positions']:.1%})" if f and f["positions"]
                     else results[e].get("error", "—"))
    lines.append("| llama.cpp picks the same next token, fed this engine's greedy prefix (positions) | "
                 + " | ".join(cells + ["—"] * len(ratios)) + " |")
    cells = []
    for e in engines:
        u = results[e].get("nudged")
        cells.append(f"{u['identical']}/{u['prompts']} texts, {u['same']}/{u['positions']} "
                     f"({u['same'] / u['positions']:.1%}) next tokens"
                     + (" (but its un-nudged input vectors did not give its own text)" if u.get("exact") is False else "")
                     if u else results[e].get("error", "—"))
    if any(results[e].get("nudged") for e in engines):
        lines.append("| the floor: the same engine with its inputs nudged by ~1 ulp (identical texts, same next token) | "
                     + " | ".join(cells + ["—"] * len(ratios)) + " |")

    notes = [f"model {args.model} ({Path(spec['path']).name}, {weights * mb:.1f} MB), threads={spec['threads']}, "
             f"median of {spec['reps']} after a warm-up, {spec['new_tokens']} new tokens, "
             f"{len(spec['beam_prompt'])}-token prompts for decode and beams"]
    notes += [f"{e}: {results[e]['info']}" for e in engines if "info" in results[e]]
    for e in mine:
        tl = results[e]
        if "budget" in tl:
            notes.append(f"{e} budget = {tl['baseline_rss'] * mb:.1f} + 1.5 x {weights * mb:.1f} + "
                         f"{tl['kv_bytes'] * mb:.1f} (KV for {workload_tokens(spec)} tokens) MB; peak RSS is "
                         f"{tl['peak_rss'] / tl['budget']:.0%} of it")
    notes += [f"{e}: {results[e]['why']}" for e in engines if "why" in results[e]]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from tokenloom.loading.registry import DEFAULT_MODEL

    ap.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"the model (default: {DEFAULT_MODEL})")
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default: 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per measurement, median reported (default: 3)")
    ap.add_argument("--new-tokens", type=int, default=None, help="N, new tokens for decode and beams (default: 64)")
    ap.add_argument("--quick", action="store_true", help="1 rep and 32 new tokens (unless given)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    ap.add_argument("--tokenloom-quantize", default="auto",
                    help="tokenloom's weights: auto (packed int4/int8 for a quantized GGUF), none (float32), "
                         "int8, int4 or w8a8; several, comma-separated, give a column each (default: auto)")
    ap.add_argument("--llama-python", help="python of the llama-cpp-python venv "
                    "(default: benchmarks/.venv-llama/bin/python when it exists)")
    ap.add_argument("--json", help="write the results here (default: benchmarks/results/speed-<timestamp>.json)")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for prefill (default: 512)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for decode and beams (default: 32)")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes (default: 1,8,32)")
    ap.add_argument("--beams", type=int, default=4, help="beams for beam search; 1 skips it (default: 4)")
    ap.add_argument("--agree-tokens", type=int, default=32, help="greedy tokens compared with llama.cpp (default: 32)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed arguments describe; print the table, write the JSON."""
    from tokenloom.api import QUANTIZE
    from tokenloom.errors import TokenloomError
    from tokenloom.loading.resolve import resolve_model

    args.reps = args.reps or (1 if args.quick else 3)
    args.new_tokens = args.new_tokens or (32 if args.quick else 64)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise TokenloomError(f"--engines: unknown engine {', '.join(unknown) or '(none)'} (allowed: {', '.join(ENGINES)})")
    quantize = [q.strip() for q in args.tokenloom_quantize.split(",") if q.strip()]
    bad = [q for q in quantize if q not in QUANTIZE]
    if bad or not quantize:
        raise TokenloomError(f"--tokenloom-quantize: invalid {', '.join(bad) or '(none)'} "
                             f"(allowed: {', '.join(QUANTIZE)}, comma-separated)")
    if args.new_tokens < 2 or args.reps < 1:
        raise TokenloomError("--new-tokens must be at least 2 and --reps at least 1")
    source = resolve_model(args.model)
    spec = make_spec(args, source)
    weights = weight_bytes(source)
    results = {}
    for e in ENGINES:
        if e not in engines:
            continue
        if e == "llama.cpp":  # it also checks the others' greedy tokens step by step
            forced = {name: r["greedy"] for name, r in results.items() if "greedy" in r}
            results[e] = run_engine(e, {**spec, "forced": forced}, args, source)
            continue
        if e != "tokenloom":
            results[e] = run_engine(e, spec, args, source)
            continue
        for q in quantize:
            name = e if len(quantize) == 1 else f"tokenloom {q}"
            results[name] = run_engine(e, {**spec, "quantize": q}, args, source)
    summarize(results, spec, weights)
    print(table(results, spec, args, weights), flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"speed-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "weights_bytes": weights, "results": results}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
