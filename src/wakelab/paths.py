"""Where wakelab keeps what it builds once and reuses: converted models, tokenizers, token caches, demo texts.

Its own module so the modules that fill the cache (model, demo, bpe, data) share one answer without importing one
another.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$WAKELAB_CACHE``, else ``~/.cache/wakelab``."""
    return Path(os.environ.get("WAKELAB_CACHE", Path.home() / ".cache" / "wakelab"))
