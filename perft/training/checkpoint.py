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
one, never a torn one. Old checkpoints are renamed to `.trash-*` before they are deleted,
for the same reason.

Fault injection (tests only): `PERFT_FAULT_INJECT=<point>[:<step>]` makes the process
SIGKILL itself the first time it reaches `<point>` (at that global step); unset, as in every
real run, `fault_point` is one environment lookup. The points are `FAULT_POINTS`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from perft.errors import PerftError
from perft.io import atomic_save_safetensors, file_sha256, load_safetensors
from perft.methods import method_of
from perft.training.distributed import DistributedContext

STATE_NAME = "trainer_state.json"
FORMAT_VERSION = 1
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
FAULT_ENV = "PERFT_FAULT_INJECT"
FAULT_POINTS = (
    # in save_checkpoint, in order
    "checkpoint_start", "after_rng", "after_adapter", "after_optimizer", "before_state", "before_rename",
    "after_rename",
    # rotation: an old checkpoint renamed to .trash-*, not yet deleted
    "rotate",
    # in the trainer: after an optimiser step (before logging/eval/save), inside an evaluation,
    # exporting the final adapter (copied, not yet renamed), before train_summary.json
    "step", "eval", "export", "summary",
)


def fault_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process here if `PERFT_FAULT_INJECT` names this point (and step); see the module doc."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, at = spec.partition(":")
    if point == name and (not at or at == str(step)):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


# ---------------------------------------------------------------------------- adapters
def adapter_weights_file(directory: Path) -> Path:
    return Path(directory) / "adapter_model.safetensors"


def load_adapter_weights(model: nn.Module, checkpoint: Path) -> None:
    """Copy a checkpoint's adapter tensors into `model` (built by the same method)."""
    weights = adapter_weights_file(checkpoint)
    method_of(model).load_adapter_state(model, load_safetensors(weights), source=str(weights))


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


def remove_dir(path: Path, *, fault_step: int | None = None) -> None:
    """Delete a checkpoint-like directory without ever leaving a torn one under its name.

    It is renamed to `.trash-<name>` first (atomic); a kill during the deletion leaves only
    that hidden folder, which `remove_stale_temporaries` clears on the next start. A symbolic
    link is removed itself, never followed: what it points to stays untouched.
    """
    if path.is_symlink():
        path.unlink()
        return
    trash = path.with_name(f".trash-{path.name}")
    _remove(trash)
    os.replace(path, trash)
    if fault_step is not None:
        fault_point("rotate", fault_step)
    _remove(trash)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(output_dir: Path) -> None:
    """Leftovers of a process killed while writing (never complete checkpoints)."""
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            if child.name.startswith((".tmp-", ".trash-")) and (child.is_dir() or child.is_symlink()):
                _remove(child)


def rotate_checkpoints(output_dir: Path, keep: int | None, protect: set[int], step: int | None = None) -> None:
    """Delete all but the newest `keep` checkpoints; steps in `protect` (the best) survive."""
    if keep is None:
        return
    checkpoints = list_checkpoints(output_dir)
    doomed = [(s, p) for s, p in checkpoints[:-keep] if s not in protect] if len(checkpoints) > keep else []
    for _, path in doomed:
        remove_dir(path, fault_step=step)


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
        fault_point("checkpoint_start", step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    ctx.barrier()
    tensors, meta = rng_state()
    atomic_save_safetensors(tmp / f"rng_state_{ctx.rank}.safetensors", tensors)
    (tmp / f"rng_state_{ctx.rank}.json").write_text(json.dumps(meta), encoding="utf-8")
    ctx.barrier()
    if ctx.is_main:
        fault_point("after_rng", step)
        method_of(model).save(model, tmp)
        fault_point("after_adapter", step)
        opt_tensors, opt_meta = optimizer_state(optimizer, param_names)
        atomic_save_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta), encoding="utf-8")
        fault_point("after_optimizer", step)
        (tmp / "scheduler.json").write_text(json.dumps(_jsonable(scheduler.state_dict())), encoding="utf-8")
        fault_point("before_state", step)
        payload = {"format_version": FORMAT_VERSION, **state}
        (tmp / STATE_NAME).write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
        write_digest(tmp)
        fault_point("before_rename", step)
        replace_dir(tmp, final)
        fault_point("after_rename", step)
    ctx.barrier()
    return final


DIGEST_NAME = "checkpoint_digest.json"


def write_digest(directory: Path) -> None:
    """Hashes of every file of a checkpoint (its state, whose config fingerprint and step are inside, its
    weights, optimiser, scheduler and RNG), so a resume can tell files edited or mixed from elsewhere."""
    files = {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != DIGEST_NAME}
    (directory / DIGEST_NAME).write_text(json.dumps({"sha256": files}, indent=1, sort_keys=True), encoding="utf-8")


def check_digest(checkpoint: Path) -> None:
    """Every file the digest names is there and unchanged (a checkpoint written before digests passes)."""
    path = checkpoint / DIGEST_NAME
    if not path.exists():
        return
    data = _read_json(path)
    files = data.get("sha256") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise PerftError(f"{path} is damaged (no sha256 mapping); resume from an older checkpoint")
    for name, expected in sorted(files.items()):
        target = checkpoint / name
        if "/" in name or name.startswith(".") or not target.is_file():
            raise PerftError(f"{checkpoint}: {name} named by {DIGEST_NAME} is missing; the checkpoint is incomplete: "
                             "resume from an older checkpoint")
        if file_sha256(target) != expected:
            raise PerftError(f"{checkpoint}: {name} does not match the digest written with the checkpoint (edited, "
                             "or copied from another checkpoint): restore it or resume from an older checkpoint")


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_NAME
    if not path.is_file():
        raise PerftError(f"{checkpoint} is not a complete perft checkpoint (no {STATE_NAME}); "
                         "pick another checkpoint or start a new run")
    state = _read_json(path)
    if not isinstance(state, dict):
        raise PerftError(f"{path} is damaged (a JSON {type(state).__name__}, not an object); "
                         "resume from an older checkpoint")
    version = state.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise PerftError(f"{path} is damaged (format_version {version!r}); resume from an older checkpoint")
    if version > FORMAT_VERSION:
        raise PerftError(f"{checkpoint} was written by a newer perft; upgrade perft to resume it")
    step = state.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise PerftError(f"{path} is damaged (global_step {step!r}); resume from an older checkpoint")
    if not isinstance(state.get("log_window", {}), dict):
        raise PerftError(f"{path} is damaged (log_window); resume from an older checkpoint")
    for key in ("best_step", "best_val_loss"):
        if state.get(key) is not None and not isinstance(state[key], (int, float)):
            raise PerftError(f"{path} is damaged ({key} {state[key]!r}); resume from an older checkpoint")
    if not isinstance(state.get("history", []), list) or not isinstance(state.get("fingerprint", {}), dict):
        raise PerftError(f"{path} is damaged (history/fingerprint); resume from an older checkpoint")
    return state


def load_training_state(checkpoint: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        param_names: list[str], scheduler: Any, ctx: DistributedContext) -> None:
    """Restore optimiser, scheduler and this rank's RNG (the adapter is loaded separately).

    Every file is read and checked before anything is restored; a damaged one is a
    `PerftError` naming it.
    """
    tensors = load_safetensors(checkpoint / "optimizer.safetensors")
    meta = _read_json(checkpoint / "optimizer.json")
    sched = _read_json(checkpoint / "scheduler.json")
    rank_file = checkpoint / f"rng_state_{ctx.rank}.safetensors"
    if not rank_file.is_file():  # resumed with more processes than wrote it: exactness is lost anyway
        rank_file = checkpoint / "rng_state_0.safetensors"
    rng_tensors, rng_meta = load_safetensors(rank_file), _read_json(rank_file.with_suffix(".json"))
    current = (optimizer.state_dict(), scheduler.state_dict(), rng_state())
    what = "optimizer.json/optimizer.safetensors"
    try:
        _check_optimizer_tensors(optimizer, param_names, tensors, checkpoint)
        load_optimizer_state(optimizer, param_names, tensors, meta, source=str(checkpoint))
        what = "scheduler.json"
        if not isinstance(sched, dict) or not isinstance(sched.get("last_epoch"), int):
            raise TypeError("not a learning-rate scheduler state")
        scheduler.load_state_dict(sched)
        what = rank_file.name
        set_rng_state(rng_tensors, rng_meta)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
        optimizer.load_state_dict(current[0])  # leave the run as it was before the attempt
        scheduler.load_state_dict(current[1])
        set_rng_state(*current[2])
        raise PerftError(f"{checkpoint}: {what} is damaged ({type(err).__name__}: {err}); "
                         "resume from an older checkpoint") from None
    check_digest(checkpoint)  # last, so a damaged file is named by the check that knows what is wrong with it


def _check_optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor],
                             checkpoint: Path) -> None:
    """Every saved moment belongs to a trained parameter and has its shape (or is a scalar step)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    shapes = {name: tuple(p.shape) for name, p in zip(names, params)}
    for key, value in tensors.items():
        name, _, field = key.rpartition("::")
        if name not in shapes:
            raise PerftError(f"{checkpoint}: optimizer.safetensors holds state for an unknown parameter {name!r}; "
                             "the checkpoint belongs to another model or method")
        if value.dim() and tuple(value.shape) != shapes[name]:
            raise PerftError(f"{checkpoint}: optimizer state {key} has shape {tuple(value.shape)} but the parameter "
                             f"has {shapes[name]}; the checkpoint is damaged or from another config")
        if not torch.isfinite(value.float()).all():
            raise PerftError(f"{checkpoint}: optimizer state {key} contains NaN or Inf; "
                             "resume from an older checkpoint")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise PerftError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, absurd numbers or nesting
        raise PerftError(f"{path} is damaged ({err}); resume from an older checkpoint") from None


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
