"""Load test of OpenAI-compatible servers: tokenloom serve and llama.cpp (llama-cpp-python), side by side.

    python benchmarks/bench_server.py                                 # both servers, concurrency 1,8,32
    python benchmarks/bench_server.py --servers llama.cpp --concurrency 1,8 --requests 8
    python benchmarks/bench_server.py --url http://127.0.0.1:8000 --name mine

The script starts each server itself as a subprocess on a free port, on the same GGUF file
(default: the registry's smollm2-135m-instruct, Q4_1), waits until it answers, runs every
concurrency level, and stops it: never two servers at once. With --reps > 1 the servers
alternate (tokenloom, llama.cpp, tokenloom, ...). llama.cpp needs benchmarks/setup_llama_cpp.sh
first (its own venv, benchmarks/.venv-llama); --url measures a server that is already running.

Each client streams `POST /v1/completions` (SSE) with a fixed prompt from a fixed set, greedy
(temperature 0), `max_tokens` new tokens and end-of-sequence suppressed where the server allows
it (tokenloom: ignore_eos + min_tokens; llama-cpp-python: min_tokens), so every request makes
the same number of tokens. Per level, `--requests` requests (default max(2*concurrency, 8)) go
through `concurrency` clients after 2 warm-up requests. Measured per request:
  TTFT  time from sending the request to the first SSE chunk carrying text
  ITL   mean gap between text chunks after the first ((last - first) / (chunks - 1))
and per level: requests/s and output tokens/s over the level's wall time, median and p90 of TTFT
and ITL over all requests (all reps pooled; req/s and tok/s are medians over reps).

The client is plain asyncio (HTTP/1.1, one connection per request), no dependencies. Threads:
llama.cpp gets --n_threads/--n_threads_batch = --threads (default 2); tokenloom gets
OMP_NUM_THREADS = --threads (torch's intra-op threads). llama-cpp-python's server serves one
request at a time (a lock; --interrupt_requests False so a new request waits rather than cutting
the running one off), so its requests/s does not grow with concurrency and TTFT grows instead.
The CPU time of other processes during each level is recorded ("other_cpu_s"): anything else
busy on a small machine distorts every number, so the script waits (--quiet-wait) until the
machine is idle before each server run. Results: a markdown table on stdout and
benchmarks/results/server-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent
LLAMA_PYTHON = ROOT / ".venv-llama" / "bin" / "python"

WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old oak tree "
         "near the river and children play football in the park on a sunny afternoon").split()


def make_prompts(n: int, words: int) -> list[str]:
    """n fixed prompts; each starts at a different word so a server cannot reuse the previous
    request's prompt cache (llama-cpp-python keeps the last prompt's KV)."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)).capitalize() for i in range(n)]


# ---------------------------------------------------------------- HTTP/1.1 + SSE over asyncio streams

class HTTPError(Exception):
    pass


async def _open(url: str, method: str, path: str, body: bytes | None):
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    head = [f"{method} {path} HTTP/1.1", f"Host: {u.hostname}:{u.port}", "Connection: close",
            "Accept: text/event-stream, application/json"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise HTTPError("connection closed before the status line")
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return reader, writer, status, headers


async def _body_pieces(reader: asyncio.StreamReader, headers: dict):
    """The response body as it arrives (de-chunked)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece


async def http_get(url: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    async def go():
        reader, writer, status, headers = await _open(url, "GET", path, None)
        body = b"".join([p async for p in _body_pieces(reader, headers)])
        writer.close()
        return status, body
    return await asyncio.wait_for(go(), timeout)


@dataclass
class RequestResult:
    index: int
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0          # seconds to the first chunk with text
    itl: float = 0.0           # mean gap between text chunks after the first
    total: float = 0.0
    chunks: int = 0            # SSE chunks that carried text
    tokens: int = 0            # usage.completion_tokens when the server sends it, else chunks
    finish_reason: str | None = None
    gaps_max: float = 0.0


async def stream_completion(url: str, index: int, payload: dict, timeout: float) -> RequestResult:
    res = RequestResult(index)
    body = json.dumps(payload).encode()
    res.start = t0 = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = None
    try:
        async def go():
            nonlocal usage_tokens
            reader, writer, status, headers = await _open(url, "POST", "/v1/completions", body)
            try:
                if status != 200:
                    text = b"".join([p async for p in _body_pieces(reader, headers)])
                    raise HTTPError(f"HTTP {status}: {text[:300].decode(errors='replace')}")
                buf, data = b"", []
                async for piece in _body_pieces(reader, headers):
                    now = time.perf_counter()
                    buf += piece
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        line = line.rstrip(b"\r")
                        if line.startswith(b"data:"):
                            data.append(line[5:].strip())
                            continue
                        if line or not data:   # comments (": ping"), other fields
                            continue
                        event, data = b"\n".join(data), []
                        if event == b"[DONE]":
                            return
                        obj = json.loads(event)
                        if "error" in obj:
                            raise HTTPError(f"error event: {obj['error']}")
                        for choice in obj.get("choices") or []:
                            if choice.get("text"):
                                stamps.append(now)
                            if choice.get("finish_reason"):
                                res.finish_reason = choice["finish_reason"]
                        if obj.get("usage"):
                            usage_tokens = obj["usage"].get("completion_tokens")
            finally:
                writer.close()
        await asyncio.wait_for(go(), timeout)
        res.ok = bool(stamps)
        if not stamps:
            res.error = "no text chunk"
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
        res.error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    res.total = end - t0
    res.chunks = len(stamps)
    res.tokens = usage_tokens if usage_tokens else len(stamps)
    if stamps:
        res.ttft = stamps[0] - t0
        if len(stamps) > 1:
            res.itl = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
            res.gaps_max = max(b - a for a, b in zip(stamps, stamps[1:]))
    return res


# ---------------------------------------------------------------- CPU accounting (who else is busy)

TICK = os.sysconf("SC_CLK_TCK")


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / TICK


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds used so far by process pid and its descendants (0 when unknown)."""
    if pid is None:
        return 0.0
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rfind(")") + 2:].split()
        children.setdefault(int(rest[1]), []).append(int(d))
        stats[int(d)] = (int(rest[11]) + int(rest[12])) / TICK
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0.0)
        todo += children.get(p, [])
    return total


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def wait_quiet(max_busy_cores: float, max_wait: float) -> dict:
    """Wait until the machine's busy CPU (sampled over 3 s) is below max_busy_cores."""
    deadline = time.time() + max_wait
    while True:
        b0, t0 = cpu_busy_s(), time.time()
        time.sleep(3)
        busy = (cpu_busy_s() - b0) / (time.time() - t0)
        if busy < max_busy_cores or time.time() > deadline:
            quiet = busy < max_busy_cores
            if not quiet:
                print(f"  machine still busy ({busy:.2f} cores) after {max_wait:.0f} s; going on", file=sys.stderr)
            return {"busy_cores": round(busy, 3), "quiet": quiet, "loadavg": os.getloadavg()}
        print(f"  waiting for a quiet machine: {busy:.2f} cores busy, load {os.getloadavg()[0]:.2f}", file=sys.stderr)


# ---------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    url: str
    cmd: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    extra_body: dict = field(default_factory=dict)
    model: str = "bench"       # the name sent in requests: the first id of GET /v1/models
    proc: subprocess.Popen | None = None
    log_path: str = ""
    started_s: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float) -> None:
        if not self.cmd:
            asyncio.run(wait_ready(self.url, timeout))
            self._model_name()
            return
        log = tempfile.NamedTemporaryFile("w", prefix=f"bench-server-{self.name}-", suffix=".log", delete=False)
        self.log_path = log.name
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.env}, start_new_session=True)
        try:
            asyncio.run(wait_ready(self.url, timeout, self.proc))
        except BaseException:
            self.stop()
            print(self.log_tail(), file=sys.stderr)
            raise
        self.started_s = time.perf_counter() - t0
        self._model_name()

    def _model_name(self) -> None:
        try:
            status, body = asyncio.run(http_get(self.url, "/v1/models"))
            if status == 200:
                self.model = json.loads(body)["data"][0]["id"]
        except (OSError, asyncio.TimeoutError, HTTPError, ValueError, KeyError, IndexError):
            pass

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path:
            return ""
        lines = Path(self.log_path).read_text(errors="replace").splitlines()
        return "\n".join(f"  [{self.name}] {x}" for x in lines[-n:])

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)   # the group this script started for it
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


async def wait_ready(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Ready when GET /health or GET /v1/models answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was ready")
        for path in ("/health", "/v1/models"):
            try:
                if (await http_get(url, path))[0] == 200:
                    return
            except (OSError, asyncio.TimeoutError, HTTPError, ValueError, IndexError):
                pass
        await asyncio.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def make_server(kind: str, args, gguf: str) -> Server:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    threads = str(args.threads)
    if kind == "tokenloom":
        cmd = [sys.executable, "-m", "tokenloom", "serve", "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
               *shlex.split(args.tokenloom_args)]
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        return Server("tokenloom", url, cmd, env, {"ignore_eos": True, "min_tokens": args.max_tokens,
                                                  "stream_options": {"include_usage": True}})
    if kind == "llama.cpp":
        if not LLAMA_PYTHON.exists():
            raise SystemExit(f"{LLAMA_PYTHON} missing: run `nice -n 19 bash benchmarks/setup_llama_cpp.sh` first")
        cmd = [str(LLAMA_PYTHON), "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
               "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", str(args.n_ctx),
               "--n_batch", "512", "--interrupt_requests", "False", "--verbose", "False", *shlex.split(args.llama_args)]
        # min_tokens masks the end-of-sequence token; repeat_penalty 1.0 = plain greedy (its default is 1.1)
        return Server("llama.cpp", url, cmd, {"OMP_NUM_THREADS": threads},
                      {"min_tokens": args.max_tokens, "repeat_penalty": 1.0})
    raise SystemExit(f"unknown server {kind!r} (tokenloom, llama.cpp)")


# ---------------------------------------------------------------- one level

async def run_level(server: Server, concurrency: int, n_requests: int, prompts: list[str], args) -> dict:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    results: list[RequestResult] = []

    def payload(i: int) -> dict:
        return {"model": server.model, "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                "temperature": 0.0, "stream": True, **server.extra_body}

    async def client():
        while not queue.empty():
            i = queue.get_nowait()
            results.append(await stream_completion(server.url, i, payload(i), args.request_timeout))

    busy0, srv0, me0 = cpu_busy_s(), tree_cpu_s(server.pid), self_cpu_s()
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    busy, srv, me = cpu_busy_s() - busy0, tree_cpu_s(server.pid) - srv0, self_cpu_s() - me0
    results.sort(key=lambda r: r.index)
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    return {
        "concurrency": concurrency, "requests": n_requests, "ok": len(ok), "wall_s": wall,
        "req_s": len(ok) / wall, "out_tok_s": tokens / wall, "tokens": tokens,
        "short": sum(1 for r in ok if r.tokens != args.max_tokens),
        "cpu": {"machine_busy_s": round(busy, 3), "server_s": round(srv, 3) if server.pid else None,
                "client_s": round(me, 3), "other_s": round(busy - srv - me, 3) if server.pid else None},
        "results": [asdict(r) for r in results],
    }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(levels: list[dict]) -> dict:
    """Pool the reps of one (server, concurrency)."""
    ok = [r for lv in levels for r in lv["results"] if r["ok"]]
    ttft, itl = [r["ttft"] for r in ok], [r["itl"] for r in ok if r["chunks"] > 1]
    return {
        "reps": len(levels), "requests": sum(lv["requests"] for lv in levels), "ok": len(ok),
        "errors": sorted({r["error"] for lv in levels for r in lv["results"] if not r["ok"]})[:5],
        "short_requests": sum(lv["short"] for lv in levels),
        "req_s": statistics.median(lv["req_s"] for lv in levels),
        "out_tok_s": statistics.median(lv["out_tok_s"] for lv in levels),
        "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p90_ms": 1e3 * pct(ttft, 0.9),
        "itl_p50_ms": 1e3 * pct(itl, 0.5), "itl_p90_ms": 1e3 * pct(itl, 0.9),
        "total_p50_ms": 1e3 * pct([r["total"] for r in ok], 0.5),
        "other_cpu_s": [lv["cpu"]["other_s"] for lv in levels],
    }


METRICS = [("req_s", "requests/s", "{:.2f}"), ("out_tok_s", "output tok/s", "{:.1f}"),
           ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"), ("ttft_p90_ms", "TTFT p90 ms", "{:.0f}"),
           ("itl_p50_ms", "ITL p50 ms", "{:.1f}"), ("itl_p90_ms", "ITL p90 ms", "{:.1f}")]


def table(summary: dict, names: list[str], levels: list[int]) -> str:
    ratio = len(names) == 2
    head = "| concurrency | metric | " + " | ".join(names) + (f" | {names[0]}/{names[1]} |" if ratio else " |")
    lines = [head, "|---" * (2 + len(names) + ratio) + "|"]
    for c in levels:
        for key, label, fmt in METRICS:
            vals = [summary.get(n, {}).get(str(c), {}).get(key) for n in names]
            cells = [fmt.format(v) if v is not None else "-" for v in vals]
            row = f"| {c} | {label} | " + " | ".join(cells)
            if ratio:
                a, b = vals
                row += f" | {a / b:.2f}x" if a is not None and b else " | -"
            lines.append(row + " |")
    return "\n".join(lines)


def versions(kinds: list[str]) -> dict:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    v = {"tokenloom_commit": run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])}
    if "tokenloom" in kinds:
        v["torch"] = run([sys.executable, "-c", "import torch; print(torch.__version__)"])
    if "llama.cpp" in kinds and LLAMA_PYTHON.exists():
        v["llama_cpp_python"] = run([str(LLAMA_PYTHON), "-c", "import llama_cpp; print(llama_cpp.__version__)"])
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="tokenloom,llama.cpp", help="comma list of tokenloom, llama.cpp")
    ap.add_argument("--url", help="measure a running server instead (no --servers)")
    ap.add_argument("--name", default="server", help="label for --url")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name or .gguf path (both servers)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default max(2*concurrency, 8))")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--reps", type=int, default=1, help="runs of each server, alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context size")
    ap.add_argument("--tokenloom-args", default="", help="extra arguments for tokenloom serve, e.g. '--dtype bfloat16'")
    ap.add_argument("--llama-args", default="", help="extra arguments for llama_cpp.server")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=900)
    ap.add_argument("--quiet-cores", type=float, default=0.3, help="busy cores below which the machine counts as quiet")
    ap.add_argument("--quiet-wait", type=float, default=1800, help="seconds to wait for a quiet machine (0: don't)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/server-<timestamp>.json)")
    args = ap.parse_args()

    levels = [int(c) for c in args.concurrency.split(",")]
    gguf = args.model
    if args.url is None and not gguf.endswith(".gguf"):
        from tokenloom.loading.resolve import resolve_model
        gguf = str(resolve_model(args.model).path)
    kinds = [args.name] if args.url else [s.strip() for s in args.servers.split(",") if s.strip()]
    prompts = make_prompts(max(len(WORDS), 1), args.prompt_words)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: list[dict] = []

    print(f"model {gguf}; threads {args.threads}; max_tokens {args.max_tokens}; levels {levels}; "
          f"{os.cpu_count()} cpus; load {os.getloadavg()}", file=sys.stderr)
    for rep in range(args.reps):
        for kind in kinds:
            server = Server(kind, args.url.rstrip("/")) if args.url else make_server(kind, args, gguf)
            quiet = wait_quiet(args.quiet_cores, args.quiet_wait) if args.quiet_wait > 0 else {"loadavg": os.getloadavg()}
            print(f"[rep {rep + 1}] {kind}: starting ({quiet})", file=sys.stderr)
            server.start(args.startup_timeout)
            run = {"server": kind, "rep": rep, "cmd": server.cmd, "model_name": server.model, "env": server.env, "extra_body": server.extra_body,
                   "startup_s": server.started_s, "quiet_before": quiet, "levels": []}
            try:
                async def all_levels():
                    warm = {**server.extra_body, "model": server.model, "max_tokens": 8, "temperature": 0.0, "stream": True}
                    if "min_tokens" in warm:
                        warm["min_tokens"] = 8
                    for i in range(2):   # warm-up
                        w = await stream_completion(server.url, -1 - i, {**warm, "prompt": prompts[-1 - i]},
                                                    args.request_timeout)
                        if not w.ok:
                            raise RuntimeError(f"warm-up request failed: {w.error}")
                    for c in levels:
                        n = args.requests or max(2 * c, 8)
                        lv = await run_level(server, c, n, prompts, args)
                        lv["loadavg_after"] = os.getloadavg()
                        run["levels"].append(lv)
                        print(f"  c={c:<3} {lv['ok']}/{n} ok  {lv['req_s']:.2f} req/s  {lv['out_tok_s']:.1f} tok/s  "
                              f"wall {lv['wall_s']:.1f}s  cpu other {lv['cpu']['other_s']}s", file=sys.stderr)
                asyncio.run(all_levels())
            finally:
                server.stop()
                run["log_tail"] = server.log_tail(15)
            runs.append(run)

    summary: dict = {}
    for kind in kinds:
        summary[kind] = {}
        for c in levels:
            lvs = [lv for r in runs if r["server"] == kind for lv in r["levels"] if lv["concurrency"] == c]
            if lvs:
                summary[kind][str(c)] = summarize(lvs)
    header = (f"model {Path(gguf).name}, {args.max_tokens} new tokens/request, greedy, {args.prompt_words}-word prompts, "
              f"{args.threads} threads each, {args.reps} rep(s), {os.cpu_count()} cpus, load before "
              f"{[round(r['quiet_before']['loadavg'][0], 2) for r in runs]}")
    print(header)
    print(table(summary, kinds, levels))
    for kind in kinds:
        for c, s in summary[kind].items():
            if s["errors"] or s["short_requests"]:
                print(f"note: {kind} c={c}: {s['requests'] - s['ok']} failed {s['errors']}, "
                      f"{s['short_requests']} with != {args.max_tokens} tokens", file=sys.stderr)
    out = Path(args.out) if args.out else ROOT / "results" / f"server-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"args": vars(args), "gguf": gguf, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "versions": versions(kinds)}
    out.write_text(json.dumps({"meta": meta, "header": header, "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
