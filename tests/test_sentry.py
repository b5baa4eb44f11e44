"""Sentry mirroring: atomic copies of the latest checkpoint that resume works from; failures never stop training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import mlflow
import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file, save_file

from wakelab.config import build_config
from wakelab.errors import ConfigError
from wakelab.run import engine
from wakelab.storage.checkpoints import list_checkpoints, verify, write_manifest


def sentry_run(tiny_model, texts, target, resume_from=None, **extra):
    values = {"train.save_steps": 2, "train.max_steps": 6, "sentry.target": str(target), "sentry.keep": 2}
    values.update(extra)
    overrides = tiny_overrides(tiny_model, texts, **values)
    overrides["plugins"] = ["sentry", *overrides.get("plugins", [])]
    return engine.run(build_config(None, None, overrides), progress=False, resume_from=resume_from)


def test_p1_flow_restore_train_checkpoint_mirror_and_resume_from_mirror(tiny_model, texts, tmp_path):
    """Phase restore, then train with checkpoints mirrored; the mirror resumes like the original."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model).get_input_embeddings().weight.detach()
    phase1 = torch.cat([base, torch.randn(8, base.shape[1], generator=torch.Generator().manual_seed(7)) * 0.1])
    torch.save(phase1, tmp_path / "embeddings.pt")
    sentry = tmp_path / "sentry"
    result = sentry_run(tiny_model, texts, sentry, **{"init.from_embeddings": str(tmp_path / "embeddings.pt")})
    mirrors = list_checkpoints(sentry / result.run_id)
    assert [m.name for m in mirrors] == ["checkpoint-4", "checkpoint-6"]  # keep = 2
    for mirror in mirrors:
        verify(mirror)
        original = result.output_dir / mirror.name
        assert load_file(mirror / "trained_rows.safetensors")["rows"].equal(
            load_file(original / "trained_rows.safetensors")["rows"]
        )
    assert mlflow.get_run(result.run_id).data.tags["wakelab.sentry.latest"].endswith("checkpoint-6")
    assert not list((sentry / result.run_id).glob(".partial-*"))
    # Losing the run's own checkpoints: resume from the mirror of step 4 and reach step 6 again, identically.
    final_rows = load_file(result.output_dir / "checkpoint-6" / "trained_rows.safetensors")["rows"]
    for checkpoint in list_checkpoints(result.output_dir):
        import shutil

        shutil.rmtree(checkpoint)
    resumed = sentry_run(
        tiny_model,
        texts,
        sentry,
        resume_from=str(mirrors[0]),
        **{"init.from_embeddings": str(tmp_path / "embeddings.pt")},
    )
    assert resumed.run_id == result.run_id
    again = load_file(result.output_dir / "checkpoint-6" / "trained_rows.safetensors")["rows"]
    assert torch.equal(again, final_rows)


def test_mirror_to_mlflow_artifacts(tiny_model, texts):
    result = sentry_run(tiny_model, texts, "mlflow", **{"train.max_steps": 4, "sentry.keep": 1})
    client = mlflow.MlflowClient()
    mirrors = sorted(a.path for a in client.list_artifacts(result.run_id, "sentry"))
    assert mirrors == ["sentry/checkpoint-4"]  # keep=1: the local artifact store deleted checkpoint-2
    files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(result.run_id, "sentry/checkpoint-4")}
    assert {"manifest.json", "trained_rows.safetensors", "optimizer.pt"} <= files


def test_failed_mirror_warns_and_retries_at_next_save(tiny_model, texts, tmp_path, capfd):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the backup disk should be")
    fixer = tmp_path / "fix_target.py"
    fixer.write_text(
        textwrap.dedent(f"""
        import os, wakelab
        @wakelab.hookimpl
        def on_step_end(state):
            if state.step == 3:
                os.remove({str(blocker)!r})
                os.makedirs({str(blocker)!r})
    """)
    )
    result = sentry_run(tiny_model, texts, blocker / "mirror", plugins=[str(fixer)])
    err = capfd.readouterr().err
    assert "wakelab: warning: sentry: mirror of checkpoint-2" in err and "FAILED" in err
    assert mlflow.get_run(result.run_id).info.status == "FINISHED"
    mirrors = list_checkpoints(blocker / "mirror" / result.run_id)
    assert [m.name for m in mirrors] == ["checkpoint-4", "checkpoint-6"]
    assert mlflow.get_run(result.run_id).data.tags["wakelab.sentry.last_error"] == ""


def test_sentry_needs_a_target_and_checkpoints(tiny_model, texts):
    overrides = tiny_overrides(tiny_model, texts, **{"train.save_steps": 2})
    overrides["plugins"] = ["sentry"]
    with pytest.raises(ConfigError, match="sentry.target"):
        build_config(None, None, overrides)
    overrides = tiny_overrides(tiny_model, texts, **{"sentry.target": "x"})
    overrides["plugins"] = ["sentry"]
    with pytest.raises(ConfigError, match="train.save_steps"):
        build_config(None, None, overrides)


MIRROR = """
import sys
from pathlib import Path
from wakelab.plugins.sentry import mirror_to_directory
mirror_to_directory(Path(sys.argv[1]), Path(sys.argv[2]), keep=2)
"""


def source_checkpoint(folder, step: int):
    folder.mkdir(parents=True)
    for i in range(3):
        save_file({"t": torch.full((64, 64), float(step * 10 + i))}, str(folder / f"part{i}.safetensors"))
    write_manifest(folder, {"step": step})
    return folder


def mirror_killed_at(source, target, point: str | None) -> int:
    """Mirror ``source`` in a fresh process that SIGKILLs itself at crash point ``point`` (None: not killed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAKELAB_CRASH_")}
    if point:
        env["WAKELAB_CRASH_AT"] = point
    return subprocess.run([sys.executable, "-c", MIRROR, str(source), str(target)], env=env, timeout=120).returncode


def mirrors_are_whole(target) -> list[str]:
    for child in target.glob("checkpoint-*"):
        verify(child)  # every checkpoint-N at the target is whole
    return [c.name for c in list_checkpoints(target)]


@pytest.mark.parametrize(
    "point, after_kill, after_next",
    [
        ("mirror-copying:2", [11, 12], [12, 14]),  # half of checkpoint-13 copied: it never appears
        ("mirror-published", [11, 12, 13], [13, 14]),  # in place, not yet pruned
        ("remove-aside", [12, 13], [13, 14]),  # checkpoint-11 renamed aside to be deleted
    ],
)
def test_kill_while_mirroring_a_new_checkpoint_and_pruning(tmp_path, point, after_kill, after_next):
    sources = {step: source_checkpoint(tmp_path / "run" / f"checkpoint-{step}", step) for step in (11, 12, 13, 14)}
    target = tmp_path / "mirror"
    for step in (11, 12):
        assert mirror_killed_at(sources[step], target, None) == 0
    assert mirror_killed_at(sources[13], target, point) == -signal.SIGKILL, f"{point} was not reached"
    assert mirrors_are_whole(target) == [f"checkpoint-{step}" for step in after_kill]
    # The next save mirrors again and cleans up what the kill left.
    assert mirror_killed_at(sources[14], target, None) == 0
    assert mirrors_are_whole(target) == [f"checkpoint-{step}" for step in after_next]
    assert not list(target.glob(".partial-*"))


def test_kill_while_replacing_a_mirror_puts_the_old_copy_back(tmp_path):
    source = source_checkpoint(tmp_path / "run" / "checkpoint-10", 10)
    target = tmp_path / "mirror"
    assert mirror_killed_at(source, target, None) == 0
    assert mirror_killed_at(source, target, "publish-aside") == -signal.SIGKILL
    assert mirrors_are_whole(target) == [] and len(list(target.glob(".partial-old-checkpoint-10-*"))) == 1
    later = source_checkpoint(tmp_path / "run" / "checkpoint-11", 11)
    assert mirror_killed_at(later, target, None) == 0
    assert mirrors_are_whole(target) == ["checkpoint-10", "checkpoint-11"], "the old copy was put back, not deleted"
    assert not list(target.glob(".partial-*"))


def test_resume_from_a_mirror_in_mlflow_artifacts(tiny_model, texts, tmp_path):
    """sentry.target=mlflow: download the mirror (as a user would), resume from it, reach the same rows."""
    result = sentry_run(tiny_model, texts, "mlflow", **{"sentry.keep": 2})
    final_rows = load_file(result.output_dir / "checkpoint-6" / "trained_rows.safetensors")["rows"]
    local = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="sentry/checkpoint-4", dst_path=str(tmp_path / "downloaded")
    )
    verify(local)
    import shutil

    for checkpoint in list_checkpoints(result.output_dir):
        shutil.rmtree(checkpoint)
    resumed = sentry_run(tiny_model, texts, "mlflow", resume_from=local, **{"sentry.keep": 2})
    assert resumed.run_id == result.run_id
    again = load_file(result.output_dir / "checkpoint-6" / "trained_rows.safetensors")["rows"]
    assert torch.equal(again.view(torch.uint8), final_rows.view(torch.uint8))
