"""Hugging Face Hub ids (`org/name`, optionally a revision) -> a local snapshot folder.

The local Hugging Face cache is asked first, without touching the network, so a model
that was downloaded once keeps working offline (and `HF_HUB_OFFLINE=1` is honoured). Only
on a miss is the Hub asked, via `huggingface_hub.snapshot_download`, for just the files
tokenloom reads: config, tokenizer and safetensors weights. A repository without
safetensors but with exactly one GGUF file gets that file instead.

Every failure becomes a one-line ModelNotFoundError that tells apart a missing repo, a
gated one, a missing revision, and a Hub that could not be reached.

Environment variables are read on every call (huggingface_hub reads its own once, at
import): HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm as hf_tqdm
from huggingface_hub.utils import validate_repo_id

from tokenloom.errors import ModelNotFoundError

# Everything a safetensors checkpoint needs, and nothing else (no .bin / .onnx / .gguf
# duplicates of the same weights). The tokenizer files beyond tokenizer.json are small
# and serve tokenizers without one (SentencePiece, Marian's *.spm, GPT-2 style BPE).
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "*.spm",
    "vocab.json",
    "merges.txt",
    "*.safetensors",
    "model.safetensors.index.json",
]


class _QuietBar(hf_tqdm):
    """huggingface_hub's progress bar, switched off (for progress=False)."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def hf_cache_dir() -> Path:
    env = os.environ.get("HF_HUB_CACHE")
    return Path(env).expanduser() if env else Path(constants.HF_HUB_CACHE)


def hf_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_hub_id(repo_id: str, revision: str | None = None, progress: bool = True) -> Path:
    """The local snapshot folder of Hub model `repo_id` at `revision` (default: main).

    Uses the local HF cache when it already holds the snapshot; otherwise downloads it,
    unless offline. Raises ModelNotFoundError when neither works.
    """
    shown = f"{repo_id}@{revision}" if revision else repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ModelNotFoundError(f"{shown!r} is not a valid Hugging Face repo id: {e}") from e
    cache = hf_cache_dir()
    kwargs = dict(revision=revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS,
                  tqdm_class=None if progress else _QuietBar)

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        if _has_weights(folder):
            return folder
    except LocalEntryNotFoundError:
        pass  # not cached, or an incomplete snapshot: ask the Hub

    not_cached = f"model {shown} is not in the Hugging Face cache ({cache})"
    if hf_offline():
        raise ModelNotFoundError(f"{not_cached} and HF_HUB_OFFLINE is set, so the Hub was not asked")
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        folder = Path(snapshot_download(repo_id, endpoint=endpoint, **kwargs))
        if not _has_weights(folder):
            folder = _download_single_gguf(repo_id, folder, endpoint, kwargs)
        return folder
    except GatedRepoError as e:  # before RepositoryNotFoundError, its base class
        raise ModelNotFoundError(
            f"{not_cached} and {repo_id} is a gated repository: accept its terms at "
            f"https://huggingface.co/{repo_id} and log in (`hf auth login` or HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{not_cached} and the Hub ({endpoint}) has no repository {repo_id!r} "
            "(or it is private and no valid token was given)") from e
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(
            f"{not_cached} and {repo_id} on the Hub has no revision {revision!r}") from e
    except DisabledRepoError as e:
        raise ModelNotFoundError(f"{not_cached} and {repo_id} is disabled on the Hub") from e
    except LocalEntryNotFoundError as e:
        # snapshot_download's way of saying the connection failed and nothing is cached.
        raise ModelNotFoundError(
            f"{not_cached} and the Hub ({endpoint}) could not be reached: {_cause(e)}") from e
    except HfHubHTTPError as e:
        raise ModelNotFoundError(f"{not_cached} and the Hub ({endpoint}) answered: {_one_line(e)}") from e
    except Exception as e:
        if not _is_transport_error(e):
            raise
        raise ModelNotFoundError(
            f"{not_cached} and the Hub ({endpoint}) could not be reached: {_cause(e)}") from e


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf"))


def _download_single_gguf(repo_id: str, folder: Path, endpoint: str, kwargs: dict) -> Path:
    """For repos that publish only GGUF files: fetch the one there is, refuse to guess among many."""
    commit = folder.name  # snapshots/<commit hash>
    files = HfApi(endpoint=endpoint).list_repo_files(repo_id, revision=commit)
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if len(ggufs) == 1:
        kwargs = {**kwargs, "revision": commit, "allow_patterns": ggufs}
        return Path(snapshot_download(repo_id, endpoint=endpoint, **kwargs))
    if ggufs:
        raise ModelNotFoundError(
            f"{repo_id} has no safetensors weights but {len(ggufs)} GGUF files "
            f"({', '.join(ggufs)}); download the one you want (`hf download {repo_id} FILE`) "
            "and pass its path")
    raise ModelNotFoundError(
        f"{repo_id} has neither safetensors nor GGUF weights (tokenloom does not load "
        ".bin/.pt checkpoints)")


def _is_transport_error(e: Exception) -> bool:
    # huggingface_hub lets some connection errors of its HTTP client escape (proxy errors,
    # for one); the client is requests or httpx depending on its version, so match by module.
    return type(e).__module__.split(".")[0] in {"httpx", "httpx2", "requests", "urllib3"}


def _cause(e: BaseException) -> str:
    inner = e.__cause__ or e
    return f"{type(inner).__name__}: {_one_line(inner)}"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
