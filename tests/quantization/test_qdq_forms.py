"""Each tensor quantizer states its own QDQ form: what the ONNX export writes for it."""

from __future__ import annotations

import pytest
import torch

from quantsearch.quantization._codes import NoQdqFormError
from quantsearch.quantization._onnx_graph import _int_type
from quantsearch.quantization._tensor_quant import (
    AffineWeightQuant,
    DoReFaWeightQuant,
    EmaActivationQuant,
    LsqQuant,
    SignQuant,
    TensorQuant,
)


def _weight() -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(0))


def test_affine_weight_codes_dequantize_to_the_quantized_weight_exactly() -> None:
    quant = AffineWeightQuant(4, scheme="per_channel_symmetric", dtype="int", channels=6)
    x_hat = quant(_weight())
    form = quant.qdq_weight(x_hat)
    assert (form.bits, form.qmin, form.qmax, form.axis) == (4, -7, 7, 0)
    assert form.codes is not None and int(form.codes.abs().max()) == 7
    assert form.scale.shape == form.zero_point.shape == (6,)
    assert form.scale.dtype == torch.float32 and form.zero_point.dtype == torch.int32
    shifted = (form.codes - form.zero_point.reshape(-1, 1)).float()
    assert torch.equal(shifted * form.scale.reshape(-1, 1), x_hat)


def test_dorefa_and_sign_weights_are_odd_integer_grids() -> None:
    # Levels 0..3 of 2k/3 - 1 are the codes -3, -1, 1, 3 at scale 1/3, zero point 0.
    dorefa = DoReFaWeightQuant(2)
    x_hat = dorefa(_weight())
    form = dorefa.qdq_weight(x_hat)
    assert form.codes is not None and set(form.codes.unique().tolist()) <= {-3, -1, 1, 3}
    assert (form.qmin, form.qmax, form.axis, int(form.zero_point)) == (-3, 3, None, 0)
    assert float(form.scale) == pytest.approx(1 / 3)
    torch.testing.assert_close(form.codes.float() * form.scale, x_hat)
    # Signs, sign(0) = +1, are the codes -1 and +1 at scale 1.
    sign = SignQuant(window=False)
    x_hat = sign(torch.tensor([[-0.5, 0.0, 2.0]]))
    form = sign.qdq_weight(x_hat)
    assert form.codes is not None and form.codes.tolist() == [[-1, 1, 1]]
    assert (form.bits, form.qmin, form.qmax, float(form.scale)) == (1, -1, 1, 1.0)
    # The narrowest ONNX types that hold them: int2 (opset 25) and int4; int8 without sub-byte.
    assert _int_type(-1, 1, 25, True, weight=True).name == "int2"
    assert _int_type(-1, 1, 21, True, weight=True).name == "int4"
    assert _int_type(-3, 3, 25, True, weight=True).name == "int4"
    assert _int_type(-3, 3, 25, False, weight=True).name == "int8"


def test_an_activation_form_exists_once_a_range_was_observed() -> None:
    ema = EmaActivationQuant(8, scheme="per_tensor_affine", dtype="uint")
    assert ema.qdq_activation() is None  # eval mode leaves it in float until then
    ema.observe(torch.linspace(-1.0, 3.0, 50))
    form = ema.qdq_activation()
    assert form is not None and form.codes is None
    assert (form.qmin, form.qmax, form.axis, form.scale.shape) == (0, 255, None, ())
    assert float(form.scale) == pytest.approx(4.0 / 255)
    lsq = LsqQuant(4, dtype="uint")
    assert lsq.qdq_activation() is None
    lsq.observe(torch.full((10,), 2.0))
    form = lsq.qdq_activation()
    assert form is not None and (form.qmin, form.qmax, int(form.zero_point)) == (0, 15, 0)
    assert float(form.scale) == pytest.approx(float(lsq.scale.detach().abs()))


def test_a_block_without_a_form_says_which_method_it_lacks() -> None:
    with pytest.raises(NoQdqFormError, match=r"BNN's sign activation .* has no QDQ form"):
        SignQuant(window=True).qdq_activation()

    class Plain(TensorQuant):
        pass

    with pytest.raises(NoQdqFormError, match=r"^Plain has no QDQ form for a weight \(it defines "
                                             r"no qdq_weight\)$"):
        Plain().qdq_weight(_weight())
    with pytest.raises(NoQdqFormError, match="Plain has no QDQ form for an activation"):
        Plain().qdq_activation()
