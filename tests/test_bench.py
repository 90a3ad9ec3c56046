"""`tokenloom bench`: the runners' JSON, the budget arithmetic, the table, missing engines.

One small run on a tiny random llama serves every test (its runners are subprocesses that import
torch, so each costs seconds). One thread: with two, OpenMP's spinning threads slow tiny matrix
products by 100x when another process shares the cores.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from tests.tiny import save_tiny
from tokenloom import bench, cli

SIZES = ["--threads", "1", "--prefill-tokens", "16", "--prompt-tokens", "8", "--batches", "1,2",
         "--new-tokens", "8", "--reps", "1", "--beams", "2", "--agree-tokens", "6"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(stdout, JSON results, model folder) of one bench run: tokenloom, transformers, llama.cpp missing."""
    folder = tmp_path_factory.mktemp("bench") / "tiny-llama"
    save_tiny("llama", folder)
    out = folder.parent / "speed.json"
    argv = ["bench", "-m", str(folder), "--engines", "tokenloom,transformers,llama.cpp",
            "--llama-python", str(folder.parent / "no-such-python"), "--json", str(out), *SIZES]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(argv) == 0
    return stdout.getvalue(), json.loads(out.read_text()), folder


def test_runners_report_speed_and_memory(run):
    _, data, _ = run
    for engine in ("tokenloom", "transformers"):
        r = data["results"][engine]
        assert set(r["tok_s"]) == {"prefill", "decode_b1", "decode_b2", "beam2"}
        assert all(v > 0 for v in r["tok_s"].values()), r["tok_s"]
        assert r["peak_rss"] >= r["baseline_rss"] > 50 * 2**20  # torch alone is more than 50 MB
        assert len(r["greedy"]) == len(bench.AGREEMENT_PROMPTS) and all(len(g) == 6 for g in r["greedy"])


def test_budget_is_baseline_plus_one_and_a_half_weights_plus_kv(run):
    _, data, folder = run
    r, weights = data["results"]["tokenloom"], data["weights_bytes"]
    assert weights == (folder / "model.safetensors").stat().st_size
    # KV per token: 2 layers x (K, V) x 2 kv heads x 16 head_dim x 4 bytes; the largest workload
    # holds 32 tokens (2 rows, or 2 beams, of 8 prompt + 8 new tokens)
    assert r["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert r["kv_bytes"] == 32 * r["kv_bytes_per_token"]
    assert r["budget"] == pytest.approx(r["baseline_rss"] + 1.5 * weights + r["kv_bytes"])
    # what the engine allocated: whole rows of 128 columns
    assert r["kv_allocated_bytes"] > 0 and r["kv_allocated_bytes"] % (128 * r["kv_bytes_per_token"]) == 0


def test_same_ids_give_same_greedy_tokens(run):
    # float32 tokenloom and transformers on the same ids: the ids reached both runners intact
    _, data, _ = run
    assert data["results"]["tokenloom"]["greedy"] == data["results"]["transformers"]["greedy"]


def test_table_has_every_row_and_a_not_available_column(run):
    text, _, _ = run
    header = text.splitlines()[0]
    assert header == ("| measurement | tokenloom | transformers | llama.cpp | tokenloom / transformers "
                      "| tokenloom / llama.cpp |")
    for row in ("prefill 16-token prompt (tok/s)", "decode batch 1 (tok/s)", "decode batch 2 (tok/s)",
                "beam search, 2 beams (tok/s)", "peak RSS while generating (MB)", "runtime baseline RSS (MB)",
                "budget: runtime + 1.5 x weight file + KV (MB)", "KV cache: the workload needs / the engine allocated",
                "greedy agreement with llama.cpp"):
        line = next(line for line in text.splitlines() if line.startswith(f"| {row}"))
        assert "| not available |" in line
    assert "llama.cpp: no llama.cpp python" in text


def test_agreement_counts_identical_runs_and_common_prefixes():
    a = bench.agreement([[1, 2, 3], [1, 2, 3], [9, 2, 3]], [[1, 2, 3], [1, 5, 3], [1, 2, 3]], 3)
    assert a == {"identical": 1, "prompts": 3, "mean_common_prefix": pytest.approx((3 + 1 + 0) / 3)}


def test_unknown_engine_is_one_line_error(capsys):
    assert cli.main(["bench", "--engines", "tokenloom,vllm"]) == 1
    assert "unknown engine vllm" in capsys.readouterr().err
