"""Built-in ``spherical`` init: new rows on uniformly random directions at k x the mean base-row norm.

This is the P1 notebook's init: the new rows start on a sphere a little outside the base rows (k = 1.5), so they
are as far from each other as random directions in d dimensions are, and large enough to be noticed by the model.
"""

from __future__ import annotations

import torch

import wakelab


def sphere_rows(count: int, dim: int, radius: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` points uniform on the sphere of ``radius`` in ``dim`` dimensions (normalised Gaussians)."""
    directions = torch.randn(count, dim, generator=generator, dtype=torch.float32)
    return directions / directions.norm(dim=1, keepdim=True) * radius


@wakelab.hookimpl
def init_embeddings(ctx):
    if ctx.method != "spherical":
        return None
    weight = ctx.weight
    base_norm = wakelab.mean_row_norm(weight, ctx.num_base)
    radius = ctx.options.get("radius_scale", 1.5) * base_norm
    rows = sphere_rows(len(ctx.new_ids), weight.shape[1], radius, ctx.generator)
    weight[ctx.new_ids] = rows.to(weight.dtype)
    scale = ctx.options.get("radius_scale", 1.5)
    ctx.log(
        f"spherical init: {len(ctx.new_ids)} rows at radius {radius:.4f} ({scale} x mean base norm {base_norm:.4f})"
    )
    return {"method": "spherical", "radius": radius, "base_mean_norm": base_norm}
