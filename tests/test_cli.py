"""The `tokenloom` command, run as a real subprocess (`python -m tokenloom ...`).

Every process imports torch (a few seconds), so the generate runs on tiny checkpoint folders
are started together, a few at a time, by one module fixture; each test then checks the run
it is about. The default model (SmolLM2, from the local model cache) is only used by the
slow tests. The flag parsing and the terminal printer are also checked in-process.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.tiny import save_tiny
from tokenloom.cli import build_parser, generation_json, generation_params, read_prompt, stream_to_terminal
from tokenloom.config import GenerationConfig
from tokenloom.errors import PromptError
from tokenloom.outputs import Generation, StreamDelta, TokenLogprob

REPO = Path(__file__).resolve().parent.parent
# TOKENLOOM_HOME is kept (the cached models); stdout is block-buffered, as it is for users' pipes
ENV = {k: v for k, v in os.environ.items() if k not in ("TOKENLOOM_DEBUG", "PYTHONUNBUFFERED")}
ENV["PYTHONIOENCODING"] = "utf-8"
ENV.setdefault("OMP_NUM_THREADS", "1")  # several runs at once: threads would only fight over the cores
PROMPT = "Once upon a time"
WORKERS = max(2, min(4, os.cpu_count() or 2))


def cli(*args, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the command; stdout and stderr decoded as they are (no newline translation: "\r" stays)."""
    proc = subprocess.run([sys.executable, "-m", "tokenloom", *map(str, args)], input=(stdin or "").encode(),
                          capture_output=True, env=ENV, cwd=REPO, timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def lines(text: str) -> list[str]:
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def json_lines(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in lines(proc.stdout)]


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str, code: int | None = None) -> None:
    """Non-zero exit, exactly one non-empty stderr line "tokenloom: error: ...", no traceback."""
    assert proc.returncode != 0, proc
    if code is not None:
        assert proc.returncode == code, proc
    assert "Traceback" not in proc.stderr
    err = lines(proc.stderr)
    assert len(err) == 1 and err[0].strip(), proc.stderr
    assert err[0].startswith("tokenloom: error: "), proc.stderr
    for w in words:
        assert w.lower() in err[0].lower(), f"{w!r} not in {err[0]!r}"
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------- the runs


def tiny_gguf_bytes(tmp: Path) -> bytes:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp / "whole.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_tensor("token_embd.weight", np.ones((32, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return (tmp / "whole.gguf").read_bytes()


def make_files(root: Path) -> dict[str, Path]:
    """The tiny model folder and the broken models made from it."""
    llama = root / "llama"
    save_tiny("llama", llama)
    files = {"llama": llama}

    def variant(name: str) -> Path:
        files[name] = shutil.copytree(llama, root / name)
        return files[name]

    (root / "notes.txt").write_text("not a model")
    files["text_file"] = root / "notes.txt"
    (root / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    files["gguf_garbage"] = root / "garbage.gguf"
    whole = tiny_gguf_bytes(root)
    (root / "cut.gguf").write_bytes(whole[:len(whole) - 1000])
    files["gguf_truncated"] = root / "cut.gguf"
    st = variant("safetensors_bad_header") / "model.safetensors"
    st.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{\"this is\": not json at all!!!}" + st.read_bytes()[40:])
    st = variant("safetensors_truncated") / "model.safetensors"
    st.write_bytes(st.read_bytes()[:5000])
    cfg_path = variant("unknown_arch") / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_type": "foo"}))
    pickled = variant("pickled")
    from safetensors.torch import load_file
    import torch

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    return files


TOKENS = ["--max-new-tokens", "12", "--ignore-eos"]
SAMPLED = ["--max-new-tokens", "8", "-n", "3", "--seed", "1", "--temperature", "1.0"]


def stop_string(text: str) -> str:
    """Two characters from the middle of `text`, none a replacement character."""
    starts = [i for i in range(1, len(text) - 1) if "\ufffd" not in text[i:i + 2] and "\x00" not in text[i:i + 2]]
    assert starts, text
    i = starts[len(starts) // 2]
    return text[i:i + 2]


def closed_stdout(*args) -> subprocess.CompletedProcess:
    """Run with stdout closed by the reader at once, as `... | head -c0` does."""
    p = subprocess.Popen([sys.executable, "-m", "tokenloom", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV, cwd=REPO)
    p.stdout.close()
    _, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, "", err.decode())


def cases(f: dict[str, Path], stop: str) -> dict[str, dict]:
    """name -> cli() arguments, for every run the tests below look at."""
    m = ["generate", "-m", f["llama"]]
    return {
        "stream": dict(args=[*m, *TOKENS, PROMPT]),
        "json": dict(args=[*m, *TOKENS, "--json", PROMPT]),
        "json_n3": dict(args=[*m, *SAMPLED, "--json", PROMPT]),
        "stop_stdin": dict(args=[*m, *TOKENS, "--json", "--stop=not in the text", f"--stop={stop}"],
                           stdin=PROMPT + "\n"),
        "pickle_bfloat16": dict(args=["generate", "-m", f["pickled"], *TOKENS, "--json", "--allow-pickle",
                                      "--dtype", "bfloat16", PROMPT]),
        "closed_stdout": dict(args=["models"], run=closed_stdout),
        "int4": dict(args=[*m, *TOKENS, "--json", "--quantize", "int4", PROMPT]),
        "w8a8": dict(args=[*m, *TOKENS, "--json", "--quantize", "w8a8", PROMPT]),
        "int4_bfloat16": dict(args=[*m, "--quantize", "int4", "--dtype", "bfloat16", PROMPT]),
        "bad_quantize": dict(args=[*m, "--quantize", "int3", PROMPT]),
        # bad input
        "missing_model": dict(args=["generate", "-m", f["llama"].parent / "no-such-model", PROMPT]),
        "missing_name": dict(args=["generate", "-m", "no-such-model", PROMPT]),
        "text_file": dict(args=["generate", "-m", f["text_file"], PROMPT]),
        "gguf_garbage": dict(args=["generate", "-m", f["gguf_garbage"], PROMPT]),
        "gguf_truncated": dict(args=["generate", "-m", f["gguf_truncated"], PROMPT]),
        "safetensors_bad_header": dict(args=["generate", "-m", f["safetensors_bad_header"], PROMPT]),
        "safetensors_truncated": dict(args=["generate", "-m", f["safetensors_truncated"], PROMPT]),
        "unknown_arch": dict(args=["generate", "-m", f["unknown_arch"], PROMPT]),
        "pickle_refused": dict(args=["generate", "-m", f["pickled"], PROMPT]),
        "long_prompt": dict(args=[*m, "~" * 200]),
        "empty_prompt": dict(args=[*m, ""]),
        "empty_stdin": dict(args=[*m], stdin=""),
        "newline_stdin": dict(args=[*m], stdin="\n"),
        "negative_max_new_tokens": dict(args=[*m, "--max-new-tokens", "-1", PROMPT]),
        "top_p_zero": dict(args=[*m, "--top-p", "0", PROMPT]),
        "top_p_above_one": dict(args=[*m, "--top-p", "1.5", PROMPT]),
        "min_above_max": dict(args=[*m, "--max-new-tokens", "3", "--min-new-tokens", "4", PROMPT]),
        "empty_stop": dict(args=[*m, "--stop", "", PROMPT]),
        "unknown_parameter": dict(args=[*m, "--frobnicate", "3", PROMPT]),
        "not_an_int": dict(args=[*m, "--max-new-tokens", "many", PROMPT]),
        "bad_dtype": dict(args=[*m, "--dtype", "float8", PROMPT]),
        "no_command": dict(args=[]),
        "pull_unknown": dict(args=["pull", "no-such-model"]),
        "models": dict(args=["models"]),
        "help": dict(args=["generate", "--help"]),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_files(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def model(files):
    """The same tiny model in this process: what the command prints must match the Python API."""
    import tokenloom

    return tokenloom.load(files["llama"])


@pytest.fixture(scope="module")
def expected(model) -> dict:
    free = model.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    stop = stop_string(free.text)
    return {"json": free, "json_n3": model.generate(PROMPT, max_new_tokens=8, n=3, seed=1, temperature=1.0),
            "stop": model.generate(PROMPT, max_new_tokens=12, ignore_eos=True, stop=[stop]), "stop_string": stop}


@pytest.fixture(scope="module")
def runs(files, expected) -> dict[str, subprocess.CompletedProcess]:
    todo = cases(files, expected["stop_string"])
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(c.get("run", cli), *c["args"], **({"stdin": c["stdin"]} if "stdin" in c else {}))
                   for name, c in todo.items()}
        return {name: f.result() for name, f in futures.items()}


def as_json(g) -> dict:
    return {"index": g.index, "text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason}


# ---------------------------------------------------------------------------------- generate


def test_json_prints_the_generation(runs, expected, model):
    (g,) = json_lines(runs["json"])
    assert {"text", "token_ids", "finish_reason"} <= set(g)
    assert {k: g[k] for k in as_json(expected["json"])} == as_json(expected["json"])
    assert len(g["token_ids"]) == 12 and g["finish_reason"] == "length"  # generated ids only
    assert g["prompt_tokens"] == len(model.tokenizer.encode(PROMPT))
    assert runs["json"].stderr == ""


def test_streamed_text_is_the_generated_text(runs, expected):
    proc = runs["stream"]
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == expected["json"].text + "\n"


def test_three_sampled_sequences_give_three_json_lines(runs, expected):
    gs = json_lines(runs["json_n3"])
    assert len(gs) == 3
    assert [{k: g[k] for k in ("index", "text", "token_ids", "finish_reason")} for g in gs] == \
        [as_json(g) for g in expected["json_n3"]]
    assert len({tuple(g["token_ids"]) for g in gs}) > 1


def test_repeated_stop_flags_and_prompt_from_standard_input(runs, expected):
    """Both --stop values count; the one in the text ends it and is left out. The prompt comes
    from standard input, without the newline `echo` adds: the same tokens as the argument gives."""
    (s,) = json_lines(runs["stop_stdin"])
    free, stop = expected["json"], expected["stop_string"]
    assert s["text"] == free.text[:free.text.find(stop)] == expected["stop"].text
    assert s["finish_reason"] == "stop"
    assert s["token_ids"] == free.token_ids[:len(s["token_ids"])] and len(s["token_ids"]) < 12


def test_allow_pickle_and_dtype(runs):
    (g,) = json_lines(runs["pickle_bfloat16"])
    assert len(g["token_ids"]) == 12 and g["finish_reason"] == "length"


@pytest.mark.parametrize("mode", ["int4", "w8a8"])
def test_quantize_runs_packed_weights_as_the_python_api_does(runs, files, mode):
    import tokenloom

    packed = tokenloom.load(files["llama"], quantize=mode)
    assert packed.quantization == mode
    ref = packed.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    (g,) = json_lines(runs[mode])
    assert g["token_ids"] == ref.token_ids and g["text"] == ref.text


def test_closed_stdout_ends_quietly(runs):
    """`tokenloom models | head -c0`: no traceback, no 'Exception ignored' noise. (generate's
    output goes through the same handler.)"""
    proc = runs["closed_stdout"]
    assert proc.stderr == "" and proc.returncode == 0


# ---------------------------------------------------------------------------------- bad input

BAD = {
    "missing_model": ("no-such-model", "not found"),
    "missing_name": ("no-such-model", "not found"),
    "text_file": ("notes.txt", "not a model"),
    "gguf_garbage": ("garbage.gguf",),
    "gguf_truncated": ("cut.gguf", "truncated"),
    "safetensors_bad_header": ("model.safetensors", "JSON"),
    "safetensors_truncated": ("model.safetensors", "truncated"),
    "unknown_arch": ("'foo'",),
    "pickle_refused": ("pytorch_model.bin", "--allow-pickle"),
    "long_prompt": ("200 tokens", "context window", "128"),
    "empty_prompt": ("empty",),
    "empty_stdin": ("empty",),
    "newline_stdin": ("empty",),
    "negative_max_new_tokens": ("max_new_tokens", "-1"),
    "top_p_zero": ("top_p", "0", "(0, 1]"),
    "top_p_above_one": ("top_p", "1.5"),
    "min_above_max": ("min_new_tokens", "4"),
    "empty_stop": ("stop",),
    "pull_unknown": ("no-such-model",),
    "int4_bfloat16": ("quantize", "int4", "float32", "bfloat16"),
}
USAGE = {  # the command line itself is wrong: argparse's checks, status 2
    "unknown_parameter": ("--frobnicate",),
    "not_an_int": ("--max-new-tokens", "many"),
    "bad_dtype": ("--dtype", "float8"),
    "bad_quantize": ("--quantize", "int3"),
    "no_command": ("COMMAND",),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line(runs, case):
    assert_one_line_error(runs[case], *BAD[case], code=1)


@pytest.mark.parametrize("case", list(USAGE))
def test_bad_command_line_is_one_error_line(runs, case):
    assert_one_line_error(runs[case], *USAGE[case], code=2)


# ---------------------------------------------------------------------------------- help, models


def test_help_documents_every_generation_flag(runs):
    proc = runs["help"]
    assert proc.returncode == 0 and proc.stderr == ""
    for name in GenerationConfig.field_names():
        assert f"--{name.replace('_', '-')}" in proc.stdout, name
    for flag in ("-m", "--model", "--dtype", "--json", "-n", "--allow-pickle", "--device", "PROMPT"):
        assert flag in proc.stdout.replace("prompt", "PROMPT"), flag
    for _, _, allowed, doc in GenerationConfig.describe():  # each flag with its description
        assert " ".join(doc.split()[:3]) in " ".join(proc.stdout.split()), doc


def test_models_lists_the_registry(runs):
    proc = runs["models"]
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-135m-instruct" in proc.stdout and "gemma3-270m" in proc.stdout
    assert "default" in proc.stdout


# ---------------------------------------------------------------------------------- in-process


def parse(*argv: str) -> dict:
    return generation_params(build_parser().parse_args(["generate", *argv, "prompt"]))


def test_flags_become_generation_parameters():
    params = parse("--stop", "a", "--stop", "b", "--temperature", "1", "--top-p", "0.9", "-n", "2",
                   "--no-ignore-eos", "--stop-token-ids", "5", "--stop-token-ids", "7")
    assert params == {"stop": ["a", "b"], "temperature": 1, "top_p": 0.9, "num_return_sequences": 2,
                      "ignore_eos": False, "stop_token_ids": [5, 7]}
    config = GenerationConfig.from_dict(params)
    assert config.temperature == 1.0 and config.stop == ["a", "b"]
    assert parse() == {}  # nothing given: the model's defaults apply


def test_every_flag_round_trips_its_default():
    """Each field's default, written as flags, parses back to the same config: every type the
    schema uses can be given on the command line."""
    hints = typing.get_type_hints(GenerationConfig)
    argv = []
    for name, default, _, _ in GenerationConfig.describe():
        flag = "--" + name.replace("_", "-")
        if default is None or default == [] or default == {}:
            continue
        if hints[name] is bool:  # --x / --no-x
            argv.append(flag if default else "--no-" + flag[2:])
        elif isinstance(default, bool):  # a bool or a word: the flag takes a value
            argv += [flag, str(default).lower()]
        elif isinstance(default, dict):
            argv += [x for k, v in default.items() for x in (flag, f"{k}={v}")]
        elif isinstance(default, list):
            argv += [x for v in default for x in (flag, ",".join(map(str, v)) if isinstance(v, list) else str(v))]
        else:
            argv += [flag, str(default)]
    params = parse(*argv)
    assert GenerationConfig.from_dict(params) == GenerationConfig()


def test_flags_of_structured_fields():
    names = set(GenerationConfig.field_names())
    if "logit_bias" in names:
        assert parse("--logit-bias", "5=-1.5", "--logit-bias", "7=2")["logit_bias"] == {5: -1.5, 7: 2}
    if "bad_words_ids" in names:
        assert parse("--bad-words-ids", "5,6", "--bad-words-ids", "7")["bad_words_ids"] == [[5, 6], [7]]
    if "early_stopping" in names:
        assert parse("--early-stopping", "never")["early_stopping"] == "never"
        assert parse("--early-stopping", "true")["early_stopping"] is True


class Stdin(io.StringIO):
    def __init__(self, text: str, tty: bool = False):
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("prompt,stdin,expected", [
    ("hello", None, "hello"),
    ("hello\n", None, "hello\n"),  # an argument is taken as it is
    (None, "hello\n", "hello"),  # only the newline echo adds is removed
    (None, "hello\r\n", "hello"),
    (None, "hello\n\n", "hello\n"),
    ("-", "two\nlines\n", "two\nlines"),
])
def test_read_prompt(monkeypatch, prompt, stdin, expected):
    monkeypatch.setattr(sys, "stdin", Stdin(stdin or ""))
    assert read_prompt(build_parser().parse_args(["generate"] + ([prompt] if prompt is not None else []))) == expected


@pytest.mark.parametrize("prompt,stdin,message", [
    (None, Stdin("", tty=True), "no prompt"),
    (None, Stdin(""), "empty"),
    (None, Stdin("\n"), "empty"),
    ("", Stdin("ignored"), "empty"),
])
def test_read_prompt_refuses_no_prompt(monkeypatch, prompt, stdin, message):
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(PromptError, match=message):
        read_prompt(build_parser().parse_args(["generate"] + ([prompt] if prompt is not None else [])))


def test_json_line_carries_every_field_of_the_generation():
    g = Generation("hi\u2028there\r\x85\u2029\n", [5, 6], "stop", index=2, prompt_index=1, prompt_tokens=3)
    if "logprobs" in Generation.__dataclass_fields__:
        g.logprobs = [TokenLogprob(5, -0.5, [(5, -0.5), (7, -1.5)])]
    line = generation_json(g)
    assert len(line.splitlines()) == 1  # no character any reader takes for a line end
    record = json.loads(line)
    assert list(record)[:4] == ["index", "text", "token_ids", "finish_reason"]
    assert record["text"] == g.text and record["token_ids"] == [5, 6] and record["prompt_index"] == 1
    if g.logprobs:
        assert record["logprobs"][0]["top"] == [[5, -0.5], [7, -1.5]]


def test_stream_to_terminal_prints_sequences_in_order():
    deltas = [StreamDelta("a", [1], 0), StreamDelta("x", [1], 1), StreamDelta("b", [1], 0),
              StreamDelta("p", [1], 2, finish_reason="stop"), StreamDelta("y", [1], 1),
              StreamDelta("c", [1], 0, finish_reason="length"), StreamDelta("z", [1], 1, finish_reason="length")]
    out = io.StringIO()
    stream_to_terminal(iter(deltas), out)
    assert out.getvalue() == "abc\n\n--- sequence 2 ---\nxyz\n\n--- sequence 3 ---\np\n"


# ---------------------------------------------------------------------------------- default model (slow)


@pytest.mark.slow
def test_default_model_streams_to_the_terminal(smollm2_gguf_path):
    """Text arrives in pieces while it is generated, and equals the --json text of the same
    model given as a file."""
    length = ["--max-new-tokens", "24", "--min-new-tokens", "24"]
    p = subprocess.Popen([sys.executable, "-m", "tokenloom", "generate", *length, PROMPT],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO)
    chunks = []
    while chunk := os.read(p.stdout.fileno(), 4096):
        chunks.append((time.monotonic(), chunk))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert len(chunks) >= 3 and chunks[-1][0] - chunks[0][0] > 0.1, "the text came all at once"
    streamed = b"".join(c for _, c in chunks).decode()
    (g,) = json_lines(cli("generate", "-m", smollm2_gguf_path, *length, "--json", PROMPT))
    assert streamed == g["text"] + "\n"
    assert len(g["token_ids"]) == 24 and g["finish_reason"] == "length"
    assert sum(w.isalpha() for w in g["text"].split()) >= 5, g["text"]


@pytest.mark.slow
def test_default_model_sampled_json(smollm2_gguf_path):
    gs = json_lines(cli("generate", "-n", "3", "--seed", "1", "--temperature", "1.0", "--max-new-tokens", "12",
                        "--json", PROMPT))
    assert len(gs) == 3 and [g["index"] for g in gs] == [0, 1, 2]
    assert len({g["text"] for g in gs}) == 3
    assert all(len(g["token_ids"]) == 12 or g["finish_reason"] == "stop" for g in gs)


@pytest.mark.slow
def test_truncated_real_gguf_is_one_error_line(smollm2_gguf_path, tmp_path):
    with open(smollm2_gguf_path, "rb") as f:
        (tmp_path / "head.gguf").write_bytes(f.read(1000))
    assert_one_line_error(cli("generate", "-m", tmp_path / "head.gguf", PROMPT), "head.gguf", code=1)
