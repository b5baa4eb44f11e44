"""Built-in ``mask`` plugin: zero the base rows' gradients so only the new rows learn.

Runs before gradient clipping, so the clip and the logged grad norm see only what is trained. With
``train.trainable=tokens`` there is no base-row gradient to mask and this plugin does nothing.
"""

from __future__ import annotations

import wakelab


@wakelab.hookimpl
def mask_grads(ctx):
    if ctx.rows.strategy != "mask":
        return
    grad = ctx.rows.grad_matrix()
    if grad is not None:
        grad[: ctx.rows.num_base].zero_()
