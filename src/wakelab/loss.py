"""The causal-LM loss, chunked over tokens, so the whole batch's vocabulary-sized logits never exist at once.

At P1's shape (172,451 rows) the standard loss holds ``batch x seq x vocab`` fp32 logits, their log-softmax and
their gradient: the largest tensors of the whole step. Here the model runs with ``logits_to_keep=1`` (plugins and
the recorder still get last-position logits, computed for just those positions); a forward hook on its decoder
keeps the final hidden states, and the loss walks them ``chunk_tokens`` at a time. Per chunk it multiplies by each
part of the head (``tokens``: base rows and new rows, never concatenated), combines the parts' log-sum-exps, and
computes the gradients of hidden states and trainable head parts right away, so backward only scales them: no
chunk's logits outlive the chunk and none is recomputed. Frozen parts (``tokens``' base rows) get no gradient
product at all. The arithmetic is the standard loss's (fp32 log-softmax over the compute-dtype logits; mean over
the labelled tokens, or sum / ``num_items_in_batch`` under gradient accumulation), so loss and gradients match it
to floating-point rounding.

Why hand-written: Cut Cross-Entropy needs Triton (its CPU path needs ``torch.compile``) and one weight matrix, so a
split head would be concatenated every step; Liger's fused linear cross-entropy is GPU-only; torchtune's chunked
cross-entropy still keeps every chunk's logits for backward. This is plain PyTorch, CPU and CUDA alike.

Heads it cannot serve (a bias, logit soft-capping or scaling, any other post-processing, a forward without
``logits_to_keep``) get the standard loss with a warning naming why: found from the config before the first step
and, as a net for what the config does not say, by comparing the model's own last-position logits with the head
applied to the decoder's output on the first step.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import logs
from .rows import NewRowsHead

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 256
# A batch whose whole logits hold fewer values than this (64 MiB in fp32) takes the standard loss in training runs:
# its logits are smaller than one chunk at P1's vocabulary (256 x 172,451), so chunking saves no memory worth its
# fixed per-step cost (about 8% of a step on a 4-layer, 400-token model: benchmarks/engine_overhead.py).
SMALL_LOGITS = 1 << 24
_WARNED: set[str] = set()

# Config attributes of transformers models that change the logits after the head.
_POST_PROCESSING = {
    "final_logit_softcapping": "soft-caps its logits",
    "logit_softcapping": "soft-caps its logits",
    "logit_scale": "scales its logits",
    "logits_scaling": "scales its logits",
    "output_multiplier_scale": "scales its logits",
}


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / accelerate wrappers
        model = model.module
    return model


def head_parts(head: nn.Module | None) -> list[torch.Tensor] | str:
    """The head's weight blocks in vocabulary order, or why the chunked loss cannot serve this head."""
    if isinstance(head, NewRowsHead):
        if head.bias is not None:
            return "the output head has a bias"
        return list(head._weights)
    if type(head) is nn.Linear:
        if head.bias is not None:
            return "the output head has a bias"
        return [head.weight]
    return f"the output head is a {type(head).__name__}, not a linear layer"


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the chunked loss cannot stand in for this model's own loss, from its modules and config; None if it can."""
    model = _unwrap(model)
    parts = head_parts(model.get_output_embeddings())
    if isinstance(parts, str):
        return parts
    config = getattr(model, "config", None)
    for key, what in _POST_PROCESSING.items():
        value = getattr(config, key, None)
        if value not in (None, 0, 1, 1.0, False):
            return f"the model {what} ({key}={value})"
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepted = {}
    if "logits_to_keep" not in accepted:
        return f"{type(model).__name__}.forward takes no logits_to_keep"
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    if decoder is None or decoder is model:
        return f"{type(model).__name__} has no separate decoder to take hidden states from"
    return None


class ChunkedLoss:
    """The chunked loss for one model: call it where Trainer would call the model; None means use the standard loss.

    It remembers a fallback: once a model is found unsupported, every later call returns None at once. With
    ``min_logits``, a batch whose positions x vocabulary fall below it returns None too (the standard loss is cheaper
    there and no bigger than a chunk); the default, 0, chunks every batch.
    """

    def __init__(self, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, warn=None, min_logits: int = 0):
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
        self.chunk_tokens = chunk_tokens
        self.min_logits = min_logits
        self.reason: str | None = None
        self._probed = False
        self._warn = warn or logs.warn

    def _fall_back(self, reason: str) -> None:
        self.reason = reason
        if reason not in _WARNED:  # once a process: training and both perplexity passes would each say it
            _WARNED.add(reason)
            self._warn(f"{reason}: the chunked loss cannot serve it; using the standard loss (full-vocabulary logits)")

    def __call__(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, Any] | None:
        """(loss, outputs whose logits hold the last position only), or None when the standard loss must do it.

        ``num_items_in_batch`` given: sum over labelled tokens / it (Trainer's gradient accumulation); else the mean.
        """
        if self.reason is not None:
            return None
        inner = _unwrap(model)
        if not self._probed:
            reason = unsupported_reason(inner)
            if reason is not None:
                self._fall_back(reason)
                return None
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return None
        head = inner.get_output_embeddings()
        if (
            self.min_logits
            and self._logits_values(labels if labels is not None else shift_labels, head) < self.min_logits
        ):
            return None
        captured: list[torch.Tensor] = []
        handle = inner.get_decoder().register_forward_hook(lambda module, args, out: captured.append(out[0]))
        try:
            outputs = model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        hidden = captured[-1]
        if not self._probed:
            self._probed = True
            with torch.no_grad():
                expected = head(hidden[:, -1:]).float()
                got = outputs["logits"][:, -1:].float()
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-6):
                self._fall_back(
                    "the model's logits differ from its output head applied to its decoder's output "
                    "(it post-processes them)"
                )
                return None
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        targets = shift_labels.reshape(-1).to(hidden.device)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if targets.shape[0] != flat.shape[0]:
            raise ValueError(f"{targets.shape[0]} labels for {flat.shape[0]} positions")
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        total = chunked_cross_entropy(
            flat.index_select(0, keep), targets.index_select(0, keep), head_parts(head), self.chunk_tokens
        )
        if num_items_in_batch is None:
            loss = total / keep.numel()
        else:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(total.device)
            loss = total / num_items_in_batch
        return loss, outputs

    @staticmethod
    def _logits_values(labels: torch.Tensor, head: nn.Module) -> int:
        """How many values the standard loss's logits would hold for this batch."""
        parts = head_parts(head)
        vocab = sum(p.shape[0] for p in parts) if isinstance(parts, list) else 0
        return labels.numel() * vocab


def chunked_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, parts: list[torch.Tensor], chunk_tokens: int
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ concat(parts).T`` against ``targets``, without building that product.

    ``hidden`` is ``[n, d]``, ``targets`` ``[n]`` ids into the concatenated vocabulary (no ignored ones), ``parts``
    the head's weight blocks in vocabulary order. Under autocast the products run in its dtype, as ``F.linear`` would.
    """
    vocab = sum(p.shape[0] for p in parts)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise IndexError(
            f"label ids must lie in [0, {vocab}) (or be {IGNORE_INDEX}); got {int(targets.min())}..{int(targets.max())}"
        )
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype
    # Under no_grad a Function still sees needs_input_grad set: say whether backward can come at all.
    return _ChunkedHeadCE.apply(hidden, targets, chunk_tokens, compute_dtype, torch.is_grad_enabled(), *parts)


class _ChunkedHeadCE(torch.autograd.Function):
    """Forward computes the summed loss and, when needed, its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, targets, chunk_tokens, compute_dtype, grad_enabled, *parts):
        need_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_part = [grad_enabled and need for need in ctx.needs_input_grad[5:]]
        device = hidden.device
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + part.shape[0])
        with torch.autocast(device.type, enabled=False):
            weights = [p.detach().to(compute_dtype) for p in parts]
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if need_hidden else None
            grad_parts = [
                torch.zeros(p.shape, dtype=torch.float32, device=device) if need else None
                for p, need in zip(parts, need_part, strict=False)
            ]
            total = torch.zeros((), dtype=torch.float32, device=device)
            for start in range(0, hidden.shape[0], chunk_tokens):
                h = hidden[start : start + chunk_tokens].detach().to(compute_dtype)
                t = targets[start : start + chunk_tokens]
                logits = [F.linear(h, w).float() for w in weights]  # [c, V_i] each, fp32 like the standard loss
                picked = torch.empty(t.shape[0], dtype=torch.float32, device=device)
                hits = []
                for z, lo, hi in zip(logits, offsets, offsets[1:], strict=False):
                    rows = ((t >= lo) & (t < hi)).nonzero().squeeze(1)
                    cols = t.index_select(0, rows) - lo
                    picked[rows] = z[rows, cols]
                    hits.append((rows, cols))
                # log-sum-exp over all parts, in place (no second logits-sized buffer): max, exp, sum.
                top = torch.stack([z.amax(dim=-1) for z in logits]).amax(dim=0)
                sums = torch.zeros_like(top)
                for z in logits:
                    sums += z.sub_(top.unsqueeze(1)).exp_().sum(dim=-1)
                total += (top + sums.log() - picked).sum()
                if not (need_hidden or any(need_part)):
                    continue
                inverse = sums.reciprocal().unsqueeze(1)
                for i, (z, (rows, cols)) in enumerate(zip(logits, hits, strict=False)):
                    grad_z = z.mul_(inverse)  # softmax
                    grad_z[rows, cols] -= 1.0
                    grad_z = grad_z.to(compute_dtype)
                    exact = compute_dtype == torch.float32  # accumulate in place; else in fp32 from each product
                    if need_hidden:
                        rows_grad = grad_hidden[start : start + chunk_tokens]
                        if exact:
                            rows_grad.addmm_(grad_z, weights[i])
                        else:
                            rows_grad.add_(grad_z @ weights[i])
                    if need_part[i]:
                        if exact:
                            grad_parts[i].addmm_(grad_z.t(), h)
                        else:
                            grad_parts[i].add_(grad_z.t() @ h)
                    del grad_z
                del logits
        ctx.grads = (grad_hidden, grad_parts)
        ctx.dtypes = (hidden.dtype, [p.dtype for p in parts])
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_parts = ctx.grads
        hidden_dtype, part_dtypes = ctx.dtypes
        ctx.grads = None
        scale = grad_total.float()
        out_hidden = None if grad_hidden is None else grad_hidden.mul_(scale).to(hidden_dtype)
        out_parts = [
            None if g is None else g.mul_(scale).to(dtype) for g, dtype in zip(grad_parts, part_dtypes, strict=True)
        ]
        return (out_hidden, None, None, None, None, *out_parts)
