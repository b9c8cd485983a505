"""The project cache: tiny random models and the converted Gemma 3 270M, built once per machine
(GEMMA_QUANT_CACHE, default ~/.cache/gemma-quant)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMA_QUANT_CACHE", Path.home() / ".cache" / "gemma-quant"))
