"""Built-in ``sentry`` plugin: mirror the latest complete checkpoint to a backup location after each save.

The P1 notebook kept a hand-made copy of its latest checkpoint on another disk ("Sentry"). This does it after every
save, atomically: copy under a temporary name, verify every checksum of the copy against the checkpoint's manifest,
then one rename. The target never holds a partial checkpoint, and ``wakelab resume --checkpoint MIRROR`` accepts a
mirror. A failed mirror (target missing or not a folder, say) warns loudly and is tried again at the next save; it
never stops or corrupts training. A full, read-only or failing disk at the target stops the run in one line naming
the file (wakelab.write_point): the checkpoint itself is complete, and ``wakelab resume`` continues from it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pydantic import Field

import wakelab
from wakelab import (
    CHECKPOINT_MANIFEST,
    checkpoint_step,
    crash_point,
    list_checkpoints,
    publish_dir,
    recover_interrupted,
    remove_dir,
    verify_checkpoint,
)


class SentryConfig(wakelab.PluginConfig):
    """The `sentry` plugin: after each checkpoint, mirror the latest complete one to a backup location."""

    target: str | None = Field(
        None, description="A directory (local or mounted), or `mlflow` for the run's artifact store (under sentry/)."
    )
    keep: int = Field(2, ge=1, description="Mirrors kept at the target; older ones are deleted.")


class Plugin:
    """The sentry plugin, one instance per run's plugin manager: it holds where that run's checkpoints are mirrored."""

    def __init__(self) -> None:
        self.settings: dict = {}  # target, keep, run_id and set_tags of the run in progress

    @wakelab.hookimpl
    def config_section(self):
        return "sentry", SentryConfig

    @wakelab.hookimpl
    def check_config(self, config):
        if not config.sentry.target:
            raise wakelab.ConfigError(
                "sentry.target: the sentry plugin needs a backup location (a directory, or `mlflow`)"
            )
        if not config.train.save_steps:
            raise wakelab.ConfigError(
                "train.save_steps: the sentry plugin mirrors checkpoints, so set train.save_steps > 0"
            )

    @wakelab.hookimpl
    def on_run_start(self, run):
        self.settings.clear()
        self.settings.update(
            target=run.config.sentry.target, keep=run.config.sentry.keep, run_id=run.run_id, set_tags=run.set_tags
        )

    @wakelab.hookimpl
    def on_save(self, ctx):
        target = self.settings.get("target")
        if not target:
            return
        root = Path(target) / (ctx.run_id or "run") if target != "mlflow" else None
        try:
            # A full disk or an I/O error is one line and stops the run (wakelab.storage.writepoint): the checkpoint
            # itself is complete, and a mirror that can never be written again would otherwise fail quietly at every
            # save.
            with wakelab.write_point(
                "sentry-mirror",
                root or target,
                what=f"the Sentry mirror of {ctx.checkpoint_dir.name}",
                intact=lambda: f"{ctx.checkpoint_dir} is complete and the mirrors before it are intact",
                then=f"wakelab resume {ctx.checkpoint_dir.parent}",
            ):
                if root is None:
                    where = mirror_to_mlflow(ctx.checkpoint_dir, ctx.run_id, self.settings["keep"])
                else:
                    where = mirror_to_directory(ctx.checkpoint_dir, root, self.settings["keep"])
        except wakelab.WriteFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure of a backup must not stop training
            message = (
                f"sentry: mirror of {ctx.checkpoint_dir.name} to {target} FAILED ({type(exc).__name__}: {exc}); "
                "training goes on, the next checkpoint will be tried again"
            )
            wakelab.warn(message)
            _tag(self.settings.get("set_tags"), {"wakelab.sentry.last_error": message[:5000]})
            return
        _tag(self.settings.get("set_tags"), {"wakelab.sentry.latest": str(where), "wakelab.sentry.last_error": ""})


def _tag(set_tags, tags: dict) -> None:
    if set_tags is not None:
        try:
            set_tags(tags)
        except Exception:  # noqa: BLE001
            pass


def mirror_to_directory(checkpoint: Path, destination_root: Path, keep: int) -> Path:
    """Copy ``checkpoint`` into ``destination_root`` as one atomic step; keep the newest ``keep`` mirrors."""
    verify_checkpoint(checkpoint)
    destination_root.mkdir(parents=True, exist_ok=True)
    recover_interrupted(destination_root)  # a replace or a prune that was killed: put back or finish
    for stale in destination_root.glob(".partial-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a copy that was killed
    partial = Path(tempfile.mkdtemp(prefix=f".partial-{checkpoint.name}-", dir=destination_root))
    try:
        files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != CHECKPOINT_MANIFEST)
        for path in [*files, checkpoint / CHECKPOINT_MANIFEST]:  # the manifest last: a copy is complete when it has one
            target = partial / path.relative_to(checkpoint)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            with open(target, "rb") as handle:
                os.fsync(handle.fileno())
            crash_point("mirror-copying")
        verify_checkpoint(partial)
        final = publish_dir(partial, destination_root / checkpoint.name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    crash_point("mirror-published")
    for old in list_checkpoints(destination_root)[:-keep]:
        remove_dir(old)
    return final


def mirror_to_mlflow(checkpoint: Path, run_id: str | None, keep: int) -> str:
    """Log the checkpoint under ``sentry/checkpoint-N`` of the run, manifest last; prune old mirrors where possible."""
    from mlflow import MlflowClient

    verify_checkpoint(checkpoint)
    client = MlflowClient()
    base = f"sentry/{checkpoint.name}"
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != CHECKPOINT_MANIFEST)
    for path in files:
        parent = path.relative_to(checkpoint).parent.as_posix()
        client.log_artifact(run_id, str(path), base if parent == "." else f"{base}/{parent}")
    client.log_artifact(run_id, str(checkpoint / CHECKPOINT_MANIFEST), base)
    mirrors = sorted(
        (a.path for a in client.list_artifacts(run_id, "sentry") if a.is_dir),
        key=lambda p: checkpoint_step(Path(p)) or -1,
    )
    for old in mirrors[:-keep]:
        try:
            from mlflow.artifacts import get_artifact_repository

            get_artifact_repository(client.get_run(run_id).info.artifact_uri).delete_artifacts(old)
        except Exception:  # noqa: BLE001 - not every artifact store can delete; then all mirrors stay
            break
    return f"runs:/{run_id}/{base}"
