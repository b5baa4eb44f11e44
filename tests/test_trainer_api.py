"""The private corners of transformers (and torch) that wakelab still leans on: each fails here, by name, first.

``WakelabTrainer`` goes through Trainer's public methods and callbacks wherever they exist. What is left
(``trainer.PRIVATE_TRAINER_API``, the PEFT flag transformers' quantization check reads, the public methods whose
parameters wakelab passes by name) is checked against the *installed*
transformers, so an upgrade that moves one of them fails with the name of what moved, not with a wrong checkpoint.
The order of Trainer's step (mask in ``training_step``, then clip) is tested by behaviour in test_rows.py:
``test_mask_strategy_zeroes_base_grads_before_clipping``.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainerCallback

from wakelab.run.trainer import PEFT_LOADED_FLAG, PRIVATE_TRAINER_API, _row_adapter_accepted

TRANSFORMERS = version("transformers")

#: Public Trainer methods wakelab overrides, with the parameters its overrides pass on to them.
PUBLIC_OVERRIDES = {
    "training_step": ("model", "inputs", "num_items_in_batch"),
    "compute_loss": ("model", "inputs", "return_outputs", "num_items_in_batch"),
    "get_decay_parameter_names": ("model",),
    "create_optimizer": ("model",),
    "create_scheduler": ("num_training_steps", "optimizer"),
    "save_model": ("output_dir", "_internal_call"),
}


def _missing_parameters(cls, name: str, wanted: tuple[str, ...]) -> list[str] | None:
    """None when ``cls.name`` does not exist, else the wanted parameters its signature lacks."""
    fn = getattr(cls, name, None)
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    return [p for p in wanted if p not in params]


@pytest.mark.parametrize("name", sorted(PRIVATE_TRAINER_API))
def test_private_trainer_methods_still_exist(name):
    missing = _missing_parameters(Trainer, name, PRIVATE_TRAINER_API[name])
    assert missing is not None, (
        f"transformers {TRANSFORMERS} has no Trainer.{name}, which WakelabTrainer overrides "
        "(src/wakelab/run/trainer.py): find the public seam that replaced it"
    )
    assert not missing, (
        f"transformers {TRANSFORMERS} changed Trainer.{name}: it no longer takes {missing}, which WakelabTrainer "
        "passes (src/wakelab/run/trainer.py)"
    )


@pytest.mark.parametrize("name", sorted(PUBLIC_OVERRIDES))
def test_public_trainer_methods_take_what_wakelab_passes(name):
    missing = _missing_parameters(Trainer, name, PUBLIC_OVERRIDES[name])
    assert missing is not None, f"transformers {TRANSFORMERS} has no Trainer.{name}, which WakelabTrainer overrides"
    assert not missing, f"transformers {TRANSFORMERS} changed Trainer.{name}: it no longer takes {missing}"


def test_callbacks_wakelab_uses_exist():
    for name in ("on_train_begin", "on_pre_optimizer_step", "on_step_end", "on_log", "on_save", "on_train_end"):
        found = callable(getattr(TrainerCallback, name, None))
        assert found, f"transformers {TRANSFORMERS} has no TrainerCallback.{name}, which HookBridge implements"


def test_quantized_base_is_accepted_only_through_the_peft_flag():
    """transformers refuses to train a quantized model without an adapter; the flag is what it reads."""
    try:
        from transformers.trainer_utils import validate_quantization_for_training as validate
    except ImportError:
        pytest.fail(
            f"transformers {TRANSFORMERS} has no trainer_utils.validate_quantization_for_training: check how Trainer "
            f"now refuses a quantized base, and whether {PEFT_LOADED_FLAG} still gets wakelab's 4-bit runs past it"
        )
    model = torch.nn.Linear(2, 2)
    model.is_quantized = True
    model.hf_quantizer = SimpleNamespace(is_trainable=True, is_qat_trainable=False)
    with pytest.raises(ValueError):
        validate(model)  # the check is still there: without the flag a 4-bit base is refused
    with _row_adapter_accepted(model):
        try:
            validate(model)
        except ValueError as exc:
            pytest.fail(
                f"transformers {TRANSFORMERS} no longer accepts a quantized base on {PEFT_LOADED_FLAG} "
                f"(src/wakelab/run/trainer.py, _row_adapter_accepted): {exc}"
            )
    assert not hasattr(model, PEFT_LOADED_FLAG)  # set only while Trainer checks
