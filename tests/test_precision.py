"""train.precision: how AdamW's updates land on bf16 parameters, and the notebook's schedule and objective."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from conftest import raising_plugin, tiny_overrides
from safetensors.torch import load_file

from wakelab.config import build_config
from wakelab.data.corpus import BlockDataset
from wakelab.errors import ConfigError
from wakelab.precision import RoundingAdamW, build_optimizer, check_parameters, round_stochastic, state_bytes
from wakelab.run import engine

LR = 1e-4  # far below half a bf16 grid step at 1.0 (2**-8): round-to-nearest drops every update


def _steps(setting: str, steps: int, seed: int = 0, start: float = 1.0, dtype=torch.bfloat16, lr: float = LR):
    """A one-row "model" (an embedding row) pushed by a constant gradient; returns (row, optimizer)."""
    row = torch.nn.Parameter(torch.full((1, 64), start, dtype=dtype))
    if setting == "plain":
        optimizer = torch.optim.AdamW([row], lr=lr, weight_decay=0.0)
    else:
        optimizer = RoundingAdamW([row], lr=lr, mode=setting, seed=seed)
    for _ in range(steps):
        row.grad = torch.ones_like(row)
        optimizer.step()
    return row, optimizer


def test_round_to_nearest_freezes_a_row_that_the_remedies_move():
    steps = 60  # 60 x 1e-4 = 6e-3 of intended motion, more than half a grid step (3.9e-3) below 1.0
    plain, _ = _steps("plain", steps)
    assert torch.equal(plain.detach(), torch.ones_like(plain))  # every update rounded away
    master, opt = _steps("fp32-master", steps)
    assert float(opt.state[master]["master"].mean()) == pytest.approx(1 - steps * LR, abs=1e-5)
    assert bool((master.detach() < 1).all())  # the bf16 copy follows the master once it crosses a grid step
    kahan, _ = _steps("kahan", steps)
    assert bool((kahan.detach() < 1).all())


def test_stochastic_rounding_moves_a_row_in_expectation():
    steps = 20
    finals = torch.stack([_steps("stochastic", steps, seed=seed)[0].detach().float() for seed in range(16)])
    expected = 1 - steps * LR  # 0.998: between grid points 0.99609375 and 1.0
    assert float(finals.mean()) == pytest.approx(expected, abs=2e-4)
    assert float(finals.min()) < 1.0 and float(finals.max()) <= 1.0  # some elements stepped down a grid point


def test_round_stochastic_is_unbiased_and_exact_on_grid_points():
    generator = torch.Generator().manual_seed(0)
    grid = torch.tensor([1.0, -2.5, 0.0, 3.0e-5]).to(torch.bfloat16).float()
    assert torch.equal(round_stochastic(grid, generator).float(), grid)
    value = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of the way from 1.0 to the next grid point (1 + 2**-7)
    mean = float(round_stochastic(value, generator).float().mean())
    assert mean == pytest.approx(1.0 + 2**-9, abs=2e-5)
    assert float(round_stochastic(-value, generator).float().mean()) == pytest.approx(-(1.0 + 2**-9), abs=2e-5)


def test_kahan_tracks_fp32_within_one_grid_step():
    """Stated tolerance: after 200 steps of a noisy gradient, Kahan-compensated bf16 stays within one bf16 grid step
    (2**-7 at 1.0) of the same AdamW run in fp32, while round-to-nearest bf16 drifts much further."""
    torch.manual_seed(0)
    grads = torch.randn(200, 1, 256) * 0.1 + 0.05
    start = torch.rand(1, 256) + 0.5
    rows = {}
    for setting, dtype in (("fp32", torch.float32), ("plain", torch.bfloat16), ("kahan", torch.bfloat16)):
        row = torch.nn.Parameter(start.clone().to(dtype))
        if setting == "kahan":
            optimizer = RoundingAdamW([row], lr=3e-4, mode="kahan")
        else:
            optimizer = torch.optim.AdamW([row], lr=3e-4, weight_decay=0.0)
        for grad in grads:
            row.grad = grad.to(dtype)
            optimizer.step()
        rows[setting] = row.detach().float()
    kahan_error = float((rows["kahan"] - rows["fp32"]).abs().max())
    plain_error = float((rows["plain"] - rows["fp32"]).abs().max())
    assert kahan_error <= 2**-7
    assert plain_error > 4 * kahan_error


def test_state_bytes_count_masters_and_buffers():
    sizes = {s: state_bytes(_steps(s, 1)[1]) for s in ("plain", "fp32-master", "stochastic", "kahan")}
    n = 64
    assert sizes == {"plain": 4 * n, "fp32-master": 12 * n, "stochastic": 4 * n, "kahan": 6 * n}


def test_a_plain_adamw_state_loads_into_each_setting():
    """Wordybird's step-100 checkpoint holds a plain AdamW state: each remedy continues from its moments."""
    row, plain = _steps("plain", 3)
    saved = plain.state_dict()
    for setting in ("fp32-master", "stochastic", "kahan"):
        optimizer = RoundingAdamW([row], lr=LR, mode=setting)
        optimizer.load_state_dict(saved)
        state = optimizer.state[row]
        assert int(state["step"]) == 3
        assert torch.equal(state["exp_avg"].float(), plain.state[row]["exp_avg"].float())
        if setting == "fp32-master":
            assert torch.equal(state["master"], row.detach().float())


# -- the switch in a run ------------------------------------------------------------------------------------------


def _run(tiny_model, texts, resume_from=None, **extra):
    values = {
        "train.save_steps": 2,
        "train.logging_steps": 1,
        "train.max_steps": 6,
        "train.rows_dtype": "bfloat16",
        "train.lr": 1e-3,
    }
    values.update(extra)
    config = build_config(None, None, tiny_overrides(tiny_model, texts, **values))
    return engine.run(config, progress=False, resume_from=resume_from)


@pytest.mark.parametrize("setting", ["bf16", "fp32-master", "stochastic", "kahan"])
def test_resume_is_bit_exact_under_each_setting(tiny_model, texts, tmp_path, setting):
    straight = _run(tiny_model, texts, **{"train.precision": setting}, output_dir="straight")
    with pytest.raises(RuntimeError, match="power cut"):  # the same run, killed after its step-4 checkpoint
        _run(
            tiny_model,
            texts,
            **{"train.precision": setting},
            output_dir="split",
            plugins=[str(raising_plugin(tmp_path, step=5))],
        )
    resumed = _run(
        tiny_model, texts, **{"train.precision": setting}, output_dir="split", resume_from="split/checkpoint-4"
    )
    a = load_file(straight.output_dir / "checkpoint-6" / "trained_rows.safetensors")["rows"]
    b = load_file(resumed.output_dir / "checkpoint-6" / "trained_rows.safetensors")["rows"]
    assert a.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), b.view(torch.int16))
    sa = torch.load(straight.output_dir / "checkpoint-6" / "optimizer.pt", weights_only=True)
    sb = torch.load(resumed.output_dir / "checkpoint-6" / "optimizer.pt", weights_only=True)
    extra = {"bf16": "exp_avg", "fp32-master": "master", "stochastic": "exp_avg", "kahan": "kahan_comp"}[setting]
    if setting == "bf16":  # train.optimizer's default: torch AdamW's fused kernel, which Trainer was asked for
        assert sa["param_groups"][0]["fused"] is True
    for key in ("exp_avg", "exp_avg_sq", extra):
        assert all(torch.equal(sa["state"][i][key], sb["state"][i][key]) for i in sa["state"]), key
    if setting == "stochastic":
        assert torch.equal(sa["rounding_generator"], sb["rounding_generator"])


def test_bad_precision_values_are_one_line_errors(tiny_model, texts):
    expected = r"train.precision': got \"fp16-master\"; Input should be 'bf16', 'fp32-master'"
    with pytest.raises(ConfigError, match=expected):
        build_config(None, None, tiny_overrides(tiny_model, texts, **{"train.precision": "fp16-master"}))
    overrides = tiny_overrides(tiny_model, texts, **{"train.precision": "stochastic", "train.rows_dtype": "float32"})
    with pytest.raises(
        ConfigError,
        match=r"train.precision=stochastic: the trained parameters are float32.*"
        r"train.rows_dtype=bfloat16",
    ):
        build_config(None, None, overrides)
    overrides = tiny_overrides(tiny_model, texts, **{"train.precision": "kahan", "train.trainable": "full"})
    with pytest.raises(ConfigError, match=r"train.precision=kahan.*float32.*model.dtype=bfloat16"):
        build_config(None, None, overrides)
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_the_bf16_default_changes_nothing_for_fp32_rows(tiny_model, texts):
    config = build_config(None, None, tiny_overrides(tiny_model, texts))
    assert config.train.precision == "bf16"  # the default
    rows = torch.nn.Parameter(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)))
    reference = torch.nn.Parameter(rows.detach().clone())
    trainers_adamw = torch.optim.AdamW([rows], lr=1e-2, weight_decay=0.01)
    check_parameters(config.train.precision, [rows])  # fp32 rows are accepted under the default
    optimizer = build_optimizer(config.train.precision, trainers_adamw)
    assert optimizer is trainers_adamw  # Trainer's own AdamW, not a rounding one
    plain = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.01)
    for step in range(3):
        grad = torch.randn(6, 8, generator=torch.Generator().manual_seed(step + 1))
        rows.grad, reference.grad = grad.clone(), grad.clone()
        optimizer.step()
        plain.step()
    assert rows.dtype == torch.float32 and torch.equal(rows, reference)  # the very updates plain AdamW makes


# -- the notebook's schedule and objective ------------------------------------------------------------------------


def test_double_shift_is_the_notebooks_objective():
    blocks = np.arange(12, dtype=np.int64).reshape(2, 6)
    explicit, double = BlockDataset(blocks, explicit_shift=True)[0], BlockDataset(blocks, double_shift=True)[0]
    assert explicit["shift_labels"].tolist() == [1, 2, 3, 4, 5]  # next token, no further shift
    assert double["input_ids"].tolist() == [0, 1, 2, 3, 4] and double["labels"].tolist() == [1, 2, 3, 4, 5]
    assert "shift_labels" not in double  # the model shifts labels once more: position i predicts token i + 2


def test_wordybird_presets_have_the_notebooks_effective_schedule():
    for name in ("wordybird", "wordybird_3"):
        t = build_config(name).train
        assert (t.scheduler, t.effective_warmup, t.max_grad_norm, t.precision) == ("linear", 0, 1.0, "bf16")
    assert build_config("wordybird_3").train.resume_schedule == "fresh"


@pytest.mark.parametrize("setting", ["fp32-master", "stochastic", "kahan"])
def test_mask_strategy_keeps_base_rows_bit_identical_under_each_setting(tiny_model, texts, setting):
    from transformers import AutoModelForCausalLM

    from wakelab.run.state import load_trained

    values = {
        "train.trainable": "mask",
        "train.rows_dtype": "auto",
        "model.dtype": "bfloat16",
        "train.max_steps": 3,
        "train.precision": setting,
        "train.weight_decay": 0.1,
        "train.save_steps": 0,
    }
    result = _run(tiny_model, texts, **values)
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).get_input_embeddings().weight
    trained = load_trained(str(result.output_dir)).rows.values()
    num_base = original.shape[0]
    assert trained.dtype == torch.bfloat16
    assert torch.equal(trained[:num_base].view(torch.int16), original.detach().view(torch.int16))
    assert result.metrics["new_row_displacement"] > 0  # while the new rows learned
