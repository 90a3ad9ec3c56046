"""Hub id resolution: the local HF cache first, then a fake Hub on a loopback server.

The fake Hub answers the few endpoints `snapshot_download` uses (repo info, tree
listing, file resolve) and the Hub's error headers, so huggingface_hub's own code fills
the cache and raises its own exceptions; nothing here reaches the real Hub.
"""

import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from huggingface_hub import constants, scan_cache_dir

from tokenloom.errors import ModelNotFoundError
from tokenloom.loading import hub
from tokenloom.loading.hub import resolve_hub_id
from tokenloom.loading.resolve import ModelSource, resolve_model

COMMIT = "1" * 40
CHECKPOINT = {
    "config.json": b'{"model_type": "llama"}',
    "tokenizer.json": b"{}",
    "model.safetensors": b"\0" * 64,
    "README.md": b"# not downloaded",
    "pytorch_model.bin": b"not downloaded either",
}


class FakeHub:
    """Repos: id -> files; `gated` ids answer 403 GatedRepo; unknown ids 401 RepoNotFound."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: tuple[str, ...] = ()):
        self.repos, self.gated, self.requests = repos, gated, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def route(self, path: str) -> tuple[int, dict, bytes]:
        for repo, files in self.repos.items():
            if path.startswith((f"/api/models/{repo}/", f"/{repo}/resolve/")):
                break
        else:
            gated = next((r for r in self.gated if f"/{r}/" in path), None)
            code = "GatedRepo" if gated else "RepoNotFound"
            return (403 if gated else 401), {"X-Error-Code": code}, b"{}"
        if path.startswith(f"/api/models/{repo}/revision/"):
            revision = path.rsplit("/", 1)[-1]
            if revision not in ("main", COMMIT):
                return 404, {"X-Error-Code": "RevisionNotFound"}, b"{}"
            info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
            return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
        if path.startswith(f"/api/models/{repo}/tree/"):
            tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items()]
            return 200, {"Content-Type": "application/json"}, json.dumps(tree).encode()
        name = path.split(f"/resolve/{COMMIT}/", 1)[-1]
        if name not in files:
            return 404, {"X-Error-Code": "EntryNotFound"}, b"{}"
        body = files[name]
        return 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}, body

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(send_body=False)

            def do_GET(self):
                self.answer(send_body=True)

            def answer(self, send_body: bool):
                path = unquote(urlsplit(self.path).path)
                fake.requests.append(f"{self.command} {path}")
                status, headers, body = fake.route(path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

        return Handler

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def hf_cache(monkeypatch, tmp_path) -> Path:
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # in case it was set at import
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return cache


@pytest.fixture
def fake_hub(monkeypatch, hf_cache):
    fake = FakeHub({
        "org/llama-tiny": CHECKPOINT,
        "org/one-gguf": {"README.md": b"hi", "model-Q4_K_M.gguf": b"GGUF one"},
        "org/many-gguf": {"a-Q4_0.gguf": b"GGUF a", "a-Q8_0.gguf": b"GGUF b"},
        "org/bin-only": {"config.json": b"{}", "pytorch_model.bin": b"x"},
    }, gated=("org/gated",))
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    yield fake
    fake.close()


def go_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())  # belt and braces


# --- downloading, then offline from the cache that huggingface_hub wrote ---------------


def test_download_then_offline(fake_hub, hf_cache, monkeypatch):
    folder = resolve_hub_id("org/llama-tiny", progress=False)
    assert folder == hf_cache / "models--org--llama-tiny" / "snapshots" / COMMIT
    # Only the files tokenloom reads: no README, no .bin duplicate of the weights.
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (folder / "model.safetensors").read_bytes() == CHECKPOINT["model.safetensors"]

    go_offline(monkeypatch)
    n_requests = len(fake_hub.requests)
    assert resolve_hub_id("org/llama-tiny", progress=False) == folder
    assert resolve_hub_id("org/llama-tiny", revision=COMMIT) == folder
    assert len(fake_hub.requests) == n_requests


def test_cached_model_is_used_without_asking_the_hub(fake_hub, monkeypatch):
    folder = resolve_hub_id("org/llama-tiny", progress=False)
    n_requests = len(fake_hub.requests)
    assert resolve_hub_id("org/llama-tiny") == folder  # online, but the cache answers
    assert len(fake_hub.requests) == n_requests


def test_progress_flag(fake_hub, capfd):
    resolve_hub_id("org/llama-tiny", progress=False)
    assert "Fetching" not in capfd.readouterr().err


def test_gguf_only_repo(fake_hub):
    folder = resolve_hub_id("org/one-gguf", progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["model-Q4_K_M.gguf"]
    assert resolve_model("org/one-gguf", progress=False) == ModelSource(
        "gguf", folder / "model-Q4_K_M.gguf", "org/one-gguf")


def test_repo_without_usable_weights(fake_hub):
    with pytest.raises(ModelNotFoundError, match=r"2 GGUF files \(a-Q4_0.gguf, a-Q8_0.gguf\)"):
        resolve_hub_id("org/many-gguf", progress=False)
    with pytest.raises(ModelNotFoundError, match="neither safetensors nor GGUF"):
        resolve_hub_id("org/bin-only", progress=False)


def test_resolve_model_with_hub_id(fake_hub, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so "org/llama-tiny" is not an existing relative path
    source = resolve_model(f"org/llama-tiny@{COMMIT}", progress=False)
    assert source.kind == "folder"
    assert source.name == f"org/llama-tiny@{COMMIT}"
    assert (source.path / "config.json").is_file()


# --- a cache laid out by hand, the way huggingface_hub stores it -----------------------


def build_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...]):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir()
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def test_hand_built_cache_offline(hf_cache, monkeypatch):
    commit = "c" * 40
    files = {"config.json": b"{}", "model.safetensors": b"weights"}
    snapshot = build_cache(hf_cache, "acme/cached", commit, files, refs=("main", "v1"))
    # huggingface_hub itself agrees that this is a valid cache.
    (repo,) = scan_cache_dir(hf_cache).repos
    assert (repo.repo_id, [r.commit_hash for r in repo.revisions]) == ("acme/cached", [commit])

    go_offline(monkeypatch)
    for revision in (None, "v1", commit):
        assert resolve_hub_id("acme/cached", revision=revision) == snapshot
    assert (snapshot / "model.safetensors").read_bytes() == b"weights"
    with pytest.raises(ModelNotFoundError, match="acme/cached@v2 is not in the Hugging Face cache"):
        resolve_hub_id("acme/cached", revision="v2")


# --- failures: clear and fast ------------------------------------------------------------


def test_uncached_offline(hf_cache, monkeypatch):
    go_offline(monkeypatch)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_hub_id("acme/absent")
    assert time.monotonic() - start < 2
    assert str(err.value) == (f"model acme/absent is not in the Hugging Face cache ({hf_cache}) "
                              "and HF_HUB_OFFLINE is set, so the Hub was not asked")


def test_hub_unreachable(hf_cache, monkeypatch):
    endpoint = closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_hub_id("acme/absent", progress=False)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert f"model acme/absent is not in the Hugging Face cache ({hf_cache})" in message
    assert f"the Hub ({endpoint}) could not be reached: ConnectError" in message
    assert "\n" not in message


@pytest.mark.parametrize("repo_id, revision, expected", [
    ("org/nothing-here", None, "has no repository 'org/nothing-here'"),
    ("org/gated", None, "org/gated is a gated repository: accept its terms"),
    ("org/llama-tiny", "v9", "org/llama-tiny on the Hub has no revision 'v9'"),
])
def test_hub_errors_are_told_apart(fake_hub, hf_cache, repo_id, revision, expected):
    with pytest.raises(ModelNotFoundError, match=expected) as err:
        resolve_hub_id(repo_id, revision=revision, progress=False)
    assert str(hf_cache) in str(err.value)


def test_invalid_repo_id(hf_cache):
    with pytest.raises(ModelNotFoundError, match="not a valid Hugging Face repo id"):
        resolve_hub_id("org/bad--name")


def test_hf_offline_env_values(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for value, offline in [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.hf_offline() is offline
