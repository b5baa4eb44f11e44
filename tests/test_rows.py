"""Only new rows learn: base rows stay bit-identical, the tied head equals the embeddings, in fp32 and 4-bit."""

from __future__ import annotations

import pytest
import torch
from conftest import loaded_plugin, tiny_overrides
from optional import require
from safetensors.torch import load_file

from wakelab.config import build_config
from wakelab.rows import NewRowsEmbedding, NewRowsHead, setup_trainable_rows
from wakelab.run import engine


def base_rows_before(tiny_model) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).get_input_embeddings().weight.detach().clone()


def run_and_keep_model(tiny_model, texts, tmp_path, **extra):
    plugin = tmp_path / "keep_model.py"
    plugin.write_text(
        "import wakelab\nKEPT = {}\n"
        "@wakelab.hookimpl\n"
        "def on_run_end(run, status):\n"
        "    KEPT['model'] = run.model\n    KEPT['rows'] = run.rows\n"
    )
    overrides = tiny_overrides(tiny_model, texts, **extra)
    overrides["plugins"] = [str(plugin)]
    result = engine.run(build_config(None, None, overrides), progress=False)
    return result, loaded_plugin(plugin).KEPT


@pytest.mark.parametrize("strategy", ["tokens", "mask"])
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit"])
def test_base_rows_bit_identical_after_20_steps_with_weight_decay(tiny_model, texts, tmp_path, strategy, quantized):
    if quantized:
        require("bitsandbytes")
    extra = {"train.trainable": strategy, "train.weight_decay": 0.1, "train.max_steps": 20, "train.lr": 5e-2}
    if quantized:
        extra["model.load_in_4bit"] = True
    result, kept = run_and_keep_model(tiny_model, texts, tmp_path, **extra)
    rows, model = kept["rows"], kept["model"]
    before = base_rows_before(tiny_model).to(rows.dtype)
    after = rows.values(torch.arange(rows.num_base))
    assert torch.equal(after.view(torch.uint8), before.view(torch.uint8)), "base rows moved"
    # The new rows did learn.
    saved = load_file(result.output_dir / "final" / "new_rows.safetensors")
    assert result.metrics["new_row_displacement"] > 0
    assert saved["rows"].shape[0] == rows.num_total - rows.num_base
    # The head is tied: it is the embedding matrix, new rows included.
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    assert torch.equal(head, emb)
    if quantized:
        assert getattr(model, "is_quantized", False)


def test_tokens_strategy_matches_a_plain_embedding():
    torch.manual_seed(0)
    base = torch.randn(10, 4)
    new = torch.randn(3, 4)
    split = NewRowsEmbedding(base.clone(), new.clone())
    full = torch.nn.Embedding.from_pretrained(torch.cat([base, new]))
    ids = torch.tensor([[0, 10, 3, 12, 11, 9]])
    assert torch.equal(split(ids), full(ids))
    head = NewRowsHead(split.base_weight, split.new_weight)
    hidden = torch.randn(1, 2, 4)
    assert torch.allclose(head(hidden), hidden @ torch.cat([base, new]).T, atol=1e-6)
    # Gradients only reach the new rows.
    split(ids).sum().backward()
    assert split.base_weight.grad is None
    assert split.new_weight.grad.abs().sum() > 0


def test_tokens_strategy_keeps_rows_dtype_without_upcasting(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    num_base = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(num_base + 5, mean_resizing=False)
    rows = setup_trainable_rows(model, num_base, "tokens", "bfloat16")
    assert rows.dtype == torch.bfloat16
    assert [p.dtype for p in model.parameters() if p.requires_grad] == [torch.bfloat16]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5 * rows.dim


def test_mask_strategy_zeroes_base_grads_before_clipping(tiny_model, texts, tmp_path):
    """The logged grad norm is the same under mask and tokens: clipping never saw base-row gradients."""
    import mlflow

    norms = {}
    for strategy in ("tokens", "mask"):
        overrides = tiny_overrides(tiny_model, texts, **{"train.trainable": strategy, "output_dir": f"out-{strategy}"})
        result = engine.run(build_config(None, None, overrides), progress=False)
        history = mlflow.MlflowClient().get_metric_history(result.run_id, "grad_norm")
        norms[strategy] = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert norms["tokens"] and norms["tokens"] == pytest.approx(norms["mask"], rel=1e-4)


def test_trainer_masks_every_step_without_the_hook_bridge(tiny_model, tmp_path):
    """WakelabTrainer on its own (no HookBridge) still masks base rows at every optimizer step."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from wakelab.data.corpus import collate
    from wakelab.hooks.registry import build_manager
    from wakelab.run.trainer import WakelabTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    num_base = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(num_base + 4, mean_resizing=False)
    rows = setup_trainable_rows(model, num_base, "mask")
    before = rows.values(torch.arange(num_base)).clone()
    ids = torch.randint(0, num_base + 4, (16, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = WakelabTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collate, rows=rows, pm=build_manager(["mask"])
    )
    trainer.train()
    assert torch.equal(rows.values(torch.arange(num_base)), before)
    assert not torch.equal(rows.values(rows.new_ids), torch.zeros_like(rows.values(rows.new_ids)))


def test_shared_reads_are_views_only_for_one_consecutive_run_inside_one_tensor():
    from wakelab.rows import RowAccess, _Segment

    base, new = torch.randn(6, 3), torch.randn(4, 3)  # `tokens`: ids 0-5 in one tensor, 6-9 in another
    rows = RowAccess("tokens", 6, 10, [_Segment(0, 6, base), _Segment(6, 10, new)])
    assert RowAccess.as_run(torch.arange(6, 10)) == range(6, 10)
    assert RowAccess.as_run(torch.tensor([6, 8])) is None
    assert RowAccess.as_run(range(0, 10, 2)) is None
    assert RowAccess.as_run(torch.tensor([], dtype=torch.long)) is None

    for ids in (range(6, 10), torch.arange(7, 9)):
        view = rows.values(ids, share=True)
        assert view.data_ptr() == new[ids[0] - 6 :].data_ptr() and torch.equal(view, new[ids[0] - 6 : ids[-1] - 5])
    for ids in (torch.arange(4, 8), torch.tensor([6, 8])):  # across two tensors, or not consecutive: copies
        copy = rows.values(ids, share=True)
        assert torch.equal(copy, torch.cat([base, new])[ids])
        assert copy.untyped_storage().data_ptr() not in (
            base.untyped_storage().data_ptr(),
            new.untyped_storage().data_ptr(),
        )
    assert rows.values(range(6, 10)).data_ptr() != new.data_ptr()  # share=False: always a copy


def test_the_tokens_split_keeps_the_loaded_base_rows_without_a_copy(tiny_model):
    """The embedding as loaded becomes the frozen base: the resized matrix's copy of it is not kept as well."""
    from transformers import AutoModelForCausalLM

    from wakelab.model import expand_embeddings
    from wakelab.rows import BaseRows

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    num_base = model.get_input_embeddings().weight.shape[0]
    loaded = model.get_input_embeddings().weight.detach()  # resize swaps the Parameter's data in place
    held = BaseRows.of(model, num_base)
    expand_embeddings(model, num_base + 7)
    assert held.equal_to(model.get_input_embeddings().weight)
    setup_trainable_rows(model, num_base, "tokens", base_rows=held)
    base = model.get_input_embeddings().base_weight
    assert base.data_ptr() == loaded.data_ptr() and not base.requires_grad
    # Without them, or when they no longer match (another dtype), the split copies the resized matrix's base rows.
    other = AutoModelForCausalLM.from_pretrained(tiny_model)
    expand_embeddings(other, num_base + 7)
    resized = other.get_input_embeddings().weight
    setup_trainable_rows(other, num_base, "tokens", base_rows=BaseRows(held.embedding.to(torch.float64)))
    copied = other.get_input_embeddings().base_weight
    assert copied.data_ptr() != resized.data_ptr() and torch.equal(copied, resized[:num_base])


def test_restored_matrix_with_other_base_rows_is_not_mistaken_for_the_loaded_ones(tiny_model):
    from transformers import AutoModelForCausalLM

    from wakelab.rows import BaseRows

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    weight = model.get_input_embeddings().weight
    held = BaseRows.of(model, weight.shape[0] - 1)
    changed = weight.detach().clone()
    changed[3, 0] += 1.0
    assert held.equal_to(weight.detach().clone(), chunk=2)
    assert not held.equal_to(changed, chunk=2)


@pytest.mark.parametrize("rows_dtype", ["float32", "bfloat16"])
def test_displacement_is_measured_from_the_rows_the_training_started_from(tiny_model, texts, tmp_path, rows_dtype):
    """The metric reads initial_rows.safetensors and casts it as the split did: exactly the start of training."""
    result = engine.run(
        build_config(None, None, tiny_overrides(tiny_model, texts, **{"train.rows_dtype": rows_dtype})), progress=False
    )
    start = load_file(result.output_dir / "initial_rows.safetensors")["rows"]
    end = load_file(result.output_dir / "final" / "new_rows.safetensors")["rows"]
    dtype = getattr(torch, rows_dtype)
    expected = (end.to(dtype).float() - start.to(dtype).float()).norm(dim=1).mean()
    assert result.metrics["new_row_displacement"] == pytest.approx(float(expected), rel=1e-6)
    assert result.metrics["new_row_displacement"] > 0


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_tied_lookup_adds_a_sparse_gradient_to_the_same_dense_total(tied):
    """Tied, the lookup's gradient comes sparse and the head's dense one absorbs it: the same total as two dense
    ones. Untied there is no dense one to absorb it, so the lookup stays dense (AdamW refuses sparse gradients)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def grads(sparse: bool | None) -> tuple[torch.Tensor, bool]:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
        model = LlamaForCausalLM(config)
        setup_trainable_rows(model, 30, "tokens")
        embedding = model.get_input_embeddings()
        chosen = embedding.sparse_new_grad
        if sparse is not None:
            embedding.sparse_new_grad = sparse
        ids = torch.tensor([[1, 31, 35, 31, 2, 39, 30, 5]])
        model(input_ids=ids, labels=ids).loss.backward()
        return embedding.new_weight.grad, chosen

    grad, chosen = grads(None)
    assert chosen is tied and not grad.is_sparse
    if tied:
        torch.testing.assert_close(grad, grads(False)[0], rtol=0, atol=1e-7)
