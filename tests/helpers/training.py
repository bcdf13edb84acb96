"""Shared pieces of the `perft train` tests: a tiny MoE model on disk and a learnable data set."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import torch

COLOURS = ["red", "blue", "green", "black", "white", "brown"]
ANIMALS = ["fox", "dog", "cat", "cow", "owl", "bee", "ant", "elk"]
TEMPLATE_WORDS = (
    "Below is an instruction that describes a task paired with input provides further context Write response "
    "appropriately completes the request ### Instruction Input Response : . ,"
).split()
REPO = Path(__file__).resolve().parents[2]


def make_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Each animal has one colour: a mapping the adapters can learn in a few steps."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        animal = rng.choice(ANIMALS)
        colour = COLOURS[ANIMALS.index(animal) % len(COLOURS)]
        record = {"instruction": f"what colour is the {animal}", "output": f"the {animal} is {colour}"}
        if i % 3 == 0:
            record["input"] = f"the quick {animal}"
        records.append(record)
    return records


def make_workspace(root: Path, n_records: int = 60, arch: str = "olmoe") -> dict[str, Path]:
    """A tiny model + tokenizer directory and a JSON data file under `root`."""
    from perft.testing import save_tiny_model, save_tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    model = save_tiny_model(arch, root / "model")
    vocab = " ".join(COLOURS + ANIMALS + TEMPLATE_WORDS + ["what", "colour", "is", "the", "quick"])
    save_tiny_tokenizer(model, [vocab])
    data = root / "data.json"
    data.write_text(json.dumps(make_records(n_records)), encoding="utf-8")
    return {"root": root, "model": model, "data": data}


def config(ws: dict[str, Path], output: Path, **overrides: Any) -> Any:
    """A fast TrainingConfig on the workspace (PERFT-R with both balance losses, accumulation 2)."""
    from perft.training import TrainingConfig

    values: dict[str, Any] = dict(
        model=str(ws["model"]), data=str(ws["data"]), output=str(output), rank=4, num_experts=4, top_k=2,
        lr=1e-2, batch_size=4, micro_batch_size=2, epochs=1.0, val_set_size=8, eval_steps=4, save_steps=4,
        warmup_steps=2, cutoff_len=64, logging_steps=2, router_aux_loss_coef=0.01,
        base_router_aux_loss_coef=0.01, report_to="none", progress=False, seed=7,
    )
    values.update(overrides)
    return TrainingConfig.from_dict(values)


def config_flags(cfg: Any) -> list[str]:
    """The command line that reproduces `cfg` (for subprocess runs)."""
    flags: list[str] = []
    for key, value in cfg.to_dict().items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def tree_snapshot(root: Path) -> dict[str, str] | None:
    """Relative path -> content hash of every file (None when `root` does not exist)."""
    if not root.exists():
        return None
    snap = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        snap[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return snap


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    return env


PYTHON = sys.executable


@contextlib.contextmanager
def one_thread():
    """Keep torch on one thread (the CI box has two cores shared by two test workers)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
