"""wakelab: grow a language model's vocabulary and watch what the new tokens do while they learn."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@wakelab.hookimpl`` on a function named like a hook.
hookimpl = pluggy.HookimplMarker("wakelab")

__all__ = ["__version__", "hookimpl"]
