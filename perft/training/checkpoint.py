"""Training checkpoints: written atomically, safe to load, enough to continue bit-for-bit.

A checkpoint directory `checkpoint-<step>/` holds
- the adapter (`adapter_config.json` + `adapter_model.safetensors`: loadable as is by
  `PerftModel.from_pretrained`, or by `PeftModel.from_pretrained` for the LoRA baselines);
- `optimizer.safetensors` (AdamW moments, keyed by parameter name) + `optimizer.json`;
- `scheduler.json`; `rng_state_<rank>.safetensors` + `.json` (torch, CUDA, numpy and
  Python generators of every process);
- `trainer_state.json`, written last: step, data position, best validation loss, history,
  and the fingerprint of the config that wrote it.

Nothing here unpickles: tensors go through safetensors, the rest through JSON. Each
checkpoint is written into `.tmp-checkpoint-<step>/`, fsynced, then renamed into place, so
a process killed at any moment leaves either the previous complete checkpoints or the new
one, never a torn one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from perft.errors import PerftError
from perft.io import atomic_save_safetensors, load_safetensors
from perft.training.distributed import DistributedContext

STATE_NAME = "trainer_state.json"
FORMAT_VERSION = 1
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------------------- adapters
def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors of a PerftModel or a PEFT LoRA model."""
    if is_peft_model(model):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.adapter_state_dict()


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise PerftError(f"{source} does not fit this LoRA model (unexpected tensors {unexpected[:3]})")
        return
    model.load_adapter_state_dict(state, source=source)


def save_adapter(model: nn.Module, directory: Path) -> None:
    if is_peft_model(model):
        model.save_pretrained(str(directory), safe_serialization=True)
    else:
        model.save_pretrained(directory)


def adapter_weights_file(directory: Path) -> Path:
    return Path(directory) / "adapter_model.safetensors"


# ---------------------------------------------------------------------------- optimiser / rng
def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (keyed `<param name>::<key>`) and JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        name = names[index]
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    for group in groups:
        group["params"] = [names[i] for i in group["params"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor],
                         meta: dict, source: str) -> None:
    index = {name: i for i, name in enumerate(names)}
    saved_names = [n for g in meta["param_groups"] for n in g["params"]]
    if sorted(saved_names) != sorted(names):
        missing = sorted(set(names) - set(saved_names))[:3]
        raise PerftError(f"{source}: optimiser state is for other parameters (missing {missing}); "
                         "the checkpoint belongs to another model or method")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("::")
        state.setdefault(index[name], {})[field] = value
    for name, values in meta.get("scalars", {}).items():
        state.setdefault(index[name], {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = {k: (tuple(v) if k == "betas" else v) for k, v in group.items()}
        group["params"] = [index[n] for n in group["params"]]
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------- directories
def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` (those with a trainer_state.json), by step."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and (child / STATE_NAME).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for child in path.rglob("*"):
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    for child in [path, *[c for c in path.rglob("*") if c.is_dir()]]:
        _fsync_dir(child)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary directory into place, replacing an older one of the same name."""
    _fsync_tree(tmp)
    trash = None
    if final.exists():
        trash = final.with_name(f".trash-{final.name}")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temporaries(output_dir: Path) -> None:
    """Leftovers of a process killed while writing (never complete checkpoints)."""
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            if child.is_dir() and child.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(child, ignore_errors=True)


def rotate_checkpoints(output_dir: Path, keep: int | None, protect: set[int]) -> None:
    """Delete all but the newest `keep` checkpoints; steps in `protect` (the best) survive."""
    if keep is None:
        return
    checkpoints = list_checkpoints(output_dir)
    doomed = [(s, p) for s, p in checkpoints[:-keep] if s not in protect] if len(checkpoints) > keep else []
    for _, path in doomed:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- save / load
def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    scheduler: Any,
    state: dict[str, Any],
    ctx: DistributedContext,
) -> Path:
    """Write `checkpoint-<step>` atomically (all ranks call this; rank 0 writes all but RNG)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if ctx.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    ctx.barrier()
    tensors, meta = rng_state()
    atomic_save_safetensors(tmp / f"rng_state_{ctx.rank}.safetensors", tensors)
    (tmp / f"rng_state_{ctx.rank}.json").write_text(json.dumps(meta), encoding="utf-8")
    ctx.barrier()
    if ctx.is_main:
        save_adapter(model, tmp)
        opt_tensors, opt_meta = optimizer_state(optimizer, param_names)
        atomic_save_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta), encoding="utf-8")
        (tmp / "scheduler.json").write_text(json.dumps(_jsonable(scheduler.state_dict())), encoding="utf-8")
        payload = {"format_version": FORMAT_VERSION, **state}
        (tmp / STATE_NAME).write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
        replace_dir(tmp, final)
    ctx.barrier()
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_NAME
    if not path.is_file():
        raise PerftError(f"{checkpoint} is not a complete perft checkpoint (no {STATE_NAME}); "
                         "pick another checkpoint or start a new run")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PerftError(f"{path} is damaged ({err}); resume from an older checkpoint") from None
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise PerftError(f"{checkpoint} was written by a newer perft; upgrade perft to resume it")
    return state


def load_training_state(checkpoint: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        param_names: list[str], scheduler: Any, ctx: DistributedContext) -> None:
    """Restore optimiser, scheduler and this rank's RNG (the adapter is loaded separately)."""
    tensors = load_safetensors(checkpoint / "optimizer.safetensors")
    meta = _read_json(checkpoint / "optimizer.json")
    load_optimizer_state(optimizer, param_names, tensors, meta, source=str(checkpoint))
    scheduler.load_state_dict(_read_json(checkpoint / "scheduler.json"))
    rank_file = checkpoint / f"rng_state_{ctx.rank}.safetensors"
    if not rank_file.is_file():  # resumed with more processes than wrote it: exactness is lost anyway
        rank_file = checkpoint / "rng_state_0.safetensors"
    set_rng_state(load_safetensors(rank_file), _read_json(rank_file.with_suffix(".json")))


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise PerftError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PerftError(f"{path} is damaged ({err})") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return None  # e.g. a lambda in a scheduler's lr_lambdas: rebuilt from the config on resume
