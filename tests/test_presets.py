"""The notebooks' experiments as presets: their values, and the Wordybird 1 -> 3 continuation with Adam's state."""

from __future__ import annotations

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from wakelab.config import build_config
from wakelab.errors import ConfigError
from wakelab.run import engine
from wakelab.storage.recording import open as open_recording

TINY_GPT2 = "{model_type: gpt2, vocab_size: 400, n_embd: 16, n_layer: 1, n_head: 2, n_positions: 32}"


def test_p1_evolved_has_the_notebooks_values():
    c = build_config("p1_evolved")
    assert (c.model.name_or_path, c.model.load_in_4bit, c.model.compute_dtype) == (
        "meta-llama/Llama-3.2-1B",
        True,
        "bfloat16",
    )
    assert (c.data.seq_len, c.data.effective_stride) == (512, 512)
    assert (c.init.method, c.init.radius_scale) == ("spherical", 1.5)
    assert c.init.from_embeddings == "full_checkpoints/step_0700/embeddings.pt"
    t = c.train
    assert (t.max_steps, t.lr, t.grad_accum, t.scheduler, t.effective_warmup) == (6000, 2e-4, 16, "cosine", 300)
    assert (t.save_steps, t.save_total_limit, t.logging_steps) == (200, 6, 50)
    assert t.trainable == "mask"
    assert (c.recorder.fields, c.recorder.every) == (("embeddings",), 200)  # embedding snapshots every 200
    assert "sentry" in c.plugins and c.sentry.target


def test_wordybird_has_the_notebooks_values():
    c = build_config("wordybird")
    arch = c.model.architecture
    assert (
        arch["model_type"],
        arch["vocab_size"],
        arch["n_embd"],
        arch["n_layer"],
        arch["n_head"],
        arch["n_positions"],
    ) == ("gpt2", 50257, 64, 2, 2, 128)
    assert c.model.dtype == "bfloat16" and c.model.tokenizer == "gcide-bpe"
    t = c.train
    assert (t.batch_size, t.lr, t.adam_beta1, t.adam_beta2, t.adam_epsilon, t.weight_decay, t.seed) == (
        32,
        1e-3,
        0.9,
        0.999,
        1e-8,
        0.0,
        42,
    )
    assert (c.data.seq_len, c.data.effective_stride, c.data.shift) == (128, 1, "explicit")
    assert c.train.trainable == "full" and "recorder" in c.plugins and c.recorder.every == 1
    assert t.optimizer == "adamw_torch", "the notebook's optim: the fused kernel rounds bf16 updates differently"
    wb3 = build_config("wordybird_3")
    assert wb3.train.resume_from == "latest:wordybird" and wb3.train.max_steps == 200


def test_p1_missing_phase1_file_is_a_clear_error(tiny_model, texts):
    overrides = {
        "model.name_or_path": str(tiny_model),
        "vocab.lexicon": str(texts["lexicon"]),
        "data.corpus": str(texts["corpus"]),
        "data.seq_len": 32,
        "plugins": [],
    }
    with pytest.raises(ConfigError, match=r"init.from_embeddings: file not found.*init.from_embeddings=null"):
        engine.run(build_config("p1_evolved", None, overrides), progress=False)
    assert mlflow.search_runs(search_all_experiments=True).empty


def _wordybird(tiny_model, texts, preset, **extra):
    values = {
        "model.architecture": TINY_GPT2,
        "model.tokenizer": str(tiny_model),
        "data.corpus": str(texts["corpus"]),
        "data.seq_len": 16,
        "train.batch_size": 4,
        "train.max_steps": 10,
        "train.save_steps": 10,
    }
    values.update(extra)
    return engine.run(build_config(preset, None, [f"{k}={v}" for k, v in values.items()]), progress=False)


def test_wordybird_then_wordybird3_carries_adam_state_on(tiny_model, texts):
    first = _wordybird(tiny_model, texts, "wordybird", output_dir="wb1")
    rec1 = open_recording(first.output_dir / "recording")
    assert list(rec1.steps) == list(range(0, 11)) and rec1.flags.get("optimizer_state_missing") == [0]
    masks = load_file(first.output_dir / "recording" / "masks.safetensors")
    assert set(masks) == {"trained_mask", "untrained_mask", "trained_indices", "untrained_indices"}
    assert masks["trained_mask"].shape == (400,) and masks["untrained_mask"].any()  # ids 367.. never occur
    assert torch.equal(masks["trained_mask"], ~masks["untrained_mask"])

    second = _wordybird(
        tiny_model,
        texts,
        "wordybird_3",
        output_dir="wb3",
        **{"train.max_steps": 20, "train.resume_from": "latest:wordybird"},
    )
    assert second.run_id != first.run_id
    before = torch.load(first.output_dir / "checkpoint-10" / "optimizer.pt", weights_only=True)["state"]
    after = torch.load(second.output_dir / "checkpoint-20" / "optimizer.pt", weights_only=True)["state"]
    assert {int(s["step"]) for s in before.values()} == {10}
    assert {int(s["step"]) for s in after.values()} == {20}  # Adam's step count carried on, not restarted
    rec3 = open_recording(second.output_dir / "recording")
    assert rec3.steps[0] == 10 and rec3.steps[-1] == 20
    assert not rec3.flags.get("optimizer_state_missing")  # the starting record has Adam's state
    # The starting record of Wordybird 3 is exactly Wordybird 1's last: rows and Adam's moments carried over.
    for field in ("embeddings", "exp_avg", "exp_avg_sq"):
        assert torch.equal(rec3[field].at_step(10), rec1[field].at_step(10)), field


def test_wordybird3_starts_a_fresh_linear_schedule_and_takes_any_precision(tiny_model, texts):
    """The notebook's Wordybird 3 built a new Trainer: lr decays from 1e-3 to 0 over its own steps again. Any
    train.precision continues the plain AdamW state of Wordybird 1's checkpoint (fp32-master here, on `full`)."""
    first = _wordybird(tiny_model, texts, "wordybird", output_dir="wb1")
    rec1 = open_recording(first.output_dir / "recording")
    assert float(rec1["lr"].at_step(1)) == pytest.approx(1e-3) and float(rec1["lr"].at_step(10)) == pytest.approx(1e-4)
    fresh = _wordybird(
        tiny_model, texts, "wordybird_3", output_dir="wb3", **{"train.max_steps": 20, "train.precision": "fp32-master"}
    )
    rec3 = open_recording(fresh.output_dir / "recording")
    assert [round(float(rec3["lr"].at_step(s)), 8) for s in (11, 15, 20)] == [1e-3, 6e-4, 1e-4]
    assert torch.equal(rec3["exp_avg"].at_step(10), rec1["exp_avg"].at_step(10))
    optimizer = torch.load(fresh.output_dir / "checkpoint-20" / "optimizer.pt", weights_only=True)["state"]
    assert all(s["master"].dtype == torch.float32 and int(s["step"]) == 20 for s in optimizer.values())
    saved = _wordybird(
        tiny_model,
        texts,
        "wordybird_3",
        output_dir="wb3-saved",
        **{"train.max_steps": 20, "train.resume_schedule": "saved", "plugins": "[]"},
    )
    assert saved.status == "FINISHED"
    lrs = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(saved.run_id, "lr")}
    assert lrs[20] == pytest.approx(5e-5)  # the saved schedule: Trainer's decay over all 20 steps (1/20 at the last)
