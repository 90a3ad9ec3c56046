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
        # warming the kernels on dummy tensors holds more (threads, GEMM buffers), never less
        assert r["baseline_rss"] >= r["import_rss"] > 50 * 2**20
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
    # what the engine allocated: whole rows of 16 columns (engine/slots.py: CPU_BLOCK)
    assert r["kv_allocated_bytes"] > 0 and r["kv_allocated_bytes"] % (16 * r["kv_bytes_per_token"]) == 0


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
                "RSS after import alone (MB)",
                "budget: runtime + 1.5 x weight file + KV (MB)", "KV cache: the workload needs / the engine allocated",
                "greedy agreement with llama.cpp", "llama.cpp picks the same next token", "the floor: the same engine"):
        line = next(line for line in text.splitlines() if line.startswith(f"| {row}"))
        assert "| not available |" in line
    assert "llama.cpp: no llama.cpp python" in text


def test_the_floor_row_nudges_tokenloom_against_itself(run):
    text, data, folder = run
    u = data["results"]["tokenloom"]["nudged"]
    assert u["prompts"] == len(bench.AGREEMENT_PROMPTS) and u["positions"] == u["prompts"] * 6
    assert 0 <= u["identical"] <= u["prompts"] and 0 <= u["same"] <= u["positions"]
    row = next(line for line in text.splitlines() if line.startswith("| the floor"))
    assert f"| {u['identical']}/{u['prompts']} texts, {u['same']}/{u['positions']} (" in row
    assert "nudged" not in data["results"]["transformers"]


def test_a_nudge_moves_the_inputs_and_leaves_them_as_they_were_after(tmp_path):
    import torch

    import tokenloom
    save_tiny("llama", tmp_path)
    net = tokenloom.load(tmp_path).network
    ids = torch.tensor([[3, 4, 5]])
    plain = net.embed_tokens(ids)
    with bench.Nudged(net, 1e-3, seed=1):
        nudged = net.embed_tokens(ids)
    assert not torch.equal(nudged, plain) and torch.allclose(nudged, plain, rtol=1e-2)
    assert torch.equal(net.embed_tokens(ids), plain) and "forward" not in vars(net.embed_tokens)
    prompts = [[3, 4], [5, 6, 7]]
    same = bench.nudged_agreement(net, prompts, 5, eps=0.0)  # no nudge: the floor is the ceiling
    assert same == {"eps": 0.0, "identical": 2, "prompts": 2, "same": 10, "positions": 10}
    assert bench.greedy_run(net, [3, 4], 5) == tokenloom.load(tmp_path).generate_ids(
        [[3, 4]], tokenloom.GenerationConfig(max_new_tokens=5, ignore_eos=True))[0].token_ids


def test_agreement_counts_identical_runs_and_common_prefixes():
    a = bench.agreement([[1, 2, 3], [1, 2, 3], [9, 2, 3]], [[1, 2, 3], [1, 5, 3], [1, 2, 3]], 3)
    assert a == {"identical": 1, "prompts": 3, "mean_common_prefix": pytest.approx((3 + 1 + 0) / 3)}


def test_llama_cpps_step_by_step_check_and_its_own_floor_get_rows():
    spec = {"prefill": [1] * 16, "batches": {1: [[1] * 4]}, "beams": 1, "new_tokens": 4, "beam_prompt": [1] * 4,
            "agree_prompts": [[1], [2]], "agree_tokens": 3, "reps": 1, "threads": 1, "path": "m.gguf"}
    mine = {"tok_s": {"prefill": 9.0, "decode_b1": 2.0}, "peak_rss": 300, "baseline_rss": 100,
            "kv_bytes_per_token": 10, "kv_allocated_bytes": 20, "greedy": [[5, 6, 7], [8, 9, 9]]}
    llama = {"tok_s": {"prefill": 3.0, "decode_b1": 1.0}, "peak_rss": 50, "baseline_rss": 10,
             "greedy": [[5, 6, 7], [8, 1, 1]], "forced": {"tokenloom": {"same": 5, "positions": 6}},
             "nudged": {"eps": 1e-7, "exact": True, "identical": 1, "prompts": 2, "same": 4, "positions": 6}}
    results = {"tokenloom": mine, "llama.cpp": llama}
    bench.summarize(results, spec, 1000)
    assert mine["agreement"]["identical"] == 1 and mine["forced_agreement"] == {"same": 5, "positions": 6}
    args = type("Args", (), {"model": "m"})()
    row = next(line for line in bench.table(results, spec, args, 1000).splitlines()
               if line.startswith("| llama.cpp picks the same next token"))
    assert "| 5/6 (83.3%) |" in row
    # llama.cpp's own floor fills its column of the floor row; a floor whose un-nudged run did not
    # reproduce llama.cpp's text is flagged
    floor = next(line for line in bench.table(results, spec, args, 1000).splitlines() if line.startswith("| the floor"))
    assert floor.split(" | ")[1:3] == ["—", "1/2 texts, 4/6 (66.7%) next tokens"]
    llama["nudged"]["exact"] = False
    floor = next(line for line in bench.table(results, spec, args, 1000).splitlines() if line.startswith("| the floor"))
    assert "did not give its own text" in floor.split(" | ")[2]


def test_unknown_engine_is_one_line_error(capsys):
    assert cli.main(["bench", "--engines", "tokenloom,vllm"]) == 1
    assert "unknown engine vllm" in capsys.readouterr().err


def test_several_quantize_settings_get_a_column_and_ratios_each():
    def result(prefill, rss):
        return {"tok_s": {"prefill": prefill, "decode_b1": 2.0}, "peak_rss": rss, "baseline_rss": 100,
                "kv_bytes_per_token": 10, "kv_allocated_bytes": 20}
    results = {"tokenloom int4": result(30.0, 300), "tokenloom w8a8": result(60.0, 400),
               "transformers": result(20.0, 500), "llama.cpp": {"error": "not available"}}
    spec = {"prefill": [1] * 16, "batches": {1: [[1] * 4]}, "beams": 1, "new_tokens": 4, "beam_prompt": [1] * 4,
            "agree_prompts": [[1]], "agree_tokens": 2, "reps": 1, "threads": 1, "path": "m.gguf"}
    bench.summarize(results, spec, weights=1000)
    text = bench.table(results, spec, type("Args", (), {"model": "m"}), weights=1000)
    assert text.splitlines()[0] == (
        "| measurement | tokenloom int4 | tokenloom w8a8 | transformers | llama.cpp | tokenloom int4 / transformers "
        "| tokenloom int4 / llama.cpp | tokenloom w8a8 / transformers | tokenloom w8a8 / llama.cpp |")
    prefill = next(line for line in text.splitlines() if line.startswith("| prefill"))
    assert prefill == "| prefill 16-token prompt (tok/s) | 30.0 | 60.0 | 20.0 | not available | 1.50x | — | 3.00x | — |"
    assert "tokenloom w8a8 budget" in text and "tokenloom int4 budget" in text


def test_a_bad_quantize_setting_is_named(capsys):
    assert cli.main(["bench", "--tokenloom-quantize", "int4,int3"]) == 1
    assert "--tokenloom-quantize: invalid int3" in capsys.readouterr().err
