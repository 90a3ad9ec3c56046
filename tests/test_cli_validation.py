"""Invalid generation parameters are refused from Python and from the CLI, naming the field.

Python: `tokenloom.errors.InvalidParameterError` whose message holds the field, the value and the
allowed range. CLI: a non-zero exit with one stderr line `tokenloom: error: ...` naming the field,
no traceback, nothing on stdout. The CLI runs are started together (4 at a time) by one fixture.
"""

import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import tokenloom
from tests.tiny import save_tiny
from tokenloom.errors import InvalidParameterError

# id -> (Python kwargs, CLI flags, field, value as the message shows it, a piece of the allowed range)
CASES = {
    "negative_temperature": (dict(temperature=-0.5), ["--temperature", "-0.5"], "temperature", "-0.5", ">= 0"),
    "top_p_zero": (dict(top_p=0.0), ["--top-p", "0"], "top_p", "0.0", "(0, 1]"),
    "min_p_above_one": (dict(min_p=1.5), ["--min-p", "1.5"], "min_p", "1.5", "[0, 1]"),
    "nan_temperature": (dict(temperature=math.nan), ["--temperature", "nan"], "temperature", "nan", ">= 0"),
    "nan_top_p": (dict(top_p=math.nan), ["--top-p", "nan"], "top_p", "nan", "(0, 1]"),
    "more_sequences_than_beams": (dict(num_beams=2, num_return_sequences=3), ["--num-beams", "2", "-n", "3"],
                                  "num_return_sequences", "3", "num_beams"),
}
UNKNOWN_FLAG = ["--foo", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_validation") / "llama"
    save_tiny("llama", path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return tokenloom.load(str(folder))


def cli(model_path, flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tokenloom", "generate", "-m", str(model_path), "hi", *flags],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def runs(folder):
    """id -> CompletedProcess: every case on the tiny model, the unknown flag, and a case whose model
    does not exist (the parameters are checked before the model is loaded)."""
    jobs = {name: (folder, case[1]) for name, case in CASES.items()}
    jobs["unknown_flag"] = (folder, UNKNOWN_FLAG)
    jobs["before_loading"] = (folder.parent / "no-such-model", CASES["min_p_above_one"][1])
    jobs["valid"] = (folder, ["--max-new-tokens", "2", "--temperature", "0"])
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(cli, *job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def assert_one_error_line(proc, *names):
    assert proc.returncode != 0, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tokenloom: error:"), lines[0]
    assert "Traceback" not in proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.mark.parametrize("name", CASES)
def test_python_refuses(model, name):
    kwargs, _, field, value, allowed = CASES[name]
    with pytest.raises(InvalidParameterError) as info:
        model.generate("hi", max_new_tokens=2, **kwargs)
    message = str(info.value)
    assert info.value.field == field
    assert f"'{field}'" in message and value in message and allowed in message, message
    assert info.value.allowed and info.value.allowed in message


@pytest.mark.parametrize("name", CASES)
def test_cli_refuses(runs, name):
    _, _, field, value, allowed = CASES[name]
    assert_one_error_line(runs[name], f"'{field}'", value, allowed)
    assert runs[name].returncode == 1  # a parameter error, not a usage error


def test_python_refuses_an_unknown_parameter(model):
    with pytest.raises(InvalidParameterError) as info:
        model.generate("hi", max_new_tokens=2, foo=1)
    assert info.value.field == "foo"
    assert "'foo'" in str(info.value)


def test_cli_refuses_an_unknown_flag_as_a_usage_error(runs):
    assert_one_error_line(runs["unknown_flag"], "--foo")
    assert runs["unknown_flag"].returncode == 2


def test_cli_checks_parameters_before_loading_the_model(runs):
    assert_one_error_line(runs["before_loading"], "'min_p'", "1.5")


def test_cli_accepts_valid_parameters(runs):
    """The harness itself works: the same command line with valid values generates."""
    proc = runs["valid"]
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr
