"""``train.distributed=fsdp`` without torchrun, and the combinations it refuses (the 2-rank runs: test_fsdp_slow.py)."""

from __future__ import annotations

import mlflow
from click.testing import CliRunner
from conftest import tiny_overrides
from safetensors.torch import load_file

from wakelab.cli import main


def invoke(tiny_model, texts, **overrides):
    args = ["run", "--no-progress"]
    for key, value in tiny_overrides(tiny_model, texts, **overrides).items():
        args += ["--set", f"{key}={value}"]
    return CliRunner().invoke(main, args)


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("wakelab: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_fsdp_with_mask_is_refused_naming_tokens(tiny_model, texts, tmp_path):
    line = one_error_line(invoke(tiny_model, texts, **{"train.distributed": "fsdp", "train.trainable": "mask"}))
    assert "train.distributed=fsdp" in line and "train.trainable=mask is not supported" in line
    assert "use train.trainable=tokens" in line
    assert not (tmp_path / "out").exists()
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_fsdp_with_full_is_refused_naming_tokens(tiny_model, texts, tmp_path):
    line = one_error_line(invoke(tiny_model, texts, **{"train.distributed": "fsdp", "train.trainable": "full"}))
    assert "train.trainable=full is not supported" in line and "use train.trainable=tokens" in line


def test_fsdp_in_one_process_warns_once_and_trains_as_before(tiny_model, texts, tmp_path):
    fsdp = invoke(tiny_model, texts, **{"train.distributed": "fsdp", "output_dir": "fsdp"})
    assert fsdp.exit_code == 0, fsdp.output
    warning = "wakelab: warning: train.distributed=fsdp with a single process changes nothing"
    assert fsdp.stderr.count(warning) == 1, fsdp.stderr
    assert "FSDP2" not in fsdp.stderr
    ddp = invoke(tiny_model, texts, **{"output_dir": "ddp"})
    assert ddp.exit_code == 0 and "fsdp" not in ddp.stderr
    got, want = (load_file(str(tmp_path / d / "final" / "new_rows.safetensors")) for d in ("fsdp", "ddp"))
    assert got["rows"].equal(want["rows"])
