"""Checkpoints that are complete or absent, verified before anyone resumes from them.

Trainer writes a checkpoint into a staging folder; wakelab adds the resolved config and a manifest of every file's
SHA-256 (written last), then renames the folder into place. A crash at any moment leaves either the previous
checkpoints or the new one, never a half-written ``checkpoint-N``. Resuming, and mirroring (the ``sentry`` plugin),
verify the manifest first, so flipped bytes are caught before they reach training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import WakelabError
from . import crashpoint
from .durable import fsync_dir

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
STAGING = ".staging"
REPLACED = ".partial-old-"  # publish_dir: the folder being replaced, until its successor is in place
DELETING = ".partial-del-"  # remove_dir: the folder being deleted


class CheckpointError(WakelabError):
    """A checkpoint that is missing, incomplete, corrupted or from another model."""


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def write_manifest(folder: Path, info: dict[str, Any]) -> None:
    """Checksum every file under ``folder`` and write the manifest last (tmp + fsync + rename)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[path.relative_to(folder).as_posix()] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    manifest = {"format": "wakelab-checkpoint", "version": 1, **info, "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    crashpoint.reached("manifest-tmp")
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete (no {MANIFEST}); resume from another checkpoint")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is corrupted; resume from another checkpoint") from None


def verify(folder: Path) -> dict[str, Any]:
    """The manifest, after checking every file's size and SHA-256 against it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint not found: {folder}")
    manifest = read_manifest(folder)
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}; resume from another checkpoint")
        if path.stat().st_size != expected["bytes"] or sha256(path) != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint {folder} is corrupted: {name} does not match its checksum; resume from another "
                "checkpoint (--checkpoint PATH) or a Sentry mirror"
            )
    return manifest


def publish_dir(ready: Path, destination: Path) -> Path:
    """Put a complete folder at ``destination`` by renames only: a kill at any moment leaves it whole or absent.

    An existing ``destination`` is first renamed aside (never deleted in place, which a kill could interrupt
    half-way), the new folder renamed in, and only then the old one deleted. A kill between the two renames leaves
    the old folder aside and none at ``destination``: ``recover_interrupted`` puts it back.
    """
    aside = None
    if destination.exists():
        aside = destination.with_name(f"{REPLACED}{destination.name}-{os.getpid()}")
        os.replace(destination, aside)
        crashpoint.reached("publish-aside")
    os.replace(ready, destination)
    fsync_dir(destination.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return destination


def remove_dir(path: Path) -> None:
    """Delete a checkpoint folder so that a kill at any moment leaves it whole or gone: rename aside, then delete."""
    aside = path.with_name(f"{DELETING}{path.name}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    crashpoint.reached("remove-aside")
    shutil.rmtree(aside, ignore_errors=True)


def recover_interrupted(folder: Path) -> list[Path]:
    """Finish what a killed ``publish_dir`` or ``remove_dir`` left in ``folder``; returns the folders put back.

    A replaced folder whose name is free again (the kill came between ``publish_dir``'s renames) is the only copy
    left: it is renamed back, never deleted. A replaced folder whose successor is in place, and a folder that was
    being deleted, are deleted. Leftovers of a process that is still running are its own business and stay.
    """
    restored = []
    for prefix in (REPLACED, DELETING):
        for leftover in sorted(Path(folder).glob(f"{prefix}*")):
            name, _, pid = leftover.name[len(prefix) :].rpartition("-")
            if not name or (pid.isdigit() and _other_process_alive(int(pid))):
                continue
            original = leftover.with_name(name)
            if prefix == REPLACED and not original.exists():
                os.replace(leftover, original)
                fsync_dir(original.parent)
                restored.append(original)
            else:
                shutil.rmtree(leftover, ignore_errors=True)
    return restored


def _other_process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finalize(staged: Path, destination: Path, info: dict[str, Any]) -> Path:
    """Manifest the staged checkpoint and move it into place."""
    write_manifest(staged, info)
    crashpoint.reached("staged")
    published = publish_dir(staged, destination)
    crashpoint.reached("published")
    return published


def intact_after_failure(output_dir: Path) -> str:
    """What a checkpoint write that failed half-way leaves whole: said in the one line of
    ``wakelab.storage.writepoint``."""
    complete = list_checkpoints(output_dir)
    last = (
        f"the last complete checkpoint {complete[-1]} (step {checkpoint_step(complete[-1])}) is intact"
        if complete
        else "no checkpoint had been completed yet"
    )
    return f"{last}; nothing half-written was published (the partial one stays in {STAGING}/ until resume clears it)"


def intact_at_end(output_dir: Path) -> str:
    """What a failed write at the end of a run (``final/``, the logged model) leaves whole."""
    complete = list_checkpoints(output_dir)
    if not complete:
        return "no checkpoint was written (train.save_steps is 0), so the training must run again"
    return (
        f"every checkpoint is intact, the last {complete[-1]} (step {checkpoint_step(complete[-1])}); "
        "nothing half-written was published"
    )


def to_continue(output_dir: Path) -> str:
    """The command that finishes a run whose end failed: resume from its last checkpoint, or run it again."""
    if list_checkpoints(output_dir):
        return f"wakelab resume {output_dir}"
    return f"wakelab run ... --overwrite --output-dir {output_dir}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first."""
    found = []
    for child in Path(output_dir).glob("checkpoint-*"):
        step = checkpoint_step(child)
        if step is not None and child.is_dir() and (child / MANIFEST).exists():
            found.append((step, child))
    return [path for _, path in sorted(found)]


def rotate(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep``; incomplete leftovers of a crash go too."""
    removed = []
    recover_interrupted(Path(output_dir))
    for child in Path(output_dir).glob("checkpoint-*"):
        if child.is_dir() and not (child / MANIFEST).exists():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    if keep:
        for path in list_checkpoints(output_dir)[:-keep]:
            remove_dir(path)
            removed.append(path)
    return removed


def latest_checkpoint(output_dir: Path) -> Path:
    recover_interrupted(Path(output_dir))
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        raise CheckpointError(
            f"no complete checkpoint in {output_dir}; set train.save_steps to write checkpoints, or run without resume"
        )
    return checkpoints[-1]


def check_compatible(
    manifest: dict[str, Any],
    folder: Path,
    *,
    base_model: str,
    num_base: int,
    vocab_size: int,
    hidden_size: int,
    strategy: str,
) -> None:
    """A checkpoint from another base model or vocabulary is refused, naming the mismatch."""
    checks = [
        ("base vocabulary", manifest.get("num_base"), num_base),
        ("vocabulary size", manifest.get("vocab_size"), vocab_size),
        ("hidden size", manifest.get("hidden_size"), hidden_size),
        ("trainable strategy", manifest.get("strategy"), strategy),
    ]
    for what, theirs, ours in checks:
        if theirs is not None and theirs != ours:
            raise CheckpointError(
                f"checkpoint {folder} does not fit this run: its {what} is {theirs}, this run's is {ours} "
                f"(it was trained from {manifest.get('base_model', '?')}; this run loads {base_model})"
            )
