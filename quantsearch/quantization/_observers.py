"""Range observers for post-training quantization: min/max, percentile and MSE.

Percentile and MSE read a histogram of the observed values, one row per channel (one row for
per-tensor quantization). A histogram keeps its bin width until a value falls outside it; then
neighbouring bins merge in pairs (the width doubles, the range with it), so counts are never
redistributed approximately.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._math import affine_qparams

__all__ = [
    "HISTOGRAM_BINS",
    "MSE_CANDIDATES",
    "OBSERVERS",
    "WEIGHT_CHANNEL_BINS",
    "channel_rows",
    "histogram_add",
    "histogram_start",
    "mse_range",
    "percentile_range",
    "weight_range",
]

OBSERVERS = ("minmax", "percentile", "mse")
#: Bins of an activation histogram, and of a per-tensor weight's.
HISTOGRAM_BINS = 2048
#: Bins per channel of a per-channel weight (a channel holds few values).
WEIGHT_CHANNEL_BINS = 256
#: Clipping ranges the MSE observer tries: k/100 of the min/max range, k = 1..100.
MSE_CANDIDATES = 100


def channel_rows(x: Tensor, axis: int | None) -> Tensor:
    """``x`` as (channels, values): one row per channel along ``axis``, or a single row."""
    if axis is None:
        return x.reshape(1, -1)
    return x.transpose(0, axis).reshape(x.shape[axis], -1)


def histogram_start(rows: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """(counts (C, bins) float64, low (C,), width (C,)) covering exactly each row's range."""
    lo, hi = torch.aminmax(rows, dim=1)
    lo, hi = lo.double(), hi.double()
    span = hi - lo
    # A constant row still needs a positive width.
    width = torch.where(span > 0, span, lo.abs().clamp(min=1.0) * 2.0**-20) / bins
    counts = torch.zeros(rows.shape[0], bins, dtype=torch.float64, device=rows.device)
    return histogram_add(counts, lo, width, rows)


def _grow(counts: Tensor, low: Tensor, width: Tensor, lo: Tensor, hi: Tensor) -> None:
    """Double the bin width of every row whose range misses [lo, hi], in place."""
    bins = counts.shape[1]
    half = bins // 2
    while True:
        below = lo < low
        above = hi > low + bins * width
        grow = below | above
        if not bool(grow.any()):
            return
        rows = grow.nonzero().reshape(-1)
        merged = counts[rows].reshape(len(rows), half, 2).sum(dim=2)
        down = below[rows]
        fresh = torch.zeros(len(rows), bins, dtype=counts.dtype, device=counts.device)
        # Growing upwards keeps the low edge; downwards the old bins become the upper half.
        fresh[:, :half] = torch.where(down[:, None], 0.0, merged)
        fresh[:, half:] = torch.where(down[:, None], merged, 0.0)
        counts[rows] = fresh
        low[rows] = torch.where(down, low[rows] - bins * width[rows], low[rows])
        width[rows] = width[rows] * 2


def histogram_add(
    counts: Tensor, low: Tensor, width: Tensor, rows: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Count ``rows`` (C, N) into the histogram, widening it first where needed."""
    counts, low, width = counts.clone(), low.clone(), width.clone()
    lo, hi = torch.aminmax(rows, dim=1)
    _grow(counts, low, width, lo.double(), hi.double())
    channels, bins = counts.shape
    index = ((rows.double() - low[:, None]) / width[:, None]).floor_().clamp_(0, bins - 1)
    flat = index.long() + (torch.arange(channels, device=rows.device) * bins)[:, None]
    counts += torch.bincount(flat.reshape(-1), minlength=channels * bins).reshape(
        channels, bins
    ).to(counts.dtype)
    return counts, low, width


def percentile_range(
    counts: Tensor, low: Tensor, width: Tensor, percentile: float,
    data_min: Tensor, data_max: Tensor,
) -> tuple[Tensor, Tensor]:
    """The (100 - p)-th and p-th percentiles of each row, interpolated linearly inside a bin
    and kept within the observed min and max (p = 100 gives them exactly)."""
    cdf = torch.cumsum(counts, dim=1)
    total = cdf[:, -1:]
    bins = counts.shape[1]

    def at(fraction: float) -> Tensor:
        target = fraction * total
        index = torch.searchsorted(cdf, target).clamp_(0, bins - 1)
        before = torch.where(index > 0, cdf.gather(1, (index - 1).clamp(min=0)), 0.0)
        inside = counts.gather(1, index)
        part = torch.where(inside > 0, (target - before) / inside.clamp(min=1e-300), 0.0)
        return (low[:, None] + (index + part.clamp(0.0, 1.0)) * width[:, None]).reshape(-1)

    upper = torch.minimum(at(percentile / 100.0), data_max.double().reshape(-1))
    lower = torch.maximum(at(1.0 - percentile / 100.0), data_min.double().reshape(-1))
    return lower, torch.maximum(upper, lower)


def mse_range(
    counts: Tensor, low: Tensor, width: Tensor, data_min: Tensor, data_max: Tensor,
    qmin: int, qmax: int, symmetric: bool, candidates: int = MSE_CANDIDATES,
) -> tuple[Tensor, Tensor]:
    """The clipping range, k/``candidates`` of the min/max range (both ends scaled about 0),
    with the smallest expected squared quantization error over each row's histogram.

    A value inside the representable range costs the rounding noise s^2 / 12; a clipped one its
    squared distance to the nearest representable value. Ties keep the wider range.
    """
    bins = counts.shape[1]
    centers = low[:, None] + (torch.arange(bins, device=counts.device) + 0.5) * width[:, None]
    full_lo = data_min.double().reshape(-1).clamp(max=0.0)
    full_hi = data_max.double().reshape(-1).clamp(min=0.0)
    # Widest first, so that argmin's first minimum (a tie) is the widest range.
    alphas = torch.arange(candidates, 0, -1, dtype=torch.float64, device=counts.device)
    alphas = alphas / candidates
    totals = []
    # Candidates in chunks of about 2^22 (candidate, channel, bin) cells: bounded memory.
    chunk = max(1, (1 << 22) // max(1, centers.numel()))
    for start in range(0, candidates, chunk):
        alpha = alphas[start : start + chunk, None]
        scale, zero_point = affine_qparams(
            alpha * full_lo, alpha * full_hi, qmin, qmax, symmetric
        )
        scale, zero_point = scale.double()[..., None], zero_point.double()[..., None]
        clipped = torch.minimum(
            torch.maximum(centers, (qmin - zero_point) * scale), (qmax - zero_point) * scale
        )
        error = torch.where(clipped == centers, scale**2 / 12, (centers - clipped) ** 2)
        totals.append((counts * error).sum(dim=2))
    best = torch.cat(totals).argmin(dim=0)
    chosen = alphas[best]
    return chosen * full_lo, chosen * full_hi


def weight_range(
    x: Tensor, axis: int | None, observer: str, percentile: float,
    qmin: int, qmax: int, symmetric: bool,
) -> tuple[Tensor, Tensor]:
    """(min, max) per row of a weight tensor under ``observer``, as float64 tensors (C,)."""
    rows = channel_rows(x, axis)
    data_min, data_max = torch.aminmax(rows, dim=1)
    if observer == "minmax":
        return data_min.double(), data_max.double()
    bins = HISTOGRAM_BINS if axis is None else WEIGHT_CHANNEL_BINS
    counts, low, width = histogram_start(rows, bins)
    if observer == "percentile":
        return percentile_range(counts, low, width, percentile, data_min, data_max)
    return mse_range(counts, low, width, data_min, data_max, qmin, qmax, symmetric)
