"""Model size accounting and the packed export: integer weights really stored at their bits.

File layout: the magic ``QSPACK1\\n``, a little-endian uint32 header length, a JSON header, then
the payload. The payload holds, per tensor, either float32 values or the integer codes packed
little-endian bit by bit (1, 2, 4 or any other width; each tensor starts on a byte boundary),
followed by its float32 scales and int32 zero points. The payload's size is exactly what
:func:`model_size_bytes` computes; the header is the only overhead.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._codes import decode
from ._tensor_quant import TensorQuant
from ._wrapper import keep_transformers_on_slow_path, unwrapped_float_state, wrappers_of

__all__ = [
    "PackedFileError",
    "load_packed",
    "model_size_bytes",
    "pack_codes",
    "save_packed",
    "unpack_codes",
]

_MAGIC = b"QSPACK1\n"


def model_size_bytes(model: nn.Module) -> int:
    """Bytes the model needs deployed.

    Quantized weights count at their bits (rounded up to whole bytes per tensor), every other
    floating-point tensor of the state dict at 32 bits, plus the scales and zero points of every
    quantized tensor. Integer bookkeeping buffers (BatchNorm's ``num_batches_tracked``) are not
    needed for inference and are not counted. A float model therefore takes exactly 4 bytes per
    floating-point element.
    """
    total = sum(wrapper.storage_bytes() for wrapper in wrappers_of(model).values())
    return total + sum(4 * t.numel() for t in unwrapped_float_state(model).values())


def pack_codes(codes: Tensor, bits: int) -> bytes:
    """Pack non-negative integer codes below 2^bits into ceil(n * bits / 8) bytes."""
    values = codes.reshape(-1).to(torch.int64).cpu().numpy()
    if bits == 8:
        return values.astype(np.uint8).tobytes()
    planes = ((values[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_codes`."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return torch.from_numpy(raw[:count].astype(np.int64))
    planes = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits)
    values = (planes.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(axis=1)
    return torch.from_numpy(values)


class _Payload:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> dict[str, int]:
        self.chunks.append(data)
        self.size += len(data)
        return {"offset": self.size - len(data), "nbytes": len(data)}

    def add_float(self, tensor: Tensor) -> dict[str, int]:
        return self.add(tensor.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())

    def add_int32(self, tensor: Tensor) -> dict[str, int]:
        return self.add(tensor.detach().cpu().to(torch.int32).contiguous().numpy().tobytes())


def _qparam_record(payload: _Payload, meta: dict[str, Any]) -> dict[str, Any]:
    """Scales and zero points go to the payload; the rest of ``meta`` to the header."""
    record: dict[str, Any] = {k: v for k, v in meta.items() if k not in ("scale", "zero_point")}
    if "scale" in meta:
        record["scale"] = payload.add_float(meta["scale"])
    if "zero_point" in meta:
        record["zero_point"] = payload.add_int32(meta["zero_point"])
    return record


@torch.no_grad()
def save_packed(model: nn.Module, path: str | Path) -> int:
    """Write the deployed form of a compressed model (see the module docstring); returns bytes."""
    was_training = model.training
    model.eval()
    payload = _Payload()
    tensors: list[dict[str, Any]] = []
    activations: list[dict[str, Any]] = []
    folded: dict[str, str] = {}
    try:
        for name, wrapper in wrappers_of(model).items():
            if wrapper.bn_name is not None:
                folded[name] = wrapper.bn_name
            quants = wrapper.param_quants()
            quantized = wrapper.quantized_params() if quants else {}
            for key, tensor in wrapper.module.state_dict().items():
                if not tensor.is_floating_point():
                    continue
                full = f"{name}.{key}"
                if key in quants:
                    tensors.append(_pack_weight(payload, full, quants[key], quantized[key]))
                elif key == "bias" and wrapper.bn is not None:
                    tensors.append(_float_record(payload, full, wrapper.deployed_bias()))
                else:
                    tensors.append(_float_record(payload, full, tensor))
            if wrapper.bn is not None and getattr(wrapper.module, "bias", None) is None:
                tensors.append(_float_record(payload, f"{name}.bias", wrapper.deployed_bias()))
            for role in ("input", "output"):
                quant = getattr(wrapper, f"{role}_quant")
                if quant is not None:
                    activations.append(_activation_record(payload, name, role, quant))
        for key, tensor in unwrapped_float_state(model).items():
            tensors.append(_float_record(payload, key, tensor))
    finally:
        model.train(was_training)
    header = json.dumps(
        {"format": "quantsearch-packed", "version": 1, "tensors": tensors,
         "activations": activations, "folded": folded},
        separators=(",", ":"),
    ).encode()
    data = _MAGIC + struct.pack("<I", len(header)) + header + b"".join(payload.chunks)
    Path(path).write_bytes(data)
    return len(data)


def _float_record(payload: _Payload, name: str, tensor: Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(tensor.shape), "encoding": "float32",
            **payload.add_float(tensor)}


def _pack_weight(
    payload: _Payload, name: str, quant: TensorQuant, x_hat: Tensor
) -> dict[str, Any]:
    codes, meta = quant.codes(x_hat)
    if not torch.equal(decode(codes, quant.encoding, quant.bits, meta), x_hat):
        raise RuntimeError(f"{name}: integer codes do not reproduce the quantized weight")
    record = {"name": name, "shape": list(x_hat.shape), "encoding": quant.encoding,
              "bits": quant.bits, **payload.add(pack_codes(codes, quant.bits))}
    record["meta"] = _qparam_record(payload, meta)
    return record


def _activation_record(
    payload: _Payload, layer: str, role: str, quant: TensorQuant
) -> dict[str, Any]:
    record: dict[str, Any] = {"layer": layer, "role": role, "encoding": quant.encoding,
                              "bits": quant.bits}
    fixed = getattr(quant, "fixed_params", None)
    if fixed is not None:
        record["meta"] = _qparam_record(payload, fixed())
    return record


class _FixedActivation:
    """Eval-mode activation quantization of a deployed model (a forward (pre-)hook)."""

    def __init__(self, record: dict[str, Any], blob: bytes) -> None:
        self.encoding = record["encoding"]
        meta = record.get("meta", {})
        self.axis = meta.get("axis")
        self.qmin, self.qmax = meta.get("qmin", 0), meta.get("qmax", 0)
        if "scale" in meta:
            self.scale = _read(blob, meta["scale"], np.float32)
            self.zero_point = (
                _read(blob, meta["zero_point"], np.int32)
                if "zero_point" in meta
                else torch.zeros_like(self.scale, dtype=torch.int32)
            )

    def __call__(self, x: Tensor) -> Tensor:
        if self.encoding == "sign":
            return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(
                x, float(self.scale[0]), int(self.zero_point[0]), self.qmin, self.qmax
            )
        return torch.fake_quantize_per_channel_affine(
            x, self.scale.to(x.device), self.zero_point.to(x.device), self.axis, self.qmin,
            self.qmax,
        )


def _read(blob: bytes, where: dict[str, int], dtype: Any) -> Tensor:
    start = where["offset"]
    return torch.from_numpy(
        np.frombuffer(blob[start : start + where["nbytes"]], dtype=dtype).copy()
    )


def _decode_meta(blob: bytes, meta: dict[str, Any]) -> dict[str, Any]:
    out = dict(meta)
    if "scale" in meta:
        out["scale"] = _read(blob, meta["scale"], np.float32)
    if "zero_point" in meta:
        out["zero_point"] = _read(blob, meta["zero_point"], np.int32)
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


class PackedFileError(ValueError):
    """A packed file that is damaged, or is not one of this model (the message names it)."""


def _fail(path: str | Path, detail: str) -> PackedFileError:
    return PackedFileError(f"{path}: not a packed model of the given architecture: {detail}")


def _read_header(path: str | Path, data: bytes) -> tuple[dict[str, Any], bytes]:
    if not data.startswith(_MAGIC):
        raise PackedFileError(f"{path}: not a quantsearch packed model (bad magic bytes)")
    start = len(_MAGIC) + 4
    if len(data) < start:
        raise _fail(path, "the file ends inside its header")
    (length,) = struct.unpack("<I", data[len(_MAGIC) : start])
    if start + length > len(data):
        raise _fail(path, f"its header of {length} bytes runs past the end of the file")
    try:
        header = json.loads(data[start : start + length])
    except (ValueError, UnicodeDecodeError):
        raise _fail(path, "its header is not JSON") from None
    if not (
        isinstance(header, dict)
        and isinstance(header.get("tensors"), list)
        and isinstance(header.get("activations"), list)
        and isinstance(header.get("folded"), dict)
    ):
        raise _fail(path, "its header lacks the tensors, activations or folded entries")
    return header, data[start + length :]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_span(path: str | Path, where: Any, size: int, what: str, expected: int | None) -> None:
    """``where`` (offset, nbytes) lies inside the payload and holds ``expected`` bytes."""
    if not (isinstance(where, dict) and _is_count(where.get("offset"))
            and _is_count(where.get("nbytes"))):
        raise _fail(path, f"{what} has no valid offset and nbytes")
    if where["offset"] + where["nbytes"] > size:
        raise _fail(path, f"{what} runs past the end of the payload ({size} bytes)")
    if expected is not None and where["nbytes"] != expected:
        raise _fail(path, f"{what} holds {where['nbytes']} bytes, its shape needs {expected}")


def _check_meta(path: str | Path, meta: Any, size: int, what: str) -> None:
    if not isinstance(meta, dict):
        raise _fail(path, f"{what} has no quantization parameters")
    for key in ("scale", "zero_point"):
        if key in meta:
            _check_span(path, meta[key], size, f"{what}'s {key}", None)
            if meta[key]["nbytes"] % 4:
                raise _fail(path, f"{what}'s {key} is not a whole number of 4-byte values")


def _check_tensor(
    path: str | Path, record: Any, targets: dict[str, Tensor], size: int
) -> None:
    """Every number of a tensor record against the model and the payload, before allocating."""
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise _fail(path, "a tensor record has no name")
    name = record["name"]
    if name not in targets:
        raise _fail(path, f"tensor {name!r} has no place in the given model")
    expected = list(targets[name].shape)
    if record.get("shape") != expected:
        raise _fail(path, f"tensor {name!r} has shape {record.get('shape')!r}, the model's is "
                          f"{expected}")
    count = math.prod(expected)
    if record.get("encoding") == "float32":
        _check_span(path, record, size, f"tensor {name!r}", 4 * count)
        return
    bits = record.get("bits")
    if not (_is_count(bits) and 1 <= bits <= 32):
        raise _fail(path, f"tensor {name!r} has no bit width in 1..32")
    _check_span(path, record, size, f"tensor {name!r}", math.ceil(count * bits / 8))
    _check_meta(path, record.get("meta"), size, f"tensor {name!r}")


def _module(path: str | Path, model: nn.Module, name: Any) -> nn.Module:
    if isinstance(name, str):
        with contextlib.suppress(AttributeError):
            return model.get_submodule(name)
    raise _fail(path, f"the model has no layer {name!r}")


@torch.no_grad()
def load_packed(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a packed file into ``model``, a fresh float instance of the original architecture.

    Weights are decoded bit-exactly; folded BatchNorms become ``nn.Identity`` (their effect is in
    the conv's weight and bias); quantized inputs and outputs get fixed quantization hooks.
    Returns the model in eval mode; its outputs equal the compressed model's in eval mode.

    The header is checked against the model (every tensor's name and shape) and the payload
    (every offset and size) before anything is decoded: a damaged or foreign file raises
    :class:`PackedFileError` naming it, and never makes this allocate more than the model holds.
    """
    data = Path(path).read_bytes()
    header, blob = _read_header(path, data)
    for conv_name, bn_name in header["folded"].items():
        conv = _module(path, model, conv_name)
        _module(path, model, bn_name)
        if not isinstance(getattr(conv, "out_channels", None), int):
            raise _fail(path, f"folded layer {conv_name!r} is not a convolution")
        _set_module(model, bn_name, nn.Identity())
        if getattr(conv, "bias", None) is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
    targets = model.state_dict(keep_vars=True)
    for record in header["tensors"]:
        _check_tensor(path, record, targets, len(blob))
    for record in header["activations"]:
        if not isinstance(record, dict) or record.get("role") not in ("input", "output"):
            raise _fail(path, "an activation record has no role input or output")
        _module(path, model, record.get("layer"))
        if "meta" in record:
            _check_meta(path, record["meta"], len(blob), f"activation {record['layer']!r}")
    for record in header["tensors"]:
        name = record["name"]
        shape = record["shape"]
        chunk = blob[record["offset"] : record["offset"] + record["nbytes"]]
        try:
            if record["encoding"] == "float32":
                value = torch.from_numpy(np.frombuffer(chunk, dtype=np.float32).copy())
            else:
                count = math.prod(shape)
                codes = unpack_codes(chunk, record["bits"], count).reshape(shape)
                value = decode(codes, record["encoding"], record["bits"],
                               _decode_meta(blob, record["meta"]))
            target = targets[name]
            target.copy_(value.reshape(shape).to(target.dtype))
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise _fail(path, f"tensor {name!r} cannot be decoded ({error})") from None
    for record in header["activations"]:
        module = model.get_submodule(record["layer"])
        try:
            fixed = _FixedActivation(record, blob)
        except (KeyError, TypeError, ValueError) as error:
            raise _fail(path, f"activation {record['layer']!r} cannot be read ({error})") from None
        # An attention's input is its query, key and value; its output the first of two.
        count = 3 if isinstance(module, nn.MultiheadAttention) else 1
        if record["role"] == "input":
            module.register_forward_pre_hook(
                lambda _m, args, fixed=fixed, count=count: (
                    *(fixed(a) if isinstance(a, Tensor) else a for a in args[:count]),
                    *args[count:],
                )
            )
        elif count == 3:
            module.register_forward_hook(lambda _m, _args, out, fixed=fixed: (
                fixed(out[0]), *out[1:]
            ))
        else:
            module.register_forward_hook(lambda _m, _args, out, fixed=fixed: fixed(out))
    quantized = {r["layer"] for r in header["activations"]}
    quantized |= {
        r["name"].rsplit(".", 1)[0] for r in header["tensors"] if r["encoding"] != "float32"
    }
    keep_transformers_on_slow_path(model, quantized)
    return model.eval()
