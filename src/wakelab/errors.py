"""User-facing errors.

A ``WakelabError`` is a problem the user can fix (a bad path, key or value). The CLI prints its message as one
line and exits non-zero, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class WakelabError(Exception):
    """A problem with the user's input: the message names what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(WakelabError):
    """A config key or value that cannot be used."""


class DataError(WakelabError):
    """A corpus or lexicon that cannot be used."""


class ModelError(WakelabError):
    """A base model that cannot be loaded or used as asked."""


class PluginError(WakelabError):
    """A plugin that cannot be found or is implemented wrongly."""
