"""``train.distributed=fsdp`` without torchrun, and the combinations it refuses (the 2-rank runs: test_fsdp_slow.py)."""

from __future__ import annotations

import mlflow
import pytest
from click.testing import CliRunner
from conftest import tiny_overrides
from safetensors.torch import load_file

from wakelab.cli.main import main


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
    assert "train.distributed=fsdp does not support train.trainable=mask" in line
    assert "use train.trainable=tokens" in line
    assert not (tmp_path / "out").exists()
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_fsdp_with_gradient_accumulation_is_refused_in_one_line(tiny_model, texts, tmp_path):
    line = one_error_line(invoke(tiny_model, texts, **{"train.distributed": "fsdp", "train.grad_accum": 2}))
    assert "train.distributed=fsdp takes train.grad_accum=1" in line and "raise train.batch_size" in line
    assert not (tmp_path / "out").exists()


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


def test_trainer_still_reads_the_flag_that_hands_it_a_sharded_model():
    """``sharding.hand_to_trainer`` sets ``Trainer.is_distributed_loading_by_transformers``: with it Trainer neither
    wraps the model in DDP nor moves it, and averages the replicated trainable tensors' gradients itself. A
    transformers that no longer reads it would train the ranks' new rows apart: fail here, by name, first."""
    import inspect

    from transformers import Trainer

    from wakelab.errors import ConfigError
    from wakelab.run import sharding

    if not hasattr(Trainer, "_sync_replicated_trainable_parameters"):  # an older transformers (the oldest we take)
        with pytest.raises(ConfigError, match="train.distributed=fsdp needs a transformers whose Trainer takes"):
            sharding.require_trainer_support()
        return
    sharding.require_trainer_support()
    train = inspect.getsource(Trainer)  # the training loop's preparation reads it (transformers 5.23)
    assert "self.is_distributed_loading_by_transformers" in train
    assert "_sync_replicated_trainable_parameters" in train
    sync = inspect.getsource(Trainer._sync_replicated_trainable_parameters)
    assert "register_post_accumulate_grad_hook" in sync and "ReduceOp.AVG" in sync


def test_a_tied_split_head_reads_the_embeddings_current_weights():
    """FSDP2 swaps the embedding's Parameters (sharded at rest, gathered in the forward): the head must follow."""
    import torch

    from wakelab.rows import NewRowsEmbedding, NewRowsHead

    embedding = NewRowsEmbedding(torch.randn(5, 4), torch.randn(2, 4))
    head = NewRowsHead(embedding.base_weight, embedding.new_weight, tied_to=embedding)
    hidden = torch.randn(3, 4)
    before = head(hidden)
    embedding.base_weight = torch.nn.Parameter(embedding.base_weight.detach() * 2, requires_grad=False)
    after = head(hidden)
    torch.testing.assert_close(after[:, :5], before[:, :5] * 2)
    torch.testing.assert_close(after[:, 5:], before[:, 5:])
    assert head._weights[0] is embedding.base_weight and not head._own  # no reference of its own to the base
