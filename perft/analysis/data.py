"""Analysis data: LLM-Adapters JSON records -> the training prompts, batched, with group ids.

Routing is looked at on the very text the adapters were trained on (`build_prompt` with
the output appended), so the statistics describe what the model does during fine-tuning
and evaluation alike. Every problem with the file is found before a model is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perft.data.dataset import encodable
from perft.data.dataset import load_records as read_records
from perft.data.prompts import build_prompt
from perft.errors import PerftError

MISSING_GROUP = "(missing)"


@dataclass
class AnalysisData:
    """Prompts to route, and the group (split value) of each."""

    texts: list[str]
    group_ids: list[int]
    group_names: list[str]
    source: str = ""

    def batches(self, tokenizer: Any, *, batch_size: int, max_length: int) -> Iterator[dict[str, torch.Tensor]]:
        """Right-padded token batches with per-sample group ids, in file order."""
        for start in range(0, len(self.texts), batch_size):
            chunk = self.texts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            yield {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "groups": torch.tensor(self.group_ids[start : start + batch_size], dtype=torch.long),
            }

    def num_batches(self, batch_size: int) -> int:
        return (len(self.texts) + batch_size - 1) // batch_size


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read LLM-Adapters records (any format `perft train` reads) with at least an `instruction` each.

    Unlike training data, `output` is optional and extra fields are kept (for `split_by`).
    """
    records = read_records(path)
    if not records:
        raise PerftError(f"{path} must hold a non-empty JSON list of records (instruction, input, output)")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise PerftError(f"{path}: record {i} has no text field 'instruction'; expected LLM-Adapters records")
        for key in ("input", "output"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise PerftError(f"{path}: record {i} field {key!r} must be text")
        for key in ("instruction", "input", "output"):
            text = record.get(key)
            if isinstance(text, str) and not encodable(text):
                raise PerftError(f"{path}: record {i} field {key!r} is not valid Unicode text (an unpaired surrogate)")
    return records


def prepare_data(
    path: str | Path, *, split_by: str | None = None, max_samples: int | None = None
) -> AnalysisData:
    """Records -> prompts (instruction + input + output) and their group by `split_by`."""
    records = load_records(path)
    if max_samples is not None:
        if max_samples < 1:
            raise PerftError(f"--max-samples must be at least 1, got {max_samples}")
        records = records[:max_samples]
    if split_by is not None and not any(split_by in r for r in records):
        fields = sorted({k for r in records for k in r})
        raise PerftError(f"no record of {path} has the field {split_by!r} to split by; fields: {fields}")
    texts = [build_prompt(r["instruction"], r.get("input"), r.get("output") or "") for r in records]
    if split_by is None:
        return AnalysisData(texts, [0] * len(texts), ["all"], str(path))
    labels = [_label(r.get(split_by, None)) for r in records]
    names = sorted(set(labels))
    ids = {name: i for i, name in enumerate(names)}
    return AnalysisData(texts, [ids[label] for label in labels], names, str(path))


def _label(value: Any) -> str:
    if value is None:
        return MISSING_GROUP
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)
