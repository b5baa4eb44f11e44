"""Checkpoints that always reload: complete or absent, exact continuation, same MLflow run, phase restore."""

from __future__ import annotations

import mlflow
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_HIDDEN, raising_plugin, tiny_overrides
from optional import require
from safetensors.torch import load_file, save_file

from wakelab.cli.main import main
from wakelab.config import build_config
from wakelab.errors import ConfigError
from wakelab.run import engine
from wakelab.storage.checkpoints import CheckpointError, list_checkpoints, verify


def run(tiny_model, texts, resume_from=None, **extra):
    values = {"train.save_steps": 2, "train.logging_steps": 1, "train.max_steps": 8, "train.weight_decay": 0.1}
    values.update(extra)
    config = build_config(None, None, tiny_overrides(tiny_model, texts, **values))
    return engine.run(config, progress=False, resume_from=resume_from)


def losses(run_id):
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    return {m.step: m.value for m in history}


def optimizer_state(checkpoint):
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    return {k: {n: t for n, t in v.items()} for k, v in state.items()}


def test_checkpoint_holds_what_a_restart_needs(tiny_model, texts, tmp_path):
    result = run(tiny_model, texts, **{"train.max_steps": 4, "train.save_total_limit": 1})
    checkpoints = list_checkpoints(result.output_dir)
    assert [c.name for c in checkpoints] == ["checkpoint-4"]  # save_total_limit kept the latest only
    files = {p.name for p in checkpoints[0].iterdir()}
    assert {
        "trained_rows.safetensors",
        "tokenizer.json",
        "wakelab_config.yaml",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "manifest.json",
    } <= files
    manifest = verify(checkpoints[0])
    assert manifest["step"] == 4 and manifest["run_id"] == result.run_id
    assert set(manifest["files"]) == files - {"manifest.json"}
    rows = load_file(checkpoints[0] / "trained_rows.safetensors")
    assert rows["token_ids"].tolist() == list(range(367, 375))
    assert not list((result.output_dir / ".staging").glob("checkpoint-*"))


def assert_same_tensors(a, b, where: str) -> None:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(a, b) -> None:
    """Rows (or every weight under `full`), Adam state, scheduler and step: what a continuation depends on."""
    weights = sorted(p.name for p in a.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in b.glob("*.safetensors"))
    for name in weights:
        assert_same_tensors(load_file(a / name), load_file(b / name), name)
    assert_same_tensors(
        torch.load(a / "optimizer.pt", weights_only=True),
        torch.load(b / "optimizer.pt", weights_only=True),
        "optimizer",
    )
    assert_same_tensors(
        torch.load(a / "scheduler.pt", weights_only=True),
        torch.load(b / "scheduler.pt", weights_only=True),
        "scheduler",
    )


# P1 (p1_evolved): 4-bit base, `mask`, weight decay, several micro-batches per step, cosine schedule.
# Wordybird: `full`, every weight in bf16, constant rate, no clipping.
RESUME_CASES = {
    "fp32": {},
    "4bit": {"model.load_in_4bit": True},
    "p1-mask-4bit-accum": {
        "model.load_in_4bit": True,
        "train.trainable": "mask",
        "train.grad_accum": 3,
        "train.batch_size": 1,
        "train.scheduler": "cosine",
        "train.warmup_steps": 2,
    },
    "wordybird-full-bf16": {
        "train.trainable": "full",
        "model.dtype": "bfloat16",
        "train.scheduler": "constant",
        "train.warmup_steps": 0,
        "train.max_grad_norm": 0.0,
        "train.lr": 1e-3,
    },
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_continues_exactly(tiny_model, texts, tmp_path, case):
    extra = RESUME_CASES[case]
    if extra.get("model.load_in_4bit"):
        require("bitsandbytes")
    straight = run(tiny_model, texts, **extra, output_dir="straight")
    straight_losses = losses(straight.run_id)
    assert sorted(straight_losses) == list(range(1, 9))

    # The same 8-step run, stopped after its step-4 checkpoint, then resumed from it.
    with pytest.raises(RuntimeError, match="power cut"):
        run(tiny_model, texts, **extra, output_dir="split", plugins=[str(raising_plugin(tmp_path, step=5))])
    resumed = run(tiny_model, texts, **extra, output_dir="split", resume_from="split/checkpoint-4")
    assert_same_checkpoint(straight.output_dir / "checkpoint-8", resumed.output_dir / "checkpoint-8")
    a = load_file(straight.output_dir / "final" / "new_rows.safetensors")["rows"]
    b = load_file(resumed.output_dir / "final" / "new_rows.safetensors")["rows"]
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), "trained rows differ after resume"
    assert losses(resumed.run_id) == straight_losses
    if case == "wordybird-full-bf16":
        assert a.dtype == torch.bfloat16


def test_wordybird3_flow_carries_adam_state_on(tiny_model, texts):
    """Load a step-4 state and run 4 more steps: Adam's step count and exp_avg carry on, not restart."""
    first = run(tiny_model, texts, **{"train.max_steps": 4, "train.scheduler": "constant", "train.warmup_steps": 0})
    before = optimizer_state(first.output_dir / "checkpoint-4")
    result = CliRunner().invoke(main, ["resume", str(first.output_dir), "--max-steps", "8", "--no-progress"])
    assert result.exit_code == 0, result.output
    after = optimizer_state(first.output_dir / "checkpoint-8")
    (key,) = after
    assert int(after[key]["step"]) == 8
    assert int(before[key]["step"]) == 4
    # exp_avg carried on: a restart from zero would give (1 - 0.9**4) scale moments; the carried-on state has
    # history from all 8 steps, so it differs from a fresh optimizer run for 4 steps from the same rows.
    assert not torch.equal(after[key]["exp_avg"], before[key]["exp_avg"])
    assert f"run {first.run_id} FINISHED" in result.stdout  # the same MLflow run
    run_info = mlflow.get_run(first.run_id)
    assert run_info.info.status == "FINISHED"
    assert max(losses(first.run_id)) == 8


def test_resume_after_crash_reopens_the_same_run(tiny_model, texts, tmp_path):
    with pytest.raises(RuntimeError, match="power cut"):
        run(tiny_model, texts, plugins=[str(raising_plugin(tmp_path, step=5))])
    (crashed,) = mlflow.search_runs(search_all_experiments=True)["run_id"]
    assert mlflow.get_run(crashed).info.status == "FAILED"
    # The user drops the plugin that crashed, and resumes.
    result = CliRunner().invoke(main, ["resume", "out", "--no-progress", "--set", "plugins=[]"])
    assert result.exit_code == 0, result.output
    assert "checkpoint-4" in result.stderr
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["run_id"]) == [crashed] and list(runs["status"]) == ["FINISHED"]
    steps = sorted(losses(crashed))
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def test_corrupted_checkpoint_is_caught(tiny_model, texts):
    first = run(tiny_model, texts, **{"train.max_steps": 2})
    target = first.output_dir / "checkpoint-2" / "trained_rows.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted: trained_rows.safetensors does not match its checksum"):
        run(tiny_model, texts, resume_from=str(first.output_dir / "checkpoint-2"))
    result = CliRunner().invoke(main, ["resume", str(first.output_dir)])
    assert result.exit_code == 2 and "corrupted" in result.stderr and "Traceback" not in result.output


def test_checkpoint_from_another_vocabulary_is_refused(tiny_model, texts, tmp_path):
    first = run(tiny_model, texts, **{"train.max_steps": 2})
    lexicon = tmp_path / "fewer.txt"
    lexicon.write_text("riverrun\nsmirtle\n")
    with pytest.raises(CheckpointError, match="its vocabulary size is 375, this run's is 369"):
        run(tiny_model, texts, resume_from=str(first.output_dir / "checkpoint-2"), **{"vocab.lexicon": str(lexicon)})


def test_incomplete_checkpoint_is_not_listed_or_resumed(tiny_model, texts):
    first = run(tiny_model, texts, **{"train.max_steps": 2})
    half = first.output_dir / "checkpoint-3"
    half.mkdir()
    (half / "optimizer.pt").write_bytes(b"partial")
    assert [c.name for c in list_checkpoints(first.output_dir)] == ["checkpoint-2"]
    with pytest.raises(CheckpointError, match="incomplete"):
        verify(half)


# -- phase restore (P1's step-700 reload) ----------------------------------------------------------------------------


def _saved_matrix(tiny_model, texts, tmp_path):
    first = run(tiny_model, texts, **{"train.max_steps": 2, "train.save_steps": 0, "output_dir": "phase1"})
    rows = load_file(first.output_dir / "final" / "new_rows.safetensors")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model).get_input_embeddings().weight.detach()
    return first, torch.cat([base, rows["rows"]])


def test_phase_restore_from_safetensors_and_pt(tiny_model, texts, tmp_path):
    first, matrix = _saved_matrix(tiny_model, texts, tmp_path)
    save_file({"embeddings": matrix}, str(tmp_path / "emb.safetensors"), metadata={"run_id": first.run_id})
    torch.save(matrix, tmp_path / "embeddings.pt")
    for path in (tmp_path / "emb.safetensors", tmp_path / "embeddings.pt"):
        plugin = tmp_path / "seen.py"
        plugin.write_text(
            "import wakelab\nSEEN = []\n@wakelab.hookimpl\ndef on_run_start(run):\n"
            "    SEEN.append(run.rows.values(run.rows.new_ids).clone())\n"
        )
        result = run(
            tiny_model,
            texts,
            output_dir=f"phase2-{path.suffix[1:]}",
            plugins=[str(plugin)],
            **{"init.from_embeddings": str(path), "train.max_steps": 2},
        )
        from conftest import loaded_plugin

        assert torch.equal(loaded_plugin(plugin).SEEN[-1], matrix[367:])
        recorded = mlflow.get_run(result.run_id)
        assert recorded.data.params["init.restored_from"] == str(path)
        assert recorded.data.tags["wakelab.restored_from"] == str(path)
        if path.suffix == ".safetensors":
            assert recorded.data.tags["wakelab.source_run"] == first.run_id


def test_phase_restore_refuses_wrong_shape_and_pickles(tiny_model, texts, tmp_path):
    save_file({"embeddings": torch.zeros(10, TINY_HIDDEN)}, str(tmp_path / "small.safetensors"))
    with pytest.raises(ConfigError, match=r"matrix shape \(10, 64\) does not fit the expanded vocabulary \(375, 64\)"):
        run(tiny_model, texts, **{"init.from_embeddings": str(tmp_path / "small.safetensors")})

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"embeddings": torch.zeros(375, TINY_HIDDEN), "extra": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="never unpickles arbitrary objects"):
        run(tiny_model, texts, **{"init.from_embeddings": str(tmp_path / "evil.pt")})
    with pytest.raises(ConfigError, match="file not found"):
        run(tiny_model, texts, **{"init.from_embeddings": str(tmp_path / "none.pt")})
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_load_trained_gives_back_the_final_rows(tiny_model, texts):
    from wakelab.run.state import load_trained

    result = run(tiny_model, texts, **{"train.max_steps": 4})
    final = load_file(result.output_dir / "final" / "new_rows.safetensors")
    for target in (str(result.output_dir), result.run_id):
        state = load_trained(target)
        assert torch.equal(state.rows.values(state.rows.new_ids), final["rows"])
        assert state.run_id == result.run_id
    checkpoint = load_trained(str(result.output_dir / "checkpoint-2"))
    assert checkpoint.step == 2
    saved = load_file(result.output_dir / "checkpoint-2" / "trained_rows.safetensors")
    assert torch.equal(checkpoint.rows.values(checkpoint.rows.new_ids), saved["rows"])
    initial = load_trained(str(result.output_dir), initial=True)
    assert not torch.equal(initial.rows.values(initial.rows.new_ids), final["rows"])


def test_resume_from_the_last_checkpoint_trains_nothing_more(tiny_model, texts, tmp_path):
    """A crash after the final checkpoint: resuming finishes the run from it, without a step past max_steps."""
    import shutil

    straight = run(tiny_model, texts, **{"train.max_steps": 4}, output_dir="straight")
    shutil.copytree(straight.output_dir / "checkpoint-4", tmp_path / "saved-4")
    resumed = run(tiny_model, texts, **{"train.max_steps": 4}, output_dir="late", resume_from=str(tmp_path / "saved-4"))
    assert not (resumed.output_dir / "checkpoint-5").exists()
    a = load_file(straight.output_dir / "final" / "new_rows.safetensors")["rows"]
    b = load_file(resumed.output_dir / "final" / "new_rows.safetensors")["rows"]
    assert torch.equal(a, b)


# -- kills between publish_dir's renames -------------------------------------------------------------------------------

PUBLISH = """
import sys
from pathlib import Path
from wakelab.storage.checkpoints import publish_dir
publish_dir(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def checkpoint_folder(path, step: int, payload: bytes):
    from wakelab.storage.checkpoints import write_manifest

    path.mkdir(parents=True)
    (path / "trained_rows.safetensors").write_bytes(payload)
    write_manifest(path, {"step": step})
    return path


def test_kill_between_publish_renames_puts_the_old_folder_back(tmp_path):
    """Replacing checkpoint-4, killed after the old one went aside: rotation puts it back, never deletes it."""
    import os
    import subprocess
    import sys

    from wakelab.storage.checkpoints import rotate

    run_dir = tmp_path / "run"
    for step in (2, 3):
        checkpoint_folder(run_dir / f"checkpoint-{step}", step, b"old %d" % step)
    old = checkpoint_folder(run_dir / "checkpoint-4", 4, b"old 4")
    new = checkpoint_folder(run_dir / ".staging" / "checkpoint-4", 4, b"new 4")
    env = {**os.environ, "WAKELAB_CRASH_AT": "publish-aside"}
    env.pop("WAKELAB_CRASH_MARKER", None)
    proc = subprocess.run([sys.executable, "-c", PUBLISH, str(new), str(old)], env=env, timeout=120)
    assert proc.returncode == -9, "the kill must land between the two renames"
    (aside,) = run_dir.glob(".partial-old-checkpoint-4-*")
    assert not old.exists() and new.exists()
    removed = rotate(run_dir, keep=2)
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert not aside.exists()
    assert verify(old)["step"] == 4 and (old / "trained_rows.safetensors").read_bytes() == b"old 4"
    assert [c.name for c in list_checkpoints(run_dir)] == ["checkpoint-3", "checkpoint-4"]


def test_recover_interrupted_finishes_deletions_and_spares_live_writers(tmp_path):
    import os

    from wakelab.storage.checkpoints import latest_checkpoint, recover_interrupted

    run_dir = tmp_path / "run"
    checkpoint_folder(run_dir / "checkpoint-6", 6, b"six")
    replaced = checkpoint_folder(run_dir / ".partial-old-checkpoint-6-999999999", 6, b"stale six")
    doomed = checkpoint_folder(run_dir / ".partial-del-checkpoint-2-999999999", 2, b"two")
    lost = checkpoint_folder(run_dir / ".partial-old-checkpoint-8-999999999", 8, b"eight")
    live = checkpoint_folder(run_dir / f".partial-old-checkpoint-9-{os.getppid()}", 9, b"a writer mid-rename")
    assert latest_checkpoint(run_dir).name == "checkpoint-8"  # put back before choosing
    assert not replaced.exists() and not doomed.exists() and not lost.exists()
    assert (run_dir / "checkpoint-6" / "trained_rows.safetensors").read_bytes() == b"six"
    assert live.exists() and not (run_dir / "checkpoint-9").exists()
    assert recover_interrupted(run_dir) == []
