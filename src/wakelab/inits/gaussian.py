"""Gaussian draws around the base rows: their mean and covariance, and samples from N(mean, scale x cov).

Shared by the ``mean`` and ``subword`` init plugins (and open to any init plugin through ``wakelab``'s public API),
so an init plugin never imports another plugin. The covariance is a ``d x d`` matrix from chunked passes over the
base rows (float32 products summed in float64), so no float64 copy of the whole matrix is ever made.
"""

from __future__ import annotations

import torch

#: Rows per chunk of the covariance pass: 8192 x 2048 float32 is 64 MiB.
CHUNK_ROWS = 8192
#: Rows per chunk when drawing new rows: 4096 x 2048 float64 is 64 MiB.
SAMPLE_ROWS = 4096
#: Jitter added to the covariance's diagonal before Cholesky, relative to its mean variance.
JITTER = 1e-6


def base_moments(
    weight: torch.Tensor, num_base: int, chunk_rows: int = CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[d]`` and population covariance ``[d, d]`` of ``weight[:num_base]``, in float64 on the CPU.

    Two chunked passes (mean, then centred products), so no float64 copy of the whole matrix is ever made.
    """
    if num_base < 1:
        raise ValueError("the mean init needs at least one base row")
    device = weight.device
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=device)
    for start in range(0, num_base, chunk_rows):
        total += weight[start : min(num_base, start + chunk_rows)].detach().to(torch.float64).sum(dim=0)
    mean = total / num_base
    mean32 = mean.to(torch.float32)
    cov = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=device)
    for start in range(0, num_base, chunk_rows):
        centred = weight[start : min(num_base, start + chunk_rows)].detach().to(torch.float32) - mean32
        cov += (centred.T @ centred).to(torch.float64)
    cov /= num_base
    return mean.cpu(), cov.cpu()


def mean_row_norm(weight: torch.Tensor, num_base: int, chunk_rows: int = CHUNK_ROWS) -> float:
    """Mean L2 norm of ``weight[:num_base]``'s rows in float32, read a chunk at a time: a bf16 matrix never gets a
    float32 copy (1 GiB at P1's 128,256 x 2048). The row norms are the ones ``weight.float().norm(dim=1)`` gives."""
    norms = torch.empty(num_base, dtype=torch.float32, device=weight.device)
    for start in range(0, num_base, chunk_rows):
        stop = min(num_base, start + chunk_rows)
        norms[start:stop] = weight[start:stop].detach().float().norm(dim=1)
    return norms.mean().item()


def sampling_factor(cov: torch.Tensor, scale: float) -> tuple[torch.Tensor, str]:
    """``L`` with ``L @ L.T ~= scale * cov``: Cholesky with a little jitter, or eigh when that fails."""
    scaled = cov.to(torch.float64) * scale
    dim = scaled.shape[0]
    jitter = JITTER * float(scaled.diagonal().mean().clamp_min(1e-30))
    factor, info = torch.linalg.cholesky_ex(scaled + jitter * torch.eye(dim, dtype=torch.float64))
    if int(info) == 0:
        return factor, "cholesky"
    values, vectors = torch.linalg.eigh(scaled)
    return vectors * values.clamp_min(0).sqrt(), "eigh"


def gaussian_rows(count: int, mean: torch.Tensor, factor: torch.Tensor, generator: torch.Generator,
                  chunk_rows: int = SAMPLE_ROWS) -> torch.Tensor:  # fmt: skip
    """``count`` draws of ``mean + L z``, z standard normal from ``generator`` (float32), ``chunk_rows`` at a time.

    Drawn whole, the float64 draws, their product with ``L`` and the sum were three ``count x d`` float64 matrices
    at once: 2.1 GiB for P1's 44,195 rows at d=2048, more than the rest of the run's set-up. In chunks, at most
    three ``chunk_rows x d`` ones exist. The draws are the same numbers as one ``randn(count, d)``: torch fills
    normals 16 at a time, so chunks of whole multiples of 16 values, and a last chunk of at least 16 rows, read the
    generator exactly as the single call does.
    """
    dim = mean.shape[0]
    out = torch.empty(count, dim, dtype=torch.float32)
    starts = list(range(0, count, max(16, chunk_rows - chunk_rows % 16)))
    if len(starts) > 1 and count - starts[-1] < 16:
        starts.pop()  # a last chunk under 16 rows joins the one before it
    for start, stop in zip(starts, starts[1:] + [count], strict=True):
        z = torch.randn(stop - start, dim, generator=generator, dtype=torch.float64)
        out[start:stop] = (mean + z @ factor.T).to(torch.float32)
    return out
