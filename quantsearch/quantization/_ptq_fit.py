"""Fitting a post-training weight to its layer's calibration data: the rounding and the bias.

During ``PtqQuantizer.calibrate()`` each Conv1d/Conv2d/Linear layer that asks for a learned
rounding or a bias correction gets a :class:`LayerInputs`: it keeps a uniform sample of the
layer's float input rows (a conv's input patches, as ``F.unfold`` lays them out) and the exact
mean row over every output position. When the calibration ends, :func:`fit_layer` rounds the
(BatchNorm-folded) weight on the grid its observer chose, with AdaRound or GPTQ
(:mod:`._rounding`), and corrects the bias by the mean output change (Nagel et al. 2019,
"Data-Free Quantization", empirical bias correction: ``b += (W - W_hat) E[x]``). With
``fit_inputs: quantized`` a second :class:`LayerInputs` holds the same rows as the quantized
model feeds them (the layers before fitted), and both fits reproduce the float layer's output
from those (``b += W E[x] - W_hat E[x_hat]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._rounding import ADAROUND_BATCH_ROWS, adaround, gptq, nearest_codes, row_errors

__all__ = [
    "CALIBRATION_ROWS",
    "TARGET_DAMP",
    "FitRecord",
    "LayerInputs",
    "fit_layer",
    "fits_layer",
    "quantized_target",
]

#: The most input rows a layer keeps (fewer for very wide rows, see ``_row_cap``).
CALIBRATION_ROWS = 4096
_ROW_FLOATS = 2**24  # at most 64 MiB of float32 rows per layer


_Pair = tuple[int, ...]


def fits_layer(module: nn.Module) -> bool:
    """Whether a learned rounding or a bias correction applies to this layer type."""
    return type(module) in (nn.Conv1d, nn.Conv2d, nn.Linear)


def _row_cap(width: int) -> int:
    return max(1024, min(CALIBRATION_ROWS, _ROW_FLOATS // max(width, 1)))


class LayerInputs:
    """A uniform sample of one layer's input rows over a calibration, and their exact mean.

    The sample keeps the rows with the smallest random keys seen so far, which is a uniform
    sample without replacement of every row of every batch (reservoir sampling by keys).
    """

    def __init__(self, module: nn.Module, seed: int) -> None:
        self.module = module
        self.conv = isinstance(module, (nn.Conv1d, nn.Conv2d))
        weight = module.weight
        self.width = weight[0].numel() * (module.groups if self.conv else 1)
        self.cap = _row_cap(self.width)
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: Tensor | None = None
        self.keys: Tensor | None = None
        self.total = torch.zeros(self.width, dtype=torch.float64)
        self.count = 0

    # -- geometry of a conv -------------------------------------------------------------
    def _padded(self, x: Tensor) -> tuple[Tensor, _Pair, _Pair, _Pair]:
        """The input padded as the conv pads it, as 4-D, with kernel, stride and dilation."""
        m = self.module
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        if isinstance(m, nn.Conv1d):  # a Conv1d is a Conv2d of height 1
            return x.unsqueeze(2), (1, *m.kernel_size), (1, *m.stride), (1, *m.dilation)
        return x, tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Record one batch of the layer's input."""
        x = x.detach().float()
        if not self.conv:
            rows = x.reshape(-1, x.shape[-1])
            self.total += rows.sum(0).double().cpu()
            self.count += rows.shape[0]
            self._sample(rows.shape[0], lambda pick: rows[pick])
            return
        xp, (kh, kw), (sh, sw), (dh, dw) = self._padded(x)
        n, c, hp, wp = xp.shape
        ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
        summed = xp.sum(0)
        mean = torch.stack([
            summed[:, i * dh : i * dh + (ho - 1) * sh + 1 : sh,
                   j * dw : j * dw + (wo - 1) * sw + 1 : sw].sum((1, 2))
            for i in range(kh) for j in range(kw)
        ], dim=1)  # (c, kh * kw): each patch entry summed over every output position
        self.total += mean.reshape(-1).double().cpu()
        self.count += n * ho * wo
        rows_h = torch.arange(kh, device=x.device) * dh
        rows_w = torch.arange(kw, device=x.device) * dw

        def gather(pick: Tensor) -> Tensor:
            pick = pick.to(x.device)
            image, rest = pick // (ho * wo), pick % (ho * wo)
            hi = (rest // wo)[:, None] * sh + rows_h[None, :]
            wi = (rest % wo)[:, None] * sw + rows_w[None, :]
            patches = xp[image[:, None, None], :, hi[:, :, None], wi[:, None, :]]
            return patches.permute(0, 3, 1, 2).reshape(len(pick), c * kh * kw)

        self._sample(n * ho * wo, gather)

    def _sample(self, total: int, gather: Any) -> None:
        keys = torch.rand(total, generator=self.generator)
        if self.keys is not None and len(self.keys) >= self.cap:
            candidates = torch.nonzero(keys < self.keys.max()).reshape(-1)
        else:
            candidates = torch.arange(total)
        if len(candidates) > self.cap:  # only the cap smallest keys can survive the merge
            candidates = candidates[torch.topk(keys[candidates], self.cap, largest=False).indices]
        if len(candidates) == 0:
            return
        rows, new_keys = gather(candidates), keys[candidates]
        if self.rows is not None and self.keys is not None:
            rows = torch.cat([self.rows, rows.to(self.rows.device)])
            new_keys = torch.cat([self.keys, new_keys])
        if len(new_keys) > self.cap:
            keep = torch.topk(new_keys, self.cap, largest=False).indices
            rows, new_keys = rows[keep.to(rows.device)], new_keys[keep]
        self.rows, self.keys = rows, new_keys

    def mean(self) -> Tensor:
        """The mean input row over every output position of every batch (float32)."""
        return (self.total / max(self.count, 1)).float()


@dataclass(frozen=True)
class FitRecord:
    """What fitting one layer did, measured on its recorded rows."""

    rounding: str
    #: E||W x - W_hat x_hat||^2 summed over outputs (x_hat = x unless the fit saw the quantized
    #: model's inputs), for nearest rounding and for the rounding used.
    error_nearest: float
    error: float
    #: Share of AdaRound's soft mask within 1e-3 of 0 or 1 when it stopped (1.0 otherwise).
    mask_binary: float
    #: The bias correction added to the layer's (folded) bias, or None when it had no bias.
    bias_shift: Tensor | None
    rows: int


def _grouped(tensor: Tensor, groups: int) -> Tensor:
    """(o, ...) -> (g, o / g, d): each group's rows of a flattened weight or per-row values."""
    return tensor.reshape(groups, tensor.shape[0] // groups, -1)


#: Ridge of the quantized-inputs target, relative to the mean diagonal of the inputs' second
#: moment (GPTQ's own default dampening): it keeps the target at W where the rows say nothing.
TARGET_DAMP = 0.01


def _grouped_rows(inputs: LayerInputs, groups: int) -> Tensor:
    rows = inputs.rows if inputs.rows is not None else torch.zeros(1, inputs.width)
    return rows.float().reshape(len(rows), groups, -1).transpose(0, 1).cpu()  # (g, n, d)


def quantized_target(w: Tensor, x: Tensor, x_hat: Tensor, h_hat: Tensor) -> Tensor:
    """The weight V (g, o, d) whose output on the quantized model's rows ``x_hat`` best matches
    the float layer's output on the float rows ``x``: min ||x W^T - x_hat V^T||^2 +
    damp ||V - W||^2, so V = W where the two inputs agree. Rounding V on ``x_hat`` then fits
    the float output from the quantized inputs (AdaRound's asymmetric reconstruction)."""
    cross = torch.bmm(x_hat.transpose(1, 2), x) / x.shape[1]
    diagonal = torch.diagonal(h_hat, dim1=1, dim2=2)
    damp = TARGET_DAMP * diagonal.mean(1, keepdim=True).clamp(min=1e-12)
    damped = h_hat + torch.diag_embed(damp.expand_as(diagonal))
    step = torch.linalg.solve(damped, torch.bmm(cross - h_hat, w.transpose(1, 2)))
    return w + step.transpose(1, 2)


@torch.no_grad()
def fit_layer(
    wrapper: Any, inputs: LayerInputs, *, rounding: str, iters: int, damp: float,
    bias_correction: bool, seed: int, quantized: LayerInputs | None = None,
) -> FitRecord:
    """Round the layer's weight with ``rounding`` on its observer's grid, store the codes in
    its weight quantizer (``PtqWeightQuant.set_rounding``) and, with ``bias_correction``,
    add ``W E[x] - W_hat E[x_hat]`` to the deployed bias (the folded BatchNorm's beta, or the
    layer's bias; a layer with neither is left alone).

    ``inputs`` are the float model's rows. ``quantized``, the same rows as the quantized model
    feeds them to the layer (sampled at the same positions), makes the fit reproduce the float
    output from those: the layer then also compensates the error of the layers before it.
    Without it both are the float rows."""
    module, quant = wrapper.module, wrapper.weight_quant
    groups = module.groups if inputs.conv else 1
    weight, _ = wrapper._folded()
    weight = weight.detach().float()
    quant.clear_rounding()
    quant(weight, True)  # the observer's grid: scale and zero point from this weight
    out = weight.shape[0]
    scale = quant.scale.float().reshape(-1).expand(out).reshape(out, 1)
    zero = quant.zero_point.float().reshape(-1).expand(out).reshape(out, 1)
    w, s, z = (_grouped(t, groups) for t in (weight.reshape(out, -1), scale, zero))
    x = _grouped_rows(inputs, groups)
    x_hat = None if quantized is None else _grouped_rows(quantized, groups)
    rows = x if x_hat is None else x_hat  # what the quantized layer computes on
    # The second moment costs n d^2: build it only where the solver or the target needs it.
    use_h = rounding == "gptq" or (rounding == "adaround" and w.shape[2] <= ADAROUND_BATCH_ROWS)
    fits = rounding != "nearest"
    h = None
    if use_h or (fits and x_hat is not None):
        h = torch.bmm(rows.transpose(1, 2), rows) / rows.shape[1]
    target = w if x_hat is None or not fits else quantized_target(w, x, rows, h)
    h = h if use_h else None
    qmin, qmax = quant.qmin, quant.qmax
    nearest = nearest_codes(w, s, z, qmin, qmax)
    error_nearest = row_errors(w, nearest * s, h=h, x=x, x_hat=x_hat)
    errors = error_nearest
    mask_binary = 1.0
    if rounding == "adaround":
        codes, soft = adaround(target, s, z, qmin, qmax, iters=iters, seed=seed,
                               h=h, x=None if use_h else rows)
        mask_binary = float(((soft < 1e-3) | (soft > 1 - 1e-3)).float().mean())
    elif rounding == "gptq":
        assert h is not None
        codes = gptq(target, s, z, qmin, qmax, h=h, damp=damp)
    else:
        codes = nearest
    if fits:
        # Rows (output channels) are independent: keep nearest where it reconstructs better
        # (GPTQ is greedy and can lose on a layer of a few columns).
        errors = row_errors(w, codes * s, h=h, x=x, x_hat=x_hat)
        worse = errors > error_nearest
        codes = torch.where(worse.unsqueeze(2), nearest, codes)
        errors = torch.minimum(errors, error_nearest)
        base = torch.round(w * torch.reciprocal(s))  # what the quantizer's forward rounds to
        quant.set_rounding((codes - base).reshape(weight.shape), rounding)
    shift = None
    if bias_correction:
        w_hat = _grouped(quant(weight, True).reshape(out, -1), groups)
        mean = inputs.mean().reshape(groups, -1, 1)
        mean_hat = mean if quantized is None else quantized.mean().reshape(groups, -1, 1)
        change = torch.bmm(w, mean) - torch.bmm(w_hat, mean_hat)
        shift = _apply_bias_shift(wrapper, change.reshape(out))
    return FitRecord(rounding, float(error_nearest.sum()), float(errors.sum()), mask_binary, shift,
                     rows.shape[1])


def _apply_bias_shift(wrapper: Any, shift: Tensor) -> Tensor | None:
    """Add ``shift`` (replacing the one a previous calibration added) to the bias the layer
    deploys; None when it has none to correct."""
    bn, module = wrapper.bn, wrapper.module
    target = bn.bias if bn is not None else getattr(module, "bias", None)
    if target is None:
        return None
    quant = wrapper.weight_quant
    previous = quant.bias_shift if quant.bias_shift.numel() == shift.numel() else 0.0
    target.add_((shift - previous).to(target.dtype))  # a second calibration replaces the first
    quant.bias_shift = shift.detach().clone()
    return shift
