"""Finding checkpoints in a run directory."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConfigError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (Trainer writes ``trainer_state.json`` last)."""
    found = []
    for child in Path(output_dir).glob("checkpoint-*"):
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / "trainer_state.json").exists():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path:
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        raise ConfigError(
            f"no complete checkpoint in {output_dir}; set train.save_steps to write checkpoints, or run without --resume"
        )
    return checkpoints[-1]
