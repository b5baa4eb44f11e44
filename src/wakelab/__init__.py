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
    "InputsContext": ("hooks.context", "InputsContext"),
    "InitContext": ("hooks.context", "InitContext"),
    "GradContext": ("hooks.context", "GradContext"),
    "StepState": ("hooks.context", "StepState"),
    "SaveContext": ("hooks.context", "SaveContext"),
    "RunContext": ("hooks.context", "RunContext"),
    "RowAccess": ("rows", "RowAccess"),
    # Talking to the user: a line on stderr (progress from rank 0 only; warnings from any rank).
    "log": ("logs", "log"),
    "warn": ("logs", "warn"),
    # A plugin's own config section.
    "PluginConfig": ("config", "PluginConfig"),
    # Init plugins: Gaussian draws around the base rows.
    "base_moments": ("inits.gaussian", "base_moments"),
    "sampling_factor": ("inits.gaussian", "sampling_factor"),
    "gaussian_rows": ("inits.gaussian", "gaussian_rows"),
    "mean_row_norm": ("inits.gaussian", "mean_row_norm"),
    # Init plugins: a new word's base sub-tokens and the subword init's rows (their mean).
    "word_pieces": ("inits.subwords", "word_pieces"),
    "subword_rows": ("inits.subwords", "subword_rows"),
    # Init plugins: the base model reading a new token against reading the word spelled out (token distillation).
    "alias_pair": ("inits.aliasing", "alias_pair"),
    "alias_batch": ("inits.aliasing", "alias_batch"),
    "alias_distance": ("inits.aliasing", "alias_distance"),
    "layer_count": ("inits.aliasing", "layer_count"),
    # Checkpoints as the engine writes them: complete or absent, with a checksummed manifest.
    "CHECKPOINT_MANIFEST": ("storage.checkpoints", "MANIFEST"),
    "CheckpointError": ("storage.checkpoints", "CheckpointError"),
    "checkpoint_step": ("storage.checkpoints", "checkpoint_step"),
    "list_checkpoints": ("storage.checkpoints", "list_checkpoints"),
    "verify_checkpoint": ("storage.checkpoints", "verify"),
    "publish_dir": ("storage.checkpoints", "publish_dir"),
    "remove_dir": ("storage.checkpoints", "remove_dir"),
    "recover_interrupted": ("storage.checkpoints", "recover_interrupted"),
    # Fault injection: a named moment inside a crash-safe write, where the SIGKILL tests stop a process.
    "crash_point": ("storage.crashpoint", "reached"),
    # A named write: a full disk or an I/O error inside it is one line naming the file, what is intact, what next.
    "write_point": ("storage.writepoint", "write_point"),
    "WriteFailed": ("storage.writepoint", "WriteFailed"),
    "disk_error": ("storage.writepoint", "disk_errno"),
    # Recordings: the streaming writer and its reader.
    "FieldSpec": ("storage.recording", "FieldSpec"),
    "RecordingWriter": ("storage.recording", "RecordingWriter"),
    "RecordingError": ("storage.recording", "RecordingError"),
    "open_recording": ("storage.recording", "open"),
    "recording_summary": ("storage.recording", "summary"),
    # Watching new tokens: a fixed-projection trajectory, the per-token table and the meaning probe.
    "start_watch": ("analysis.trajectory.watch", "start_watch"),
    "finish_watch": ("analysis.trajectory.watch", "finish_watch"),
    "probe_setup": ("analysis.trajectory.watch", "probe_setup"),
    "meaning_probe": ("analysis.probe", "probe"),
    "trajectory_frame": ("analysis.trajectory.stills", "frame_image"),
    "trajectory_constituents": ("analysis.trajectory.watch", "constituents_for"),
    "log_trajectory_frame": ("analysis.trajectory.watch", "log_frame"),
    "log_token_table": ("analysis.trajectory.watch", "log_table"),
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
