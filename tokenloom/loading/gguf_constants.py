"""The GGUF format's constants (tensor types and their block sizes), from the `gguf` package.

Only its `constants.py` is loaded: `import gguf` also loads its writer, vocabulary and metadata
helpers, which import sentencepiece and yaml: 3.7 MB of resident memory measured here, against
0.1 MB for the constants, and reading a file needs none of it. Where the package's layout is not
the expected one, the plain import is used.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _constants():
    if "gguf.constants" in sys.modules:  # already imported whole (tests, tools): share it
        return sys.modules["gguf.constants"]
    spec = importlib.util.find_spec("gguf")  # locates the package without running its __init__
    path = Path(spec.origin).with_name("constants.py") if spec and spec.origin else None
    if path is None or not path.is_file():
        from gguf import constants
        return constants
    own = importlib.util.spec_from_file_location("tokenloom._gguf_constants", path)
    module = importlib.util.module_from_spec(own)
    sys.modules[own.name] = module  # as an import would: classes defined there can find their module
    own.loader.exec_module(module)
    return module


_c = _constants()
GGML_QUANT_SIZES = _c.GGML_QUANT_SIZES
GGMLQuantizationType = _c.GGMLQuantizationType
