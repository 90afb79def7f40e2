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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ADAROUND_BATCH_ROWS",
    "ADAROUND_BETA",
    "ADAROUND_LAMBDA",
    "AdaRoundLoss",
    "adaround",
    "gptq",
    "nearest_codes",
    "reconstruction_error",
    "row_errors",
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


def row_errors(w: Tensor, w_hat: Tensor, *, h: Tensor | None = None,
               x: Tensor | None = None, x_hat: Tensor | None = None) -> Tensor:
    """E ((W - W_hat) x)_o^2 per output row, shape (g, o): from the inputs' second moment ``h``
    (o d^2 operations) or, without it, from the rows ``x`` themselves (n d o operations).
    With ``x_hat`` (the rows the quantized model feeds the layer, paired with ``x``), the error
    of the quantized layer on them against the float layer on ``x``: E (W x - W_hat x_hat)^2."""
    if x_hat is not None:
        if x is None:
            raise ValueError("row_errors with x_hat needs the float rows x")
        target = torch.bmm(x.float(), w.float().transpose(1, 2))
        return (target - torch.bmm(x_hat.float(), w_hat.float().transpose(1, 2))).pow(2).mean(1)
    e = (w - w_hat).float()
    if h is not None:
        return (torch.bmm(e, h.float()) * e).sum(-1)
    if x is None:
        raise ValueError("row_errors needs h or x")
    return torch.bmm(x.float(), e.transpose(1, 2)).pow(2).mean(1)


def reconstruction_error(w: Tensor, w_hat: Tensor, h: Tensor) -> Tensor:
    """E ||(W - W_hat) x||^2 per group: trace(E h E^T) summed over rows, shape (g,)."""
    return row_errors(w, w_hat, h=h).sum(1)


def _initial_v(rest: Tensor) -> Tensor:
    # h(V) = rest at the start: the soft weight equals the float weight (paper, section 5).
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


# sigmoid(V) (1 - sigmoid(V)) where the rectified sigmoid reaches 0 or 1: below it, h(V) is clamped.
_CLAMPED_SLOPE = (-GAMMA / (ZETA - GAMMA)) * (ZETA / (ZETA - GAMMA))


@dataclass(frozen=True)
class AdaRoundLoss:
    """AdaRound's loss of a layer as a function of its mask parameters V, with its gradient
    written out: autograd would keep a dozen full-size tensors per step, and the fit of a
    large layer is bound by those passes over memory, not by its matrix products.

    A weight's error is ``residual - slope * h(V)``: a weight whose floor lies outside
    ``low .. high - 1`` has a fixed code (its slope is 0), every other one ``floor + h(V)``.
    """

    residual: Tensor  # w - scale * clamp(floor, low, high)
    slope: Tensor  # scale where the code is floor + h(V), else 0
    norm: float  # 1 / nearest rounding's reconstruction error
    h: Tensor | None  # (g, d, d) second moment of the inputs, or
    rows: Tensor | None  # (g, n, d) input rows, ADAROUND_BATCH_ROWS of them drawn per step

    def soft(self, v: Tensor) -> Tensor:
        """The rectified sigmoid h(V) in [0, 1]."""
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def value(self, v: Tensor, beta: float | None, pick: Tensor | None = None) -> Tensor:
        """The loss: reconstruction error over nearest's, plus lambda times the mean of
        ``1 - |2 h(V) - 1|^beta`` (no regulariser when ``beta`` is None)."""
        soft = self.soft(v)
        e = self.residual - self.slope * soft
        if self.h is not None:
            loss = torch.einsum("god,gde,goe->", e, self.h, e) * self.norm
        else:
            assert self.rows is not None and pick is not None
            out = torch.bmm(self.rows[:, pick], e.transpose(1, 2))
            loss = out.pow(2).sum() * (self.norm / len(pick))
        if beta is not None:
            loss = loss + ADAROUND_LAMBDA * (1 - (2 * soft - 1).abs().pow(beta)).mean()
        return loss

    @torch.no_grad()
    def gradient(self, v: Tensor, beta: float | None, pick: Tensor | None = None) -> Tensor:
        """d value / dV, computed in place."""
        sig = torch.sigmoid(v)
        dsoft = torch.addcmul(sig, sig, sig, value=-1.0)  # sigmoid'(V), 0 where h(V) is clamped
        F.threshold_(dsoft, _CLAMPED_SLOPE, 0.0)
        soft = sig.mul_(ZETA - GAMMA).add_(GAMMA).clamp_(0.0, 1.0)
        e = torch.addcmul(self.residual, self.slope, soft, value=-1.0)
        if self.h is not None:
            grad = torch.bmm(e, self.h).mul_(2.0 * self.norm)
        else:
            assert self.rows is not None and pick is not None
            batch = self.rows[:, pick]
            out = torch.bmm(batch, e.transpose(1, 2))
            grad = torch.bmm(out.transpose(1, 2), batch).mul_(2.0 * self.norm / len(pick))
        grad.mul_(self.slope).neg_()  # d loss / d h(V) of the reconstruction
        if beta is not None:  # d/dh of -|t|^beta with t = 2h - 1 is -2 beta t |t|^(beta - 2)
            t = soft.mul_(2.0).sub_(1.0)
            factor = -2.0 * ADAROUND_LAMBDA * beta / t.numel()
            grad.addcmul_(t.abs().pow_(beta - 2.0), t, value=factor)
        return grad.mul_(dsoft).mul_(ZETA - GAMMA)


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
    v = _initial_v(ratio - floor)
    fixed = torch.clamp(floor, low, high)
    slope = torch.where((floor >= low) & (floor <= high - 1), scale, 0.0)
    h_mat = None if h is None else h.float()
    rows = None if x is None else x.float()
    with torch.no_grad():  # the loss is scale-free: rec / (nearest rounding's), reg a mean
        near = scale * nearest_codes(w, scale, zero_point, qmin, qmax)
        rec0 = row_errors(w, near, h=h_mat, x=rows).sum()
    loss = AdaRoundLoss(residual=w - scale * fixed, slope=slope,
                        norm=1.0 / float(rec0.clamp(min=1e-30)), h=h_mat, rows=rows)
    step = lr if lr is not None else min(0.1, max(3e-3, 30.0 / max(iters, 1)))
    optimizer = torch.optim.Adam([v], lr=step, fused=True)  # one pass over V per step
    generator = torch.Generator().manual_seed(seed)
    warmup = int(ADAROUND_WARMUP * iters)
    start, end = ADAROUND_BETA
    for it in range(iters):
        beta = None
        if it >= warmup:
            progress = (it - warmup) / max(iters - warmup, 1)
            beta = end + (start - end) * (1 - progress)  # linear 20 -> 2
        pick = None
        if rows is not None:
            pick = torch.randint(rows.shape[1], (ADAROUND_BATCH_ROWS,), generator=generator)
        v.grad = loss.gradient(v, beta, pick)
        optimizer.step()
    with torch.no_grad():
        soft = loss.soft(v)
        codes = torch.clamp(floor + (soft >= 0.5).float(), low, high)
    return codes, soft


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

