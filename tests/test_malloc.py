"""The allocator setting the study's processes use: training steps stop faulting in pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

STEPS_SCRIPT = """
import resource, torch
from torch import nn
from quantsearch._malloc import keep_freed_memory
from quantsearch.quantization import QAT_Quantizer
from quantsearch.tasks import DigitsCNN

torch.set_num_threads(1)
applied = keep_freed_memory()
torch.manual_seed(0)
model = DigitsCNN()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
config = [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]
model = QAT_Quantizer(model, config, optimizer, dummy_input=torch.rand(1, 1, 8, 8)).compress()
x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))

def steps(n):
    for _ in range(n):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

steps(20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(100)
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_training_steps_stop_faulting_in_pages() -> None:
    result = subprocess.run(
        [sys.executable, "-c", STEPS_SCRIPT], capture_output=True, text=True, check=True
    )
    applied, faults = result.stdout.split()
    assert applied == "True"
    assert float(faults) < 2  # glibc defaults: 17 to 505 per step (benchmarks/bench_fake_quant.py)
