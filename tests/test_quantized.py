"""A 4-bit base evaluates on the path it trains on: any width works on every CPU, and gradients survive evaluation."""

from __future__ import annotations

import math

import torch
from conftest import build_tiny_llama, tiny_overrides
from optional import require

from wakelab import model as model_mod
from wakelab.config import ModelConfig, build_config
from wakelab.data.corpus import collate
from wakelab.quantized import PACKING_SWITCH
from wakelab.run import engine
from wakelab.run.evaluation import perplexity


def load_4bit(folder):
    require("bitsandbytes")
    return model_mod.load_model(ModelConfig(name_or_path=str(folder), load_in_4bit=True), str(folder))


def input_grad(model, ids: torch.Tensor) -> torch.Tensor:
    """The gradient of the loss w.r.t. the input embeddings: it flows back through every quantized layer."""
    model.train()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=ids).loss.backward()
    return embeds.grad


def test_perplexity_pass_leaves_4bit_layers_trainable_and_unchanged(tiny_model):
    """bitsandbytes would repack weights for CPU inference here; then training would drop their gradients."""
    model = load_4bit(tiny_model)
    layers = [m for m in model.modules() if hasattr(m, PACKING_SWITCH)]
    assert len(layers) == 2 * 7, "every projection of both layers is 4-bit"
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    before = input_grad(model, ids)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    assert math.isfinite(perplexity(model, dataset, batch_size=2, max_blocks=2))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    after = input_grad(model, ids)
    assert torch.equal(before, after), "evaluation changed how the 4-bit layers compute or differentiate"
    with torch.no_grad():
        model.eval()
        evaluated = model(**collate(dataset)).loss
        model.train()
        trained = model(**collate(dataset)).loss
    assert torch.equal(evaluated, trained), "evaluation and training compute differently"


def test_4bit_run_with_hidden_size_96_trains_and_evaluates(tmp_path_factory, texts):
    """96 is no multiple of 64 (bitsandbytes' CPU packing block): the run must neither crash nor skip evaluation."""
    require("bitsandbytes")
    odd = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-96"), hidden=96)
    overrides = tiny_overrides(odd, texts, **{"model.load_in_4bit": True, "train.max_steps": 4})
    result = engine.run(build_config(None, None, overrides), progress=False)
    assert result.status == "FINISHED"
    before, after = result.metrics["heldout_perplexity_before"], result.metrics["heldout_perplexity_after"]
    assert math.isfinite(before) and math.isfinite(after) and after != before
    assert result.metrics["new_row_displacement"] > 0
