"""Is the Hugging Face hub reachable? Asked once, in a few seconds, before loading a model by hub id.

Without network, ``from_pretrained("org/model")`` retries with back-off for about 30 s before it says it cannot
connect (or falls back to the local cache). One quick request first tells the two cases apart: offline, loading goes
straight to the cache (``local_files_only``), and a model not cached is a clear error at once.
"""

from __future__ import annotations

import functools
import urllib.error
import urllib.request

#: Seconds the one probe may take (name resolution included where the resolver honours it).
PROBE_TIMEOUT_S = 3.0


@functools.cache
def reachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when the hub answers (any HTTP status); False when offline, or told to be (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = endpoint or constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered, even if not with 200
    except (OSError, ValueError):  # URLError, timeouts, refused connections, a malformed HF_ENDPOINT
        return False
    return True


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT
