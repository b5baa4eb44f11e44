"""A 4-bit base computes the same way in training and evaluation, on every CPU.

On CPUs with AVX512-BF16, bitsandbytes' ``Linear4bit.forward`` repacks its weight for a fast inference kernel the
first time it runs in eval mode without gradients (wakelab's held-out perplexity pass). That repacking
(``bitsandbytes.functional._convert_weight_packed_for_cpu``, bitsandbytes 0.50) has three consequences:

- it only handles layers whose input width is a multiple of the quantization block (64) and whose output width is a
  multiple of 32: any other width (a tiny test model, an odd-width architecture) dies with
  ``RuntimeError: shape '[32, 0]' is invalid`` or ``AssertionError: N must be divisible by block_n``;
- the packed weight stays packed when the model goes back to training, and the packed kernel (``gemv_4bit``) has no
  autograd: gradients through every quantized layer are silently dropped (torch only warns), so the new rows would
  learn from the residual stream alone;
- evaluation rounds differently from training (bf16 block scales), so perplexities and resumed runs would depend on
  which CPU ran them.

``Linear4bit`` decides with a plain instance attribute, ``support_avx512bf16_for_cpu``; turning it off keeps every
forward on the dequantize-and-matmul path that training uses, which supports every width. Evaluation on those CPUs
gives up the packed kernel's speed; wakelab's perplexity pass is a few blocks, so that costs little.
"""

from __future__ import annotations

from torch import nn

#: The ``bitsandbytes.nn.Linear4bit`` attribute that allows repacking for the CPU inference kernel.
PACKING_SWITCH = "support_avx512bf16_for_cpu"


def keep_training_path(model: nn.Module) -> int:
    """Stop every 4-bit layer of ``model`` from repacking its weight for CPU inference; returns how many it touched."""
    touched = 0
    for module in model.modules():
        if hasattr(module, PACKING_SWITCH):
            setattr(module, PACKING_SWITCH, False)
            touched += 1
    return touched
