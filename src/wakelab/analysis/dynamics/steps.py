"""Analyses of recorded training dynamics, streamed one step at a time.

A run records, for every optimizer step, the trained embedding rows (``[rows, d]``, usually bf16, the storage
dtype) and the Adam state for them. A long run does not fit in memory, so every function here takes an iterable
(a generator is fine) and keeps at most the previous and the current step alive, plus the current optimizer state
for :func:`lattice_hops`. The results are lists of small dicts of Python numbers, one per step or step pair.

Step sources: an item may be a tensor (its position in the stream is then its step number) or a
``(step, tensor)`` pair. To stream from a loader that gives step ``t`` on demand, wrap it with
:func:`from_callable`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "bf16_ulp",
    "centroid_track",
    "displacement",
    "displacement_summary",
    "freeze_onset",
    "freeze_verdict",
    "adam_update",
    "from_callable",
    "lattice_hops",
]

StepItem = Tensor | tuple[int, Tensor]

#: Integer dtype of the same width, to compare stored floats bit for bit.
_BITS_DTYPE = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}

_END = object()

#: Smallest positive normal bf16 (same exponent range as float32).
_BF16_MIN_NORMAL = 2.0**-126
#: Spacing of bf16 values below the smallest normal: 7 stored mantissa bits, so 2^(-126-7).
_BF16_SUBNORMAL_SPACING = 2.0**-133


# --------------------------------------------------------------------------------------------------------------
# Step sources
# --------------------------------------------------------------------------------------------------------------


def from_callable(load: Callable[[int], Tensor], step_numbers: Iterable[int]) -> Iterator[tuple[int, Tensor]]:
    """Stream ``(t, load(t))`` for each step number; the loader is only called when the next step is pulled."""
    for t in step_numbers:
        yield t, load(t)


def _numbered(steps: Iterable[StepItem]) -> Iterator[tuple[int, Tensor]]:
    """Normalise a step stream to ``(step, tensor)`` pairs; bare tensors are numbered by position."""
    for position, item in enumerate(steps):
        if isinstance(item, Tensor):
            yield position, item
        else:
            step, tensor = item
            yield int(step), tensor


# --------------------------------------------------------------------------------------------------------------
# Displacement between two states
# --------------------------------------------------------------------------------------------------------------


def _per_row(x: Tensor) -> Tensor:
    """``x`` as ``[rows, values per row]``; ``reshape(rows, -1)`` cannot infer the width of zero rows."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def displacement(a: Tensor, b: Tensor) -> Tensor:
    """L2 distance per row between two states of the same rows, in float32 (bf16 differences would round)."""
    if a.shape != b.shape:
        raise ValueError(f"states differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return _per_row(b.detach().to(torch.float32) - a.detach().to(torch.float32)).norm(dim=1)


def _basic_summary(values: Tensor) -> dict:
    """Count, max, mean and median of a 1-D tensor; ``None`` statistics when empty."""
    if values.numel() == 0:
        return {"count": 0, "max": None, "mean": None, "median": None}
    values = values.to(torch.float64)
    return {
        "count": int(values.numel()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "median": float(np.median(values.cpu().numpy())),
    }


def displacement_summary(disp: Tensor, mask: Tensor | None = None) -> dict:
    """Summarise per-row displacements: ``{"all": {...}}`` plus ``trained``/``untrained`` when ``mask`` is given.

    ``mask`` is a boolean tensor over rows, True for rows that received gradient (trained). Each part has
    ``count, max, mean, median``; the median is the midpoint of the two middle values for an even count. The
    result always has ``all`` so callers can read it the same way with or without a mask.
    """
    disp = disp.detach().reshape(-1)
    summary = {"all": _basic_summary(disp)}
    if mask is not None:
        mask = mask.reshape(-1).to(torch.bool)
        if mask.numel() != disp.numel():
            raise ValueError(f"mask has {mask.numel()} entries for {disp.numel()} rows")
        summary["trained"] = _basic_summary(disp[mask])
        summary["untrained"] = _basic_summary(disp[~mask])
    return summary


def freeze_verdict(disp: Tensor, threshold: float) -> dict:
    """Call the rows frozen when their mean displacement is below ``threshold`` (strictly).

    Returns ``frozen, mean, threshold``. An empty ``disp`` has no evidence of movement and counts as frozen with
    mean 0.
    """
    mean = float(disp.detach().to(torch.float64).mean()) if disp.numel() else 0.0
    return {"frozen": mean < threshold, "mean": mean, "threshold": float(threshold)}


# --------------------------------------------------------------------------------------------------------------
# Freeze onset
# --------------------------------------------------------------------------------------------------------------


def _bits(x: Tensor) -> Tensor:
    """The raw bits of a float tensor as a same-width integer tensor."""
    try:
        return x.view(_BITS_DTYPE[x.dtype])
    except KeyError:
        raise TypeError(f"cannot compare bits of dtype {x.dtype}") from None


def _unchanged_rows(prev: Tensor, cur: Tensor) -> Tensor:
    """Boolean per row: every stored value is bit-identical to the previous step.

    Bits, not ``==``: float equality calls ``-0.0 == 0.0`` equal and ``nan != nan``, while the question here is
    whether the optimizer wrote a different value into storage at all. A bf16 row whose updates all rounded
    away keeps exactly the same bits; any real movement, however small, changes at least one bit.
    """
    if prev.dtype != cur.dtype or prev.shape != cur.shape:
        raise ValueError(f"steps differ: {prev.dtype} {tuple(prev.shape)} vs {cur.dtype} {tuple(cur.shape)}")
    same = _bits(prev.detach().contiguous()) == _bits(cur.detach().contiguous())
    return _per_row(same).all(dim=1)


def freeze_onset(steps_iter: Iterable[StepItem]) -> list[dict]:
    """For each consecutive pair of steps, how much of the matrix stopped changing.

    Yields one record per pair, numbered by the later step: ``step``, ``unchanged_share`` (share of rows
    bit-identical to the previous step), ``unchanged_rows``, ``rows`` and ``mean_displacement`` (float32 L2).
    Streams: only the previous and the current step are held.
    """
    records: list[dict] = []
    prev: Tensor | None = None
    for step, cur in _numbered(steps_iter):
        if prev is not None:
            unchanged = _unchanged_rows(prev, cur)
            rows = int(unchanged.numel())
            records.append(
                {
                    "step": step,
                    "unchanged_share": float(unchanged.sum()) / rows if rows else 0.0,
                    "unchanged_rows": int(unchanged.sum()),
                    "rows": rows,
                    "mean_displacement": float(displacement(prev, cur).mean()) if rows else 0.0,
                }
            )
        prev = cur
    return records


# --------------------------------------------------------------------------------------------------------------
# bf16 lattice
# --------------------------------------------------------------------------------------------------------------


def bf16_ulp(x: Tensor) -> Tensor:
    """Spacing of bf16 values at ``x`` (its "unit in the last place"), as float32.

    bf16 keeps 7 stored mantissa bits, so between ``2^e`` and ``2^(e+1)`` the representable values are
    ``2^(e-7)`` apart: for a normal number ``|x|`` in ``[2^e, 2^(e+1))`` the ULP is ``2^(e-7)``. ``x`` is first
    rounded to bf16, so the ULP is that of the value actually stored. Zeros and subnormals (``|x| < 2^-126``) get
    the fixed subnormal spacing ``2^-133``; inf and NaN give NaN.

    Why it matters: a bf16 weight updated in place only changes if the update moves it at least half an ULP (to
    the rounding midpoint). Adam's step size is roughly ``lr`` per coordinate, so once ``lr`` falls below half
    the ULP of a weight (e.g. lr 1e-4 against |w| ~ 0.05, ULP 2.4e-4) that coordinate freezes even though its
    gradient is nonzero.
    """
    stored = x.detach().to(torch.bfloat16).to(torch.float32).abs()
    _, exponent = torch.frexp(stored)  # stored = m * 2^exponent, m in [0.5, 1): floor(log2) = exponent - 1
    ulp = torch.ldexp(torch.ones_like(stored), exponent - 8)
    ulp = torch.where(stored < _BF16_MIN_NORMAL, torch.full_like(ulp, _BF16_SUBNORMAL_SPACING), ulp)
    return torch.where(torch.isfinite(stored), ulp, torch.full_like(ulp, float("nan")))


def _bf16_gap(p: Tensor, step: Tensor) -> Tensor:
    """Distance from bf16 ``p`` to its neighbour in the direction ``p - step`` moves it.

    Equal to :func:`bf16_ulp` except for an exact power of two moving towards zero, where the binade below is
    twice as dense and the gap is half an ULP.
    """
    stored = p.to(torch.bfloat16).to(torch.float32)
    ulp = bf16_ulp(stored)
    mantissa, _ = torch.frexp(stored.abs())
    towards_zero = (torch.sign(step) == torch.sign(stored)) & (stored != 0)
    power_of_two = (mantissa == 0.5) & (stored.abs() > _BF16_MIN_NORMAL)
    return torch.where(towards_zero & power_of_two, ulp / 2, ulp)


def adam_update(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    lr: float,
    step: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> Tensor:
    """The AdamW step ``p_new = p - update`` implied by recorded state, in float32.

    ``update = lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + lr * wd * p``, with ``m, v`` the state
    after step ``t`` and ``p`` the weight before it (decoupled weight decay, as in ``torch.optim.AdamW``).
    """
    if step < 1:
        raise ValueError(f"Adam step numbers start at 1, got {step}")
    beta1, beta2 = betas
    m_hat = exp_avg.to(torch.float32) / (1 - beta1**step)
    v_hat = exp_avg_sq.to(torch.float32) / (1 - beta2**step)
    update = lr * m_hat / (v_hat.sqrt() + eps)
    if weight_decay:
        update = update + lr * weight_decay * param.to(torch.float32)
    return update


def _lr_stream(lr_iter: Iterable[float] | float | Tensor) -> Iterator[float]:
    """A constant learning rate (repeated forever) or a per-step stream of them."""
    if isinstance(lr_iter, int | float) or (isinstance(lr_iter, Tensor) and lr_iter.dim() == 0):
        return itertools.repeat(float(lr_iter))
    return (float(lr) for lr in lr_iter)


def _hop_record(step: int, prev: Tensor, cur: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, lr: float, **adam) -> dict:
    """Lattice statistics for one step pair (see :func:`lattice_hops`)."""
    prev_bf16 = prev.detach().to(torch.bfloat16).contiguous()
    moved = _bits(prev_bf16) != _bits(cur.detach().to(torch.bfloat16).contiguous())
    update = adam_update(prev_bf16, exp_avg, exp_avg_sq, lr, step, **adam)
    nonzero = update != 0
    rounded_away = nonzero & (update.abs() < _bf16_gap(prev_bf16, update) / 2)
    nonzero_count = int(nonzero.sum())
    return {
        "step": step,
        "rows_moved": int(_per_row(moved).any(dim=1).sum()),
        "coords_moved": int(moved.sum()),
        "rounded_away": int(rounded_away.sum()),
        "nonzero_updates": nonzero_count,
        "subhalf_ulp_share": int(rounded_away.sum()) / nonzero_count if nonzero_count else None,
    }


def _pull_aligned(streams: list[Iterator]) -> list | None:
    """The next item of every stream, or ``None`` when all ended together; uneven streams raise ``ValueError``.

    Not ``zip``: zip keeps its previous result tuple (and so the previous step's tensors) alive while it pulls the
    next items, which would double the optimizer state held at once.
    """
    items = []
    for position, stream in enumerate(streams):
        item = next(stream, _END)
        if item is _END:
            if position == 0 and all(next(other, _END) is _END for other in streams[1:]):
                return None
            raise ValueError("lattice_hops streams have different lengths")
        items.append(item)
    return items


def lattice_hops(
    values_iter: Iterable[Tensor],
    exp_avg_iter: Iterable[Tensor],
    exp_avg_sq_iter: Iterable[Tensor],
    lr_iter: Iterable[float] | float,
    step_numbers: Iterable[int],
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Per consecutive step pair, how many bf16 coordinates hopped and how many updates were rounded away.

    All five streams are aligned by position: item ``i`` of each belongs to step ``step_numbers[i]``; ``lr_iter``
    may also be a single float. For the pair ``(s, t)`` the record (numbered ``t``) has:

    - ``rows_moved``: rows with any coordinate whose bf16 value changed (bit comparison, see
      :func:`freeze_onset`); float32 values are rounded to bf16 first;
    - ``coords_moved``: coordinates whose bf16 value changed;
    - ``rounded_away``: coordinates whose implied AdamW update (:func:`adam_update`, using the optimizer state and
      learning rate recorded at ``t`` and the weight at ``s``) is nonzero but smaller than half the bf16 gap to the
      neighbouring value in the update's direction (:func:`bf16_ulp`), so round-to-nearest must put the weight
      back where it was;
    - ``nonzero_updates`` and ``subhalf_ulp_share = rounded_away / nonzero_updates`` (``None`` when no update).

    Updates of exactly half a gap are not counted: their result depends on round-half-to-even. The state at the
    first step is read and discarded. Holds two value steps and one optimizer state at a time.
    """
    records: list[dict] = []
    prev: Tensor | None = None
    lrs = _lr_stream(lr_iter)
    streams = [iter(values_iter), iter(exp_avg_iter), iter(exp_avg_sq_iter), iter(step_numbers)]
    while (items := _pull_aligned(streams)) is not None:
        cur, exp_avg, exp_avg_sq, step = items
        del items
        lr = next(lrs, None)
        if lr is None:
            raise ValueError(f"lr_iter ended before step {step}")
        if prev is not None:
            adam = {"betas": betas, "eps": eps, "weight_decay": weight_decay}
            records.append(_hop_record(int(step), prev, cur, exp_avg, exp_avg_sq, lr, **adam))
        prev = cur
        del cur, exp_avg, exp_avg_sq  # free this step's state before the next one is loaded
    return records


# --------------------------------------------------------------------------------------------------------------
# Centroid of a row subset
# --------------------------------------------------------------------------------------------------------------


def _centroid_record(step: int, rows: Tensor) -> dict:
    """Centroid norm and bounding radius of a set of rows (float32)."""
    if rows.shape[0] == 0:
        return {"step": step, "count": 0, "centroid_norm": None, "radius": None, "mean_distance": None}
    rows = rows.detach().to(torch.float32)
    centroid = rows.mean(dim=0)
    distances = (rows - centroid).norm(dim=1)
    return {
        "step": step,
        "count": int(rows.shape[0]),
        "centroid_norm": float(centroid.norm()),
        "radius": float(distances.max()),
        "mean_distance": float(distances.mean()),
    }


def centroid_track(values_iter: Iterable[StepItem], mask: Tensor) -> list[dict]:
    """Per step, where the masked rows sit: their centroid's norm and their bounding radius.

    ``mask`` (boolean over rows, or an index tensor) picks the rows to follow, typically the untrained new tokens.
    The radius is the largest distance of a masked row from the masked centroid, so a small radius means the rows
    form a tight cluster that moves as one. Each record has ``step, count, centroid_norm, radius,
    mean_distance``. Streams: one step is held at a time.
    """
    if mask.dtype == torch.bool:
        mask = mask.reshape(-1)
    records = []
    for step, values in _numbered(values_iter):
        if mask.dtype == torch.bool and mask.numel() != values.shape[0]:
            raise ValueError(f"mask has {mask.numel()} entries for {values.shape[0]} rows at step {step}")
        records.append(_centroid_record(step, values[mask]))
    return records
