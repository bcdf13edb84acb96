"""`analyze`: one base model, any number of adapters, one data file -> the analysis result.

Everything a user can get wrong (data file, adapter directories, checkpoint directory,
options) is checked before the model is loaded. The base model is loaded once; each
adapter is attached, recorded in one batched pass, its small tensors copied for the
projection, and unloaded again, so runs are compared on identical base weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from perft.analysis.data import prepare_data
from perft.analysis.geometry import (
    PROJECTIONS,
    RunVectors,
    adapter_vectors,
    base_expert_vectors,
    base_key_vectors,
    checkpoint_geometry,
    find_checkpoints,
    project_layer,
)
from perft.analysis.recorder import RoutingRecorder, select_blocks
from perft.analysis.report import summarize_run
from perft.config import WEIGHTS_NAME, PerftConfig
from perft.errors import PerftError

RESULT_VERSION = 1


@dataclass
class AnalysisOptions:
    """What to analyse and how (the `perft analyze` flags)."""

    split_by: str | None = None
    layers: list[int] | None = None  # MoE layers analysed (None: all)
    projection_layers: list[int] | None = None  # None: the last two analysed layers
    checkpoints: str | None = None
    batch_size: int = 8
    max_samples: int | None = None
    max_length: int = 256
    projection: str | None = "umap"  # None: no projection
    keys_per_expert: int = 64
    with_base: bool = False
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.batch_size < 1:
            raise PerftError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_length < 2:
            raise PerftError(f"--max-length must be at least 2, got {self.max_length}")
        if self.projection is not None and self.projection not in PROJECTIONS:
            raise PerftError(f"unknown projection {self.projection!r}; choose one of {', '.join(PROJECTIONS)}")
        if self.keys_per_expert < 0:
            raise PerftError("--keys-per-expert must be >= 0 (0 = every row)")
        if not 0 <= self.seed <= 2**32 - 1:
            raise PerftError(f"--seed must be in [0, 2**32 - 1], got {self.seed}")


def check_adapter_dir(path: str | Path) -> PerftConfig | None:
    """A readable adapter directory (config + weights), or a PerftError naming the problem. Returns the
    PERFT config, or None for another registered method's adapter (ESFT, ...)."""
    from perft.methods import Perft, method_for_adapter

    directory = Path(path)
    if not directory.is_dir():
        raise PerftError(f"adapter directory {directory} does not exist")
    if not isinstance(method_for_adapter(directory), Perft):  # ESFT, ...: no PERFT config
        if not (directory / WEIGHTS_NAME).is_file():
            raise PerftError(f"no {WEIGHTS_NAME} in {directory}: the adapter was not saved completely")
        return None
    config = PerftConfig.load(directory)
    if not (directory / WEIGHTS_NAME).is_file():
        raise PerftError(f"no {WEIGHTS_NAME} in {directory}: the adapter was not saved completely")
    return config


def run_names(adapters: Sequence[str | Path], with_base: bool) -> list[str]:
    """Short, unique names: the adapter directory names (parent/name where they clash)."""
    names: list[str] = ["base"] if with_base else []
    for adapter in adapters:
        path = Path(adapter).resolve()
        name = path.name
        if name in names:
            name = f"{path.parent.name}/{path.name}"
        while name in names:
            name += "'"
        names.append(name)
    return names


def analyze(
    base_model: nn.Module,
    tokenizer: Any,
    data_path: str | Path,
    adapters: Sequence[str | Path] = (),
    options: AnalysisOptions | None = None,
    *,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Record routing for each adapter (and the base model if asked); return the result dict.

    `base_model` must carry no adapters; each adapter is attached and removed in turn.
    """
    from perft.methods import get_method, method_for_adapter
    from perft.model import PerftModel

    options = dataclasses.replace(options or AnalysisOptions())
    options.validate()
    if not adapters:
        options.with_base = True  # nothing else to look at
    data = prepare_data(data_path, split_by=options.split_by, max_samples=options.max_samples)
    configs = [check_adapter_dir(a) for a in adapters]
    if options.checkpoints is not None:
        find_checkpoints(options.checkpoints)
    blocks = select_blocks(base_model, options.layers)
    layer_ids = [b.layer for b in blocks]
    detail = options.projection_layers or layer_ids[-2:]
    select_blocks(base_model, detail)  # unknown projection layers fail here

    names = run_names(adapters, options.with_base)
    plan: list[tuple[str, Path | None, PerftConfig | None]] = []
    if options.with_base:
        plan.append(("base", None, None))
    plan.extend((n, Path(a), c) for n, a, c in zip(names[int(options.with_base):], adapters, configs))

    runs: list[dict[str, Any]] = []
    vectors: list[RunVectors] = []
    num_tokens = 0
    for name, adapter, config in plan:
        model: nn.Module = base_model
        method = method_for_adapter(adapter) if adapter is not None else None
        if adapter is not None and method is get_method("perft"):
            model = PerftModel.from_pretrained(base_model, adapter)
        elif adapter is not None and method is not None:
            model = method.load(base_model, adapter)  # another method (ESFT, a hybrid): detached again below
        try:
            recorder = RoutingRecorder(model, layers=options.layers, num_groups=len(data.group_names))
            batches = data.batches(tokenizer, batch_size=options.batch_size, max_length=options.max_length)
            recorder.run(model, batches, total=data.num_batches(options.batch_size), progress=options.progress,
                         description=f"routing {name}")
            layers = recorder.layer_stats(data.group_names)
            num_tokens = next(iter(layers.values()))["base"]["tokens"]
            if hasattr(model, "perft_layers") and options.projection is not None:
                vectors.append(adapter_vectors(model, name, detail))
        finally:
            if method is not None:
                method.unload(model)
        runs.append({
            "name": name,
            "adapter": str(adapter) if adapter is not None else None,
            "method": method.name if method is not None else None,
            "variant": config.variant if config else None,
            "config": _config_facts(config),
            "layers": layers,
            "summary": summarize_run(layers),
        })

    result: dict[str, Any] = {
        "version": RESULT_VERSION,
        "model": model_name,
        "data": str(data_path),
        "num_samples": len(data.texts),
        "num_tokens": num_tokens,
        "split_by": options.split_by,
        "groups": data.group_names,
        "layers": layer_ids,
        "detail_layers": detail,
        "runs": runs,
        "projection": None,
        "checkpoints": None,
    }
    if options.projection is not None:
        result["projection"] = project(base_model, vectors, detail, options)
    if options.checkpoints is not None:
        base_routers = {b.path: base_expert_vectors(b) for b in blocks}
        result["checkpoints"] = checkpoint_geometry(options.checkpoints, base_routers, {b.path: b.layer for b in blocks})
    return result


def project(base_model: nn.Module, runs: list[RunVectors], layers: list[int], options: AnalysisOptions) -> dict[str, Any]:
    """The shared key-memory projection of each chosen layer."""
    out: dict[str, Any] = {"method": options.projection, "keys_per_expert": options.keys_per_expert, "layers": {}}
    for block in select_blocks(base_model, layers):
        keys, key_expert = base_key_vectors(block, per_expert=options.keys_per_expert or None, seed=options.seed)
        out["layers"][str(block.layer)] = project_layer(
            base_expert_vectors(block), keys, key_expert, runs, block.layer, method=str(options.projection),
            seed=options.seed,
        )
    return out


def _config_facts(config: PerftConfig | None) -> dict[str, Any] | None:
    if config is None:
        return None
    return {k: getattr(config, k) for k in ("variant", "adapter", "num_experts", "top_k", "rank", "layers")}
