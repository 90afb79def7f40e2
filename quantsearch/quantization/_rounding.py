"""Learned rounding of a weight on a fixed grid: AdaRound and GPTQ, as plain tensor functions.

Every solver sees a layer as ``g`` groups of a linear map: weights ``w`` (g, o, d) (a Conv2d's
output channels of one group, its input patch flattened as (channel, kh, kw)), the grid's
``scale`` and ``zero_point`` per row (g, o, 1), and inputs either as rows ``x`` (g, n, d) or as
their second moment ``h = x^T x / n`` (g, d, d). Each returns the integer codes minus the zero
point, ``q`` in ``qmin - z .. qmax - z``, so that ``w_hat = q * scale`` is on the grid.

* AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"):
  ``w_hat = s * clamp(floor(w / s) + h(V), qmin - z, qmax - z)`` with the rectified sigmoid
  ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1, fitted with
  Adam on ``E ||W x - W_hat x||^2 / E_nearest + lambda mean(1 - |2 h - 1|^beta)`` (the paper's
  loss, both terms normalised: see ``ADAROUND_LAMBDA``), beta annealed 20 -> 2 after a 20%
  warm-up without the regulariser; then hard rounding h >= 0.5.
* GPTQ (Frantar et al. 2022): columns quantized in order, each one's error divided by the
  diagonal of the upper Cholesky factor of the inverse Hessian ``(2 x^T x + damp I)^-1`` and
  subtracted from the columns not yet quantized; blocks of 128 columns updated lazily.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ADAROUND_BATCH_ROWS",
    "ADAROUND_BETA",
    "ADAROUND_LAMBDA",
    "adaround",
    "gptq",
    "nearest_codes",
    "reconstruction_error",
]

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (paper, section 4)
# The regulariser's weight. The paper's lambda = 0.01 multiplies a sum over weights next to an
# unnormalised reconstruction error, so its strength depends on the layer's scale; here the
# error is divided by nearest rounding's and the regulariser averaged over weights, and 30 is
# the weight at which every mask ends at 0 or 1 within a few hundred CPU steps (measured).
ADAROUND_LAMBDA = 30.0
ADAROUND_BETA = (20.0, 2.0)  # beta annealed from 20 to 2 (paper, section 5)
ADAROUND_WARMUP = 0.2  # the first 20% of iterations fit without the regulariser (AIMET, BRECQ)
ADAROUND_BATCH_ROWS = 256  # rows (input patches) per Adam step when the rows form is used
GPTQ_BLOCK = 128  # lazy batch updates (GPTQ, section 3 step 2)


def nearest_codes(w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Round-to-nearest codes minus the zero point, with the float32 arithmetic of
    ``fake_quantize`` (x * (1/s), round half to even, clamp)."""
    base = torch.round(w * torch.reciprocal(scale))
    return torch.clamp(base, qmin - zero_point, qmax - zero_point)


def reconstruction_error(w: Tensor, w_hat: Tensor, h: Tensor) -> Tensor:
    """E ||(W - W_hat) x||^2 per group: trace(E h E^T) summed over rows, shape (g,)."""
    e = (w - w_hat).double()
    return torch.einsum("god,gde,goe->g", e, h.double(), e)


def _rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _initial_v(rest: Tensor) -> Tensor:
    # h(V) = rest at the start: the soft weight equals the float weight (paper, section 5).
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def adaround(
    w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, *,
    iters: int, x: Tensor | None = None, h: Tensor | None = None, lr: float | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """AdaRound codes minus zero point (g, o, d) and the final soft mask h(V) (g, o, d).

    Give ``h`` (g, d, d) for the exact loss over every recorded row (cheap when d is small),
    or ``x`` (g, n, d) to fit on ``ADAROUND_BATCH_ROWS`` random rows per step. ``lr`` (Adam's
    step) defaults to 30 / iters within [3e-3, 0.1]: the paper's 1e-3 suits its 10k-20k steps;
    fewer steps need larger ones to move the masks to 0 or 1.
    """
    if (x is None) == (h is None):
        raise ValueError("adaround needs exactly one of x (rows) and h (second moment)")
    w = w.detach().float()
    low, high = qmin - zero_point, qmax - zero_point
    ratio = w / scale
    floor = torch.floor(ratio)
    v = _initial_v(ratio - floor).requires_grad_(True)
    step = lr if lr is not None else min(0.1, max(3e-3, 30.0 / max(iters, 1)))
    optimizer = torch.optim.Adam([v], lr=step)
    generator = torch.Generator().manual_seed(seed)
    warmup = int(ADAROUND_WARMUP * iters)
    start, end = ADAROUND_BETA
    h_mat = None if h is None else h.float()
    rows = None if x is None else x.float()
    with torch.no_grad():  # the loss is scale-free: rec / (nearest rounding's), reg a mean
        near = scale * torch.clamp(torch.round(ratio), low, high)
        if h_mat is not None:
            rec0 = torch.einsum("god,gde,goe->", w - near, h_mat, w - near)
        else:
            assert rows is not None
            rec0 = torch.bmm(rows, (w - near).transpose(1, 2)).pow(2).sum() / rows.shape[1]
        norm = 1.0 / float(rec0.clamp(min=1e-30))
    for it in range(iters):
        soft = _rectified_sigmoid(v)
        e = w - scale * torch.clamp(floor + soft, low, high)
        if h_mat is not None:
            rec = torch.einsum("god,gde,goe->", e, h_mat, e)  # trace(E H E^T): mean over rows
        else:
            assert rows is not None
            pick = torch.randint(rows.shape[1], (ADAROUND_BATCH_ROWS,), generator=generator)
            out = torch.bmm(rows[:, pick], e.transpose(1, 2))  # (g, batch, o) output errors
            rec = out.pow(2).sum() / ADAROUND_BATCH_ROWS
        loss = rec * norm
        if it >= warmup:
            progress = (it - warmup) / max(iters - warmup, 1)
            beta = end + (start - end) * (1 - progress)  # linear 20 -> 2
            loss = loss + ADAROUND_LAMBDA * (1 - (2 * soft - 1).abs().pow(beta)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        soft = _rectified_sigmoid(v)
        codes = torch.clamp(floor + (soft >= 0.5).float(), low, high)
    return codes, soft.detach()


def gptq(
    w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, *, h: Tensor,
    damp: float,
) -> Tensor:
    """GPTQ codes minus zero point (g, o, d), columns in their natural order.

    ``h`` is x^T x / n (g, d, d); the Hessian of the layer's squared error is 2 h, dampened by
    ``damp`` times its mean diagonal. Inputs that were always 0 ("dead" columns) are quantized
    to nearest and propagate nothing.
    """
    w = w.detach().double().clone()
    groups, _, d = w.shape
    hessian = 2 * h.double().clone()
    diag = torch.diagonal(hessian, dim1=1, dim2=2)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    mean = diag.mean(dim=1, keepdim=True)
    diag.add_(damp * mean)  # dampening: a fraction of the mean diagonal (GPTQ, section 3)
    chol = torch.linalg.cholesky(hessian)
    inverse = torch.cholesky_inverse(chol)
    upper = torch.linalg.cholesky(inverse, upper=True)  # rows of the inverse's Cholesky factor
    s, z = scale.double(), zero_point.double()
    low, high = qmin - z, qmax - z
    recip = torch.reciprocal(scale).double()
    codes = torch.empty_like(w)
    for first in range(0, d, GPTQ_BLOCK):
        last = min(first + GPTQ_BLOCK, d)
        block = w[:, :, first:last].clone()
        errors = torch.empty_like(block)
        block_u = upper[:, first:last, first:last]
        for i in range(last - first):
            column = block[:, :, i : i + 1]
            q = torch.clamp(torch.round(column * recip), low, high)
            codes[:, :, first + i : first + i + 1] = q
            err = (column - q * s) / block_u[:, i : i + 1, i : i + 1]
            err = torch.where(dead[:, first + i].reshape(groups, 1, 1), 0.0, err)
            block[:, :, i + 1 :] -= err * block_u[:, i : i + 1, i + 1 :]
            errors[:, :, i : i + 1] = err
        if last < d:  # the lazy update of every later column at once
            w[:, :, last:] -= torch.bmm(errors, upper[:, first:last, last:])
    return codes.float()

