"""load_packed on damaged or foreign files: one error naming the file, checked before decoding."""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from quantsearch.quantization import get_quantizer, load_packed
from quantsearch.quantization._pack import _MAGIC, PackedFileError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU6(), nn.Linear(6, 3))


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    config = [{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Linear"]}]
    quantizer = get_quantizer("qat")(_model(), config, optimizer=None,
                                     dummy_input=torch.zeros(1, 8))
    quantizer.compress()
    path = tmp_path / "model.qpk"
    quantizer.export_packed(path)
    return path


def _rewrite(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit the JSON header of a packed file in place, keeping its payload."""
    data = path.read_bytes()
    start = len(_MAGIC) + 4
    (length,) = struct.unpack("<I", data[len(_MAGIC) : start])
    header = json.loads(data[start : start + length])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(_MAGIC + struct.pack("<I", len(text)) + text + data[start + length :])


def _message(path: Path) -> str:
    with pytest.raises(PackedFileError) as caught:
        load_packed(path, _model())
    return str(caught.value)


def test_the_untouched_file_loads(packed: Path) -> None:
    assert isinstance(load_packed(packed, _model()), nn.Module)


def test_a_huge_shape_in_the_header_is_refused_before_allocating(packed: Path) -> None:
    def huge(header: dict[str, Any]) -> None:
        header["tensors"][0]["shape"] = [60_000, 60_000, 2]  # 27 GiB of int64 codes

    _rewrite(packed, huge)
    tracemalloc.start()
    try:
        message = _message(packed)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message == (
        f"{packed}: not a packed model of the given architecture: tensor '0.weight' has shape "
        "[60000, 60000, 2], the model's is [6, 8]"
    )
    assert peak < 10_000_000


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        (lambda h: h["tensors"][0].update(nbytes=10**9),
         "tensor '0.weight' runs past the end of the payload"),
        (lambda h: h["tensors"][0].update(nbytes=3),
         "tensor '0.weight' holds 3 bytes, its shape needs 24"),
        (lambda h: h["tensors"][0].update(bits=64), "tensor '0.weight' has no bit width in 1..32"),
        (lambda h: h["tensors"][0].update(name="9.weight"),
         "tensor '9.weight' has no place in the given model"),
        (lambda h: h["tensors"][0]["meta"]["scale"].update(offset=-1),
         "tensor '0.weight''s scale has no valid offset and nbytes"),
        (lambda h: h["folded"].update({"0": "7"}), "the model has no layer '7'"),
        (lambda h: h.pop("tensors"), "its header lacks the tensors, activations or folded entries"),
    ],
)
def test_a_header_that_does_not_fit_is_refused(
    packed: Path, change: Callable[[dict[str, Any]], None], detail: str
) -> None:
    _rewrite(packed, change)
    assert _message(packed).startswith(
        f"{packed}: not a packed model of the given architecture: {detail}"
    )


def test_a_truncated_file_is_refused(packed: Path) -> None:
    data = packed.read_bytes()
    packed.write_bytes(data[:40])
    assert "its header of" in _message(packed)
    packed.write_bytes(data[: len(data) - 5])
    assert _message(packed).endswith("runs past the end of the payload (" + str(
        len(data) - 5 - len(_MAGIC) - 4 - struct.unpack("<I", data[8:12])[0]) + " bytes)")
    packed.write_bytes(b"garbage")
    assert _message(packed) == f"{packed}: not a quantsearch packed model (bad magic bytes)"
