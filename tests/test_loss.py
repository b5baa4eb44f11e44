"""The chunked loss equals transformers' loss and gradients, never builds full logits, and knows when to step aside."""

from __future__ import annotations

import functools

import pytest
import torch
from click.testing import CliRunner
from optional import require
from torch.utils._python_dispatch import TorchDispatchMode

from wakelab import loss as loss_mod
from wakelab.cli.main import main
from wakelab.config import build_config
from wakelab.errors import ConfigError
from wakelab.loss import ChunkedLoss, unsupported_reason
from wakelab.rows import setup_trainable_rows

NUM_BASE, NUM_NEW = 250, 50


def tiny_llama(tied: bool, dtype=torch.float32, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=NUM_BASE + NUM_NEW,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        **extra,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def batch(seed: int = 1, explicit: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, NUM_BASE + NUM_NEW, (3, 21), generator=torch.Generator().manual_seed(seed))
    ids[:, ::4] = torch.randint(NUM_BASE, NUM_BASE + NUM_NEW, ids[:, ::4].shape)  # plenty of new-row targets
    if explicit:  # the Wordybird notebook's explicit shift
        return {"input_ids": ids[:, :-1], "labels": ids[:, :-1], "shift_labels": ids[:, 1:].contiguous()}
    labels = ids[:, :-1].clone()
    labels[0, :6] = -100  # ignored positions count in neither sum nor mean
    return {"input_ids": ids[:, :-1], "labels": labels}


def loss_and_grads(model, rows, compute):
    model.zero_grad(set_to_none=True)
    value = compute()
    value.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    return value.detach(), [p.grad.detach().float().clone() for p in trained]


def assert_grads_close(got, expected, rel):
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected, strict=False):
        scale = float(e.abs().max())
        assert scale > 0
        assert float((g - e).abs().max()) <= rel * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("strategy", ["tokens", "mask"])
def test_chunked_loss_and_gradients_equal_the_standard_loss(strategy, tied, dtype):
    model = tiny_llama(tied, dtype)
    rows = setup_trainable_rows(model, NUM_BASE, strategy)
    inputs = batch()
    expected_loss, expected = loss_and_grads(model, rows, lambda: model(**inputs).loss)
    chunked = ChunkedLoss(chunk_tokens=7)  # 54 labelled positions: several chunks and a ragged last one
    got_loss, got = loss_and_grads(model, rows, lambda: chunked(model, inputs)[0])
    assert chunked.reason is None
    # fp32: equal to rounding; bf16: the standard loss rounds its gradient products to bf16, this one sums in fp32.
    assert float(got_loss) == pytest.approx(float(expected_loss), rel=1e-6 if dtype == torch.float32 else 1e-3)
    assert_grads_close(got, expected, 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("strategy", ["tokens", "mask"])
def test_bf16_autocast_matches_the_standard_loss_under_autocast(strategy):
    model = tiny_llama(tied=True)
    rows = setup_trainable_rows(model, NUM_BASE, strategy, rows_dtype="float32")
    inputs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss, expected = loss_and_grads(model, rows, lambda: model(**inputs).loss)
        got_loss, got = loss_and_grads(model, rows, lambda: ChunkedLoss(5)(model, inputs)[0])
    assert float(got_loss) == pytest.approx(float(expected_loss), rel=1e-3)
    assert_grads_close(got, expected, 2e-2)


def test_sum_over_num_items_and_explicit_shift_labels_match():
    """Trainer's gradient accumulation (sum / num_items_in_batch) and the notebook's shift_labels."""
    model = tiny_llama(tied=True)
    rows = setup_trainable_rows(model, NUM_BASE, "tokens")
    inputs = batch(explicit=True)
    items = torch.tensor(100)
    expected_loss, expected = loss_and_grads(model, rows, lambda: model(**inputs, num_items_in_batch=items).loss)
    got_loss, got = loss_and_grads(model, rows, lambda: ChunkedLoss(16)(model, inputs, items)[0])
    assert float(got_loss) == pytest.approx(float(expected_loss), rel=1e-6)
    assert_grads_close(got, expected, 1e-5)


def test_outputs_hold_last_position_logits_only_and_they_are_the_models():
    model = tiny_llama(tied=True)
    setup_trainable_rows(model, NUM_BASE, "tokens")
    inputs = batch()
    _, outputs = ChunkedLoss()(model, inputs)
    assert outputs.logits.shape == (3, 1, NUM_BASE + NUM_NEW)
    with torch.no_grad():
        full = model(input_ids=inputs["input_ids"]).logits
    torch.testing.assert_close(outputs.logits[:, 0].detach(), full[:, -1], rtol=1e-5, atol=1e-6)


class LargestTensor(TorchDispatchMode):
    """Records the largest memory block (in elements) any operation's output lives in: views count what they view."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_sparse:  # the tied lookup's gradient: its values are its memory
                self.largest = max(self.largest, t._values().numel())
            elif isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("strategy", ["tokens", "mask"])
def test_no_tensor_of_the_whole_batchs_logits_is_ever_built(strategy):
    model = tiny_llama(tied=True)
    setup_trainable_rows(model, NUM_BASE, strategy)
    ids = torch.randint(0, NUM_BASE + NUM_NEW, (4, 48), generator=torch.Generator().manual_seed(3))
    inputs = {"input_ids": ids, "labels": ids}
    full_logits = ids.numel() * (NUM_BASE + NUM_NEW)
    with LargestTensor() as standard:
        model(**inputs).loss.backward()
    model.zero_grad(set_to_none=True)
    with LargestTensor() as chunked:
        ChunkedLoss(16)(model, inputs)[0].backward()
    assert standard.largest >= full_logits  # the measurement sees the standard loss's logits
    assert chunked.largest <= full_logits // 4  # 16-token chunks of <= 250 logits; the MLP (4 x 48 x 64) is larger


def test_head_with_a_bias_falls_back_with_a_warning_naming_it():
    model = tiny_llama(tied=False)
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    warnings = []
    chunked = ChunkedLoss(warn=warnings.append)
    assert chunked(model, batch()) is None
    assert len(warnings) == 1 and "the output head has a bias" in warnings[0]
    assert "using the standard loss" in warnings[0]


def test_gemma2_soft_capping_falls_back():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=NUM_BASE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=30.0,
    )
    model = Gemma2ForCausalLM(config)
    reason = unsupported_reason(model)
    assert reason is not None and "soft-caps its logits (final_logit_softcapping=30.0)" in reason
    ids = torch.randint(0, NUM_BASE, (2, 9), generator=torch.Generator().manual_seed(3))
    chunked = ChunkedLoss(4, warn=lambda message: None)
    assert chunked(model, {"input_ids": ids, "labels": ids}) is None  # None: the caller computes the standard loss
    assert chunked.reason == reason
    assert chunked(model, {"input_ids": ids, "labels": ids}) is None  # and keeps falling back without probing again


def test_post_processing_the_config_does_not_name_is_caught_on_the_first_call(monkeypatch):
    model = tiny_llama(tied=True)
    setup_trainable_rows(model, NUM_BASE, "tokens")
    forward = type(model).forward

    @functools.wraps(forward)
    def doubled(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 2
        return out

    monkeypatch.setattr(type(model), "forward", doubled)
    monkeypatch.setattr(loss_mod, "_WARNED", set())
    warnings = []
    chunked = ChunkedLoss(warn=warnings.append)
    assert chunked(model, batch()) is None
    assert chunked(model, batch()) is None  # remembered: no second probe, no second warning
    assert len(warnings) == 1 and "post-processes" in warnings[0]


def test_labels_outside_the_vocabulary_are_refused_like_the_standard_loss():
    model = tiny_llama(tied=True)
    inputs = batch()
    inputs["labels"][1, 3] = NUM_BASE + NUM_NEW
    with pytest.raises(IndexError, match=r"label ids must lie in \[0, 300\)"):
        ChunkedLoss()(model, inputs)


def test_perplexity_is_the_same_either_way():
    from wakelab.data.corpus import BlockDataset
    from wakelab.run.evaluation import perplexity

    model = tiny_llama(tied=True)
    setup_trainable_rows(model, NUM_BASE, "tokens")
    blocks = torch.randint(0, NUM_BASE + NUM_NEW, (5, 20), generator=torch.Generator().manual_seed(4)).numpy()
    dataset = BlockDataset(blocks)
    standard = perplexity(model, dataset, 2, 5, chunk_tokens=None)
    assert perplexity(model, dataset, 2, 5, chunk_tokens=8) == pytest.approx(standard, rel=1e-6)


def test_trainer_trains_the_same_rows_with_either_loss(tmp_path):
    from transformers import TrainingArguments

    from wakelab.data.corpus import collate
    from wakelab.hooks.registry import build_manager
    from wakelab.run.trainer import WakelabTrainer

    ids = torch.randint(0, NUM_BASE + NUM_NEW, (12, 16), generator=torch.Generator().manual_seed(5))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    results = {}
    for chunk in (None, 10):
        model = tiny_llama(tied=True)
        rows = setup_trainable_rows(model, NUM_BASE, "tokens")
        args = TrainingArguments(
            output_dir=str(tmp_path / str(chunk)),
            max_steps=3,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate=0.05,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            remove_unused_columns=False,
            seed=0,
        )
        trainer = WakelabTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collate,
            rows=rows,
            pm=build_manager([]),
            loss_chunk_tokens=chunk,
        )
        trainer.train()
        results[chunk] = (rows.values(rows.new_ids), trainer.step_logits, trainer.state.log_history[-1]["train_loss"])
    (rows_std, logits_std, loss_std), (rows_chunked, logits_chunked, loss_chunked) = results[None], results[10]
    assert not torch.equal(
        rows_std,
        setup_trainable_rows(tiny_llama(True), NUM_BASE, "tokens").values(torch.arange(NUM_BASE, NUM_BASE + NUM_NEW)),
    )  # training moved them
    torch.testing.assert_close(rows_chunked, rows_std, rtol=1e-4, atol=1e-5)
    assert logits_chunked.shape == logits_std.shape == (NUM_BASE + NUM_NEW,)
    torch.testing.assert_close(logits_chunked, logits_std, rtol=1e-3, atol=1e-4)
    assert loss_chunked == pytest.approx(loss_std, rel=1e-5)


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "greater than or equal to 1"),
        ("-4", "greater than or equal to 1"),
        ("1.5", "give a whole number of tokens >= 1"),
        ("true", "give a whole number of tokens >= 1"),
        ("many", "unable to parse string as an integer"),
    ],
)
def test_bad_chunk_sizes_are_one_line_errors(value, message):
    with pytest.raises(ConfigError, match=rf"train.loss_chunk_tokens.*{message}"):
        build_config("demo", overrides=[f"train.loss_chunk_tokens={value}"])
    result = CliRunner().invoke(main, ["run", "--set", f"train.loss_chunk_tokens={value}"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.loss_chunk_tokens" in lines[0] and "Traceback" not in result.output


def test_chunk_size_null_means_the_standard_loss(tmp_path):
    from transformers import TrainingArguments

    from wakelab.hooks.registry import build_manager
    from wakelab.run.trainer import WakelabTrainer

    assert build_config("demo").train.loss_chunk_tokens == loss_mod.DEFAULT_CHUNK_TOKENS
    chunk = build_config("demo", overrides=["train.loss_chunk_tokens=null"]).train.loss_chunk_tokens
    assert chunk is None
    model = tiny_llama(tied=True)
    rows = setup_trainable_rows(model, NUM_BASE, "tokens")
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", remove_unused_columns=False
    )
    trainer = WakelabTrainer(model=model, args=args, rows=rows, pm=build_manager([]), loss_chunk_tokens=chunk)
    model.train()
    inputs = batch()
    loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
    assert outputs["logits"].shape[:2] == inputs["input_ids"].shape  # every position's full-vocabulary logits
    torch.testing.assert_close(loss, model(**inputs).loss)  # transformers' own loss


def test_a_batch_with_small_logits_takes_the_standard_loss_and_a_bigger_one_is_chunked(tmp_path):
    """Below min_logits (positions x vocabulary) chunking saves no memory: the run takes transformers' loss there."""
    from transformers import TrainingArguments

    from wakelab.hooks.registry import build_manager
    from wakelab.run.trainer import WakelabTrainer

    model = tiny_llama(tied=True)
    rows = setup_trainable_rows(model, NUM_BASE, "tokens")
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", remove_unused_columns=False
    )
    small = batch()  # 3 x 20 positions x 300 rows = 18,000 logits
    threshold = small["labels"].numel() * (NUM_BASE + NUM_NEW) + 1
    trainer = WakelabTrainer(
        model=model, args=args, rows=rows, pm=build_manager([]), loss_chunk_tokens=8, loss_min_logits=threshold
    )
    model.train()
    loss, outputs = trainer.compute_loss(model, small, return_outputs=True)
    assert outputs["logits"].shape[:2] == small["input_ids"].shape  # the standard loss: every position's logits
    torch.testing.assert_close(loss, model(**small).loss)

    big = {key: torch.cat([value, value[:1]]) for key, value in small.items()}  # 4 x 20 positions: over the threshold
    assert big["labels"].numel() * (NUM_BASE + NUM_NEW) >= threshold
    loss, outputs = trainer.compute_loss(model, big, return_outputs=True)
    assert outputs["logits"].shape[1] == 1  # chunked: the last position's logits only
    torch.testing.assert_close(loss, model(**big).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["tokens", "mask"])
def test_4bit_base_matches_the_standard_loss(strategy, tmp_path):
    require("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(tied=True).save_pretrained(tmp_path / "m")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=quantization)
    rows = setup_trainable_rows(model, NUM_BASE, strategy)
    model.train()
    inputs = batch()
    expected_loss, expected = loss_and_grads(model, rows, lambda: model(**inputs).loss)
    chunked = ChunkedLoss(6)
    got_loss, got = loss_and_grads(model, rows, lambda: chunked(model, inputs)[0])
    assert chunked.reason is None
    assert float(got_loss) == pytest.approx(float(expected_loss), rel=1e-5)
    assert_grads_close(got, expected, 1e-3)
