from __future__ import annotations

import pytest
import torch

from quantsearch.quantization.testing import ConformanceNet as TinyNet
from quantsearch.quantization.testing import example_batch as batch
from quantsearch.quantization.testing import make_net

__all__ = ["TinyNet", "batch", "make_net"]


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    torch.set_num_threads(1)
