"""A causal byte-level language model on text that ships with Python: the standard library's own
``.py`` sources (``Path(os.__file__).parent``), objective perplexity.

The model is an ``nn.TransformerEncoder`` run with a causal mask: byte embeddings and learned
positions in, next-byte scores out. Its ``nn.MultiheadAttention`` and ``nn.Linear`` layers are
quantized per layer (see ``search_spaces/char_lm_stdlib.yaml``). Items are ``(context,
next_bytes)`` pairs of byte indices; the loss is the mean cross-entropy over every position, and
``evaluate`` returns each window's mean negative log-likelihood (nats per byte), from which
perplexity is ``exp`` of their mean (every window has the same length) with a bootstrap interval.

Options: ``chars`` (bytes of source read, split 80/10/10 in file order), ``context`` (window
length), ``width``, ``layers``, ``heads``. Use it with
``task: {name: ../examples/char_lm_task.py:make_task, options: {...}}``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from quantsearch.pipeline import nll_per_example, perplexity_of
from quantsearch.tasks import Task, TaskError, TaskMetric, TrainConfig

OPTIONS = {"chars": 400_000, "context": 64, "width": 64, "layers": 2, "heads": 4}
VOCAB = 256


PERPLEXITY = TaskMetric("perplexity", "minimize", "perplexity (per byte)", reduce=perplexity_of)


class CausalByteTransformer(nn.Module):
    """Byte indices ``(batch, time)`` in, next-byte scores ``(batch, time, 256)`` out."""

    def __init__(self, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False
        )
        self.head = nn.Linear(width, VOCAB)
        mask = torch.full((context, context), float("-inf")).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        steps = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:steps]
        hidden = self.encoder(hidden, mask=self.causal_mask[:steps, :steps], is_causal=True)
        return self.head(hidden)


def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean next-byte cross-entropy over every position of the batch."""
    tokens, targets = batch
    return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


def evaluate(model: nn.Module, batches: Any) -> dict[str, Tensor]:
    """Each window's mean NLL in nats per byte: perplexity is exp of their mean."""
    # check=False: no torchmetrics needed (tests/pipeline checks the two agree).
    nll = [nll_per_example(model(tokens), targets, check=False) for tokens, targets in batches]
    return {"perplexity": torch.cat(nll)}


def stdlib_bytes(limit: int) -> bytes:
    """The first ``limit`` bytes of the standard library's top-level ``.py`` files, in name
    order (the same on every machine with the same Python)."""
    root = Path(os.__file__).parent
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return b"".join(chunks)[:limit]


def _windows(data: bytes, context: int) -> TensorDataset:
    array = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    count = (len(array) - 1) // context
    if count < 1:
        raise TaskError(f"char-lm: {len(array)} bytes hold no window of {context + 1}")
    span = array[: count * context + 1]
    inputs = span[:-1].reshape(count, context)
    targets = span[1:].reshape(count, context)
    return TensorDataset(inputs, targets)


def make_task(*, data_dir: Path | None, options: dict[str, Any], seed: int) -> Task:
    """Windows of ``context`` bytes; the first 80% of the text trains, then 10% / 10%."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TaskError(f"char-lm: unknown option(s) {unknown}; allowed: {sorted(OPTIONS)}")
    settings = {**OPTIONS, **options}
    context = int(settings["context"])
    text = stdlib_bytes(int(settings["chars"]))
    cut1, cut2 = int(len(text) * 0.8), int(len(text) * 0.9)
    train = _windows(text[:cut1], context)
    return Task(
        name="char-lm",
        build_model=functools.partial(
            CausalByteTransformer, context, int(settings["width"]), int(settings["layers"]),
            int(settings["heads"]),
        ),
        train_set=train,
        val_set=_windows(text[cut1:cut2], context),
        test_set=_windows(text[cut2:], context),
        dummy_input=train.tensors[0][:1],
        loss=loss,
        evaluate=evaluate,
        metrics=(PERPLEXITY,),
        default_train_config=TrainConfig(epochs=4, batch_size=32, lr=2e-3, optimizer="adamw"),
        description=f"byte-level causal transformer on {len(text)} bytes of the stdlib sources",
    )
