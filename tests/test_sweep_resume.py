"""``wakelab sweep --resume``: bad input is one line and exit 2, before anything runs.

Stopping a real sweep with SIGTERM and resuming it is in test_stop_slow.py."""

from __future__ import annotations

import mlflow
import pytest
from click.testing import CliRunner

from wakelab.cli.main import main


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give --over KEY=V1,V2,... (or --resume PARENT to finish a stopped sweep)"),
        (
            ["--resume", "sw", "--over", "lr=1e-3,2e-3", "--max-steps", "3"],
            "--resume continues the sweep as it was planned; drop --over, --max-steps",
        ),
        (["--resume", "no-such-thing"], "--resume no-such-thing: neither a sweep folder nor a sweep's parent run id"),
    ],
)
def test_bad_resume_input_is_one_line(args, message):
    result = CliRunner().invoke(main, ["sweep", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_resume_refuses_a_run_that_is_not_a_sweep_parent(tmp_path):
    mlflow.set_experiment("tests")
    with mlflow.start_run() as run:
        pass
    result = CliRunner().invoke(main, ["sweep", "--resume", run.info.run_id])
    assert result.exit_code == 2
    assert f"run {run.info.run_id} is not a sweep's parent run" in result.output


def test_resume_of_a_folder_without_sweep_file_says_why(tmp_path):
    (tmp_path / "sw").mkdir()
    result = CliRunner().invoke(main, ["sweep", "--resume", "sw"])
    assert result.exit_code == 2
    assert "sw/sweep.json not found; only sweeps started by this wakelab version can be resumed" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("evaluate", [True, False])
def test_the_sweep_file_keeps_evaluate_so_resume_evaluates_the_rest(tmp_path, evaluate):
    from types import SimpleNamespace

    from wakelab.config import build_config
    from wakelab.sweep.resume import load_sweep, save_sweep_file

    plan = SimpleNamespace(over=["init=spherical,mean"], constituents_path=None, top_k=7, evaluate=evaluate,
                           base=build_config("demo", None, {}), root=tmp_path / "sweep")  # fmt: skip
    save_sweep_file(plan, "parent123", "1")
    saved = load_sweep(str(tmp_path / "sweep"))
    assert saved.evaluate is evaluate and saved.top_k == 7 and saved.parent_run_id == "parent123"


def test_stacked_rows_read_as_the_concatenated_matrix_would():
    import torch

    from wakelab.analysis.embeddings import nearest_neighbours
    from wakelab.rows import StackedRows

    generator = torch.Generator().manual_seed(0)
    base, new = torch.randn(40, 8, generator=generator).bfloat16(), torch.randn(9, 8, generator=generator)
    whole = torch.cat([base.float(), new])
    stacked = StackedRows(base, new)
    assert stacked.shape == tuple(whole.shape)
    for part in (slice(0, 40), slice(40, 49), slice(35, 45), slice(0, 49), slice(44, None)):
        assert torch.equal(stacked[part], whole[part]), part
    ids = torch.tensor([3, 41, 0, 48, 39, 40])
    assert torch.equal(stacked[ids], whole[ids])
    assert nearest_neighbours(stacked, [41, 47], range(40), k=5) == nearest_neighbours(whole, [41, 47], range(40), k=5)
