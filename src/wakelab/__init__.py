"""wakelab: grow a language model's vocabulary and watch what the new tokens do while they learn.

This module is the public API a plugin may use, and all of it: the hook marker, the context types the hooks
receive, the config base class for a plugin's own section, the user-facing errors, and a few storage helpers the
built-in plugins need. Anything else under ``wakelab.`` is internal and may change. Names other than ``hookimpl``
and the errors are imported on first use, so ``import wakelab`` stays cheap (no torch, no MLflow).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

import pluggy

from .errors import ConfigError, DataError, ModelError, PluginError, WakelabError

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@wakelab.hookimpl`` on a function named like a hook.
hookimpl = pluggy.HookimplMarker("wakelab")

#: Public name -> (internal module, attribute), resolved on first access.
_LAZY: dict[str, tuple[str, str]] = {
    # What the hooks receive (documented field by field on each dataclass).
    "InitContext": ("context", "InitContext"),
    "GradContext": ("context", "GradContext"),
    "StepState": ("context", "StepState"),
    "SaveContext": ("context", "SaveContext"),
    "RunContext": ("context", "RunContext"),
    "RowAccess": ("rows", "RowAccess"),
    # Talking to the user: a line on stderr (progress from rank 0 only; warnings from any rank).
    "log": ("logs", "log"),
    "warn": ("logs", "warn"),
    # A plugin's own config section.
    "PluginConfig": ("config", "PluginConfig"),
    # Init plugins: Gaussian draws around the base rows.
    "base_moments": ("gaussian", "base_moments"),
    "sampling_factor": ("gaussian", "sampling_factor"),
    "gaussian_rows": ("gaussian", "gaussian_rows"),
    "mean_row_norm": ("gaussian", "mean_row_norm"),
    # Init plugins: a new word's base sub-tokens and the subword init's rows (their mean).
    "word_pieces": ("subwords", "word_pieces"),
    "subword_rows": ("subwords", "subword_rows"),
    # Init plugins: the base model reading a new token against reading the word spelled out (token distillation).
    "alias_pair": ("aliasing", "alias_pair"),
    "alias_batch": ("aliasing", "alias_batch"),
    "alias_distance": ("aliasing", "alias_distance"),
    "layer_count": ("aliasing", "layer_count"),
    # Checkpoints as the engine writes them: complete or absent, with a checksummed manifest.
    "CHECKPOINT_MANIFEST": ("checkpoints", "MANIFEST"),
    "CheckpointError": ("checkpoints", "CheckpointError"),
    "checkpoint_step": ("checkpoints", "checkpoint_step"),
    "list_checkpoints": ("checkpoints", "list_checkpoints"),
    "verify_checkpoint": ("checkpoints", "verify"),
    "publish_dir": ("checkpoints", "publish_dir"),
    "remove_dir": ("checkpoints", "remove_dir"),
    "recover_interrupted": ("checkpoints", "recover_interrupted"),
    # Fault injection: a named moment inside a crash-safe write, where the SIGKILL tests stop a process.
    "crash_point": ("crashpoint", "reached"),
    # A named write: a full disk or an I/O error inside it is one line naming the file, what is intact, what next.
    "write_point": ("writepoint", "write_point"),
    "WriteFailed": ("writepoint", "WriteFailed"),
    "disk_error": ("writepoint", "disk_errno"),
    # Recordings: the streaming writer and its reader.
    "FieldSpec": ("recording", "FieldSpec"),
    "RecordingWriter": ("recording", "RecordingWriter"),
    "RecordingError": ("recording", "RecordingError"),
    "open_recording": ("recording", "open"),
    "recording_summary": ("recording", "summary"),
    # Watching new tokens: a fixed-projection trajectory, the per-token table and the meaning probe.
    "start_watch": ("analysis.watch", "start_watch"),
    "finish_watch": ("analysis.watch", "finish_watch"),
    "probe_setup": ("analysis.watch", "probe_setup"),
    "meaning_probe": ("analysis.probe", "probe"),
    "trajectory_frame": ("analysis.trajectory_frames", "frame_image"),
    "trajectory_constituents": ("analysis.watch", "constituents_for"),
    "log_trajectory_frame": ("analysis.watch", "log_frame"),
    "log_token_table": ("analysis.watch", "log_table"),
    # New rows against base rows: a chunked running top-k by cosine, never a new x base matrix.
    "top_k_cosine": ("analysis.embeddings", "top_k_cosine"),
    "nearest_neighbours": ("analysis.embeddings", "nearest_neighbours"),
}

__all__ = [
    "__version__",
    "hookimpl",
    "WakelabError",
    "ConfigError",
    "DataError",
    "ModelError",
    "PluginError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wakelab' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
