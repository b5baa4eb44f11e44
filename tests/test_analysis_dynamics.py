"""Streaming dynamics analyses on constructed step sequences with known answers."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from wakelab.analysis.dynamics.steps import (
    adam_update,
    bf16_ulp,
    centroid_track,
    displacement,
    displacement_summary,
    freeze_onset,
    freeze_verdict,
    from_callable,
    lattice_hops,
)

BETAS = (0.9, 0.999)


def _next_up(x: torch.Tensor, hops: int = 1) -> torch.Tensor:
    """The bf16 value ``hops`` lattice steps away from positive bf16 ``x`` (by stepping the raw bits)."""
    return (x.to(torch.bfloat16).view(torch.int16) + hops).view(torch.bfloat16)


def _state_for_update(direction: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam moments at ``step`` whose bias-corrected ratio m_hat / sqrt(v_hat) equals ``direction``."""
    exp_avg = direction * (1 - BETAS[0] ** step)
    exp_avg_sq = torch.full_like(direction, 1 - BETAS[1] ** step)
    return exp_avg, exp_avg_sq


# ---------------------------------------------------------------------------------------------------- displacement


def test_displacement_frozen_row_is_exactly_zero_and_known_distance():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.5, -0.5]], dtype=torch.bfloat16)
    b = a.clone()
    b[1] = torch.tensor([3.0, 4.0])
    disp = displacement(a, b)
    assert disp.dtype == torch.float32
    assert disp[0].item() == 0.0
    assert disp[2].item() == 0.0
    assert disp[1].item() == 5.0


def test_displacement_summary_with_and_without_mask():
    disp = torch.tensor([0.0, 0.0, 1.0, 3.0, 8.0])
    assert displacement_summary(disp) == {"all": {"count": 5, "max": 8.0, "mean": 2.4, "median": 1.0}}

    summary = displacement_summary(disp, mask=torch.tensor([False, False, True, True, True]))
    assert summary["trained"] == {"count": 3, "max": 8.0, "mean": 4.0, "median": 3.0}
    assert summary["untrained"] == {"count": 2, "max": 0.0, "mean": 0.0, "median": 0.0}
    assert summary["all"]["count"] == 5

    empty = displacement_summary(disp, mask=torch.ones(5, dtype=torch.bool))["untrained"]
    assert empty == {"count": 0, "max": None, "mean": None, "median": None}


def test_freeze_verdict():
    assert freeze_verdict(torch.tensor([0.0, 1e-6]), threshold=1e-4) == {
        "frozen": True,
        "mean": pytest.approx(5e-7),
        "threshold": 1e-4,
    }
    assert freeze_verdict(torch.tensor([0.0, 1.0]), threshold=1e-4)["frozen"] is False


# ---------------------------------------------------------------------------------------------------- freeze_onset


def _onset_steps():
    """10 rows: step 1 changes rows 0-2, step 2 changes nothing, step 3 changes row 9 by the smallest bf16 hop."""
    s0 = torch.linspace(0.1, 1.0, 40).reshape(10, 4).to(torch.bfloat16)
    s1 = s0.clone()
    s1[:3] += 0.25
    s2 = s1.clone()
    s3 = s2.clone()
    s3[9, 0] = _next_up(s3[9, 0])
    return [s0, s1, s2, s3]


def test_freeze_onset_unchanged_share_exactly_as_constructed():
    records = freeze_onset(iter(_onset_steps()))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["unchanged_share"] for r in records] == [0.7, 1.0, 0.9]
    assert [r["unchanged_rows"] for r in records] == [7, 10, 9]
    assert records[0]["mean_displacement"] == pytest.approx(3 * 0.5 / 10, rel=1e-2)  # 0.25 * sqrt(4) per row
    assert records[1]["mean_displacement"] == 0.0
    assert records[2]["mean_displacement"] > 0.0


def test_freeze_onset_compares_bits_not_values():
    a = torch.zeros(2, 3, dtype=torch.bfloat16)
    b = a.clone()
    b[1, 2] = -0.0  # equal as a value, different bits
    (record,) = freeze_onset([a, b])
    assert record["unchanged_share"] == 0.5
    assert record["mean_displacement"] == 0.0


def test_freeze_onset_float32_and_step_numbers():
    a = torch.ones(4, 2)
    b = a.clone()
    b[0, 0] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    records = freeze_onset([(100, a), (150, b), (200, b.clone())])
    assert [(r["step"], r["unchanged_share"]) for r in records] == [(150, 0.75), (200, 1.0)]


def test_freeze_onset_from_callable():
    steps = _onset_steps()
    calls = []

    def load(t: int) -> torch.Tensor:
        calls.append(t)
        return steps[t]

    records = freeze_onset(from_callable(load, range(4)))
    assert calls == [0, 1, 2, 3]
    assert [r["unchanged_share"] for r in records] == [0.7, 1.0, 0.9]


# ---------------------------------------------------------------------------------------------------- bf16 lattice


def test_bf16_ulp_known_values():
    x = torch.tensor([1.0, 1.5, 1.999, 2.0, -3.0, 0.01, 0.0, 1e-40, float("inf")])
    expected = [2**-7, 2**-7, 2**-6, 2**-6, 2**-6, 2**-14, 2**-133, 2**-133, math.nan]
    # 1.999 rounds to 2.0 in bf16, so its spacing is that of 2.0
    result = bf16_ulp(x)
    assert result.dtype == torch.float32
    assert result[:-1].tolist() == expected[:-1]
    assert math.isnan(result[-1].item())


def test_bf16_ulp_equals_gap_to_next_representable_value():
    x = (torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 10 ** torch.randint(-8, 8, (2000,))).to(
        torch.bfloat16
    )
    gap = _next_up(x).float() - x.float()
    assert torch.equal(bf16_ulp(x), gap)


def test_lattice_hops_seven_of_hundred_coordinates_hop():
    before = torch.full((2, 100), 0.75, dtype=torch.bfloat16)
    after = before.clone()
    hopped = [3, 10, 11, 40, 41, 77, 99]
    after[1, hopped] = _next_up(after[1, hopped])
    exp_avg, exp_avg_sq = _state_for_update(torch.zeros(2, 100), step=2)

    (record,) = lattice_hops(
        [before, after], [exp_avg, exp_avg], [exp_avg_sq, exp_avg_sq], [1e-3, 1e-3], [1, 2], betas=BETAS
    )
    assert record["step"] == 2
    assert record["coords_moved"] == 7
    assert record["rows_moved"] == 1
    assert record["nonzero_updates"] == 0
    assert record["rounded_away"] == 0
    assert record["subhalf_ulp_share"] is None


def test_update_below_half_ulp_is_rounded_away_and_large_one_is_not():
    step, lr = 10, 1e-3
    # coordinate 0: |w| = 1, half ULP = 2^-8 ~ 0.0039 > lr  -> rounded away
    # coordinate 1: |w| = 0.01, half ULP ~ 3e-5 < lr         -> moves
    # coordinate 2: zero update                            -> neither
    before = torch.tensor([[1.0, 0.01, 0.5]], dtype=torch.bfloat16)
    exp_avg, exp_avg_sq = _state_for_update(torch.tensor([[-1.0, 1.0, 0.0]]), step)
    update = adam_update(before, exp_avg, exp_avg_sq, lr, step, BETAS)
    assert update[0].tolist() == pytest.approx([-lr, lr, 0.0], rel=1e-5)
    after = (before.float() - update).to(torch.bfloat16)  # what a bf16 AdamW step stores
    assert after[0, 0] == before[0, 0] and after[0, 1] != before[0, 1]

    (record,) = lattice_hops(
        iter([before, after]), iter([exp_avg, exp_avg]), iter([exp_avg_sq, exp_avg_sq]), lr, [step - 1, step]
    )
    assert record["rounded_away"] == 1
    assert record["nonzero_updates"] == 2
    assert record["subhalf_ulp_share"] == 0.5
    assert record["coords_moved"] == 1
    assert record["rows_moved"] == 1


def test_power_of_two_moving_towards_zero_uses_the_finer_gap_below():
    # bf16 below 1.0 is spaced 2^-8, so an update of 0.003 towards zero (> 2^-9) moves 1.0 to 0.99609375,
    # although it is below half the ULP above 1.0 (2^-8 ~ 0.0039).
    before = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)
    exp_avg, exp_avg_sq = _state_for_update(torch.tensor([[1.0, -1.0]]), step=5)
    lr = 0.003
    after = (before.float() - adam_update(before, exp_avg, exp_avg_sq, lr, 5)).to(torch.bfloat16)
    assert after[0].tolist() == [0.99609375, 1.0]
    (record,) = lattice_hops([before, after], [exp_avg] * 2, [exp_avg_sq] * 2, [lr, lr], [4, 5])
    assert record["coords_moved"] == 1
    assert record["rounded_away"] == 1


def test_lattice_hops_predicts_a_simulated_bf16_adamw_run():
    """Over random weights and states, every nonzero update either hops or is counted as rounded away."""
    generator = torch.Generator().manual_seed(7)
    weights = (torch.randn(50, 64, generator=generator) * 0.05).to(torch.bfloat16)
    values, exp_avgs, exp_avg_sqs, lrs = [weights], [torch.zeros(50, 64)], [torch.zeros(50, 64)], [0.0]
    for step in range(1, 6):
        exp_avg = torch.randn(50, 64, generator=generator) * 1e-3
        exp_avg[:10] = 0.0  # untrained rows: no gradient ever, no update
        exp_avg_sq = exp_avg**2 * torch.rand(50, 64, generator=generator) * 4 + 1e-12
        lr = 2e-4 * step
        update = adam_update(values[-1], exp_avg, exp_avg_sq, lr, step, weight_decay=0.01)
        values.append((values[-1].float() - update).to(torch.bfloat16))
        exp_avgs.append(exp_avg)
        exp_avg_sqs.append(exp_avg_sq)
        lrs.append(lr)

    records = lattice_hops(values, exp_avgs, exp_avg_sqs, lrs, range(6), weight_decay=0.01)
    assert len(records) == 5
    for record in records:
        assert record["nonzero_updates"] == 50 * 64  # weight decay gives the untrained rows a tiny update too
        assert record["coords_moved"] == record["nonzero_updates"] - record["rounded_away"]
        assert 0 < record["rounded_away"] < record["nonzero_updates"]
        assert record["rows_moved"] == 40  # decay alone (lr * wd * |w| ~ 1e-7) never hops a bf16 step


def test_lattice_hops_rejects_misaligned_streams():
    x = torch.zeros(1, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="streams have different lengths"):
        lattice_hops([x, x, x], [x, x], [x, x, x], 1e-3, [1, 2, 3])


# ---------------------------------------------------------------------------------------------------- centroid_track


def test_centroid_track_known_centroid_and_radius():
    far = torch.tensor([[100.0, -50.0], [-70.0, 30.0]])  # unmasked rows must not count
    tracked = torch.tensor([[11.0, 0.0], [9.0, 0.0], [10.0, 2.0], [10.0, -2.0]])
    step0 = torch.cat([tracked, far])
    step1 = torch.cat([tracked * 0.5 + torch.tensor([0.0, 5.0]), far])  # centroid (5, 5), radius 1
    mask = torch.tensor([True] * 4 + [False] * 2)

    records = centroid_track((s.to(torch.bfloat16) for s in [step0, step1]), mask)
    assert [r["step"] for r in records] == [0, 1]
    assert records[0]["centroid_norm"] == pytest.approx(10.0)
    assert records[0]["radius"] == pytest.approx(2.0)
    assert records[0]["mean_distance"] == pytest.approx(1.5)
    assert records[0]["count"] == 4
    assert records[1]["centroid_norm"] == pytest.approx(math.sqrt(50.0))
    assert records[1]["radius"] == pytest.approx(1.0)


def test_centroid_track_empty_mask():
    (record,) = centroid_track([torch.ones(3, 2)], torch.zeros(3, dtype=torch.bool))
    assert record["count"] == 0 and record["centroid_norm"] is None and record["radius"] is None


# ---------------------------------------------------------------------------------------------------- streaming


class LiveSteps:
    """A generator of step tensors that records how many of them are still alive each time one is made."""

    def __init__(self, n: int, rows: int = 8, d: int = 4, dtype: torch.dtype = torch.bfloat16):
        self.n, self.rows, self.d, self.dtype = n, rows, d, dtype
        self.live = 0
        self.peak = 0
        self.pulled = 0

    def _released(self) -> None:
        self.live -= 1

    def _make(self, i: int) -> torch.Tensor:
        tensor = torch.full((self.rows, self.d), float(i % 7), dtype=self.dtype)
        tensor[: i % self.rows] += 1.0
        self.live += 1
        self.peak = max(self.peak, self.live)
        self.pulled += 1
        weakref.finalize(tensor, self._released)
        return tensor

    def __call__(self):
        for i in range(self.n):
            yield self._make(i)  # no local name: the generator itself keeps nothing alive


def test_freeze_onset_streams_without_materialising():
    source = LiveSteps(50)
    records = freeze_onset(source())
    assert len(records) == 49
    assert source.pulled == 50
    assert source.peak <= 2


def test_centroid_track_streams_without_materialising():
    source = LiveSteps(50)
    records = centroid_track(source(), torch.ones(8, dtype=torch.bool))
    assert len(records) == 50
    assert source.peak <= 2


def test_lattice_hops_streams_without_materialising():
    values, exp_avgs, exp_avg_sqs = LiveSteps(50), LiveSteps(50, dtype=torch.float32), LiveSteps(50)
    records = lattice_hops(values(), exp_avgs(), exp_avg_sqs(), (1e-3 for _ in range(50)), range(1, 51))
    assert len(records) == 49
    assert values.pulled == exp_avgs.pulled == exp_avg_sqs.pulled == 50
    assert values.peak <= 2
    assert exp_avgs.peak <= 1 and exp_avg_sqs.peak <= 1
