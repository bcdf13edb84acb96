"""The paper's key-memory view, and the PERFT-R router's geometry over training.

A router row is an *expert vector*: a token goes to the experts whose rows it aligns with.
The rows of an expert's up-projection (and of an adapter's A / down-projection) are its
*key memory vectors*: the directions the expert responds to. Projecting both kinds
together (standardise, PCA keeping 50% of the variance, then UMAP with 20 neighbours and
min_dist 0.5, as the paper does) shows whether the adapter experts' keys and routers
land among the base experts' or somewhere of their own. One projection is fitted per
layer on the union of all runs' vectors, so several runs share coordinates and can be
compared side by side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from perft.arch import MoEBlockInfo
from perft.config import WEIGHTS_NAME
from perft.errors import PerftError

UMAP_NEIGHBORS = 20
UMAP_MIN_DIST = 0.5
PCA_VARIANCE = 0.5
PROJECTIONS = ("umap", "pca")


# ---------------------------------------------------------------------- vectors
def base_expert_vectors(block: MoEBlockInfo) -> np.ndarray:
    """The frozen router's rows [E, d] (its expert vectors)."""
    weight = getattr(block.router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise PerftError(f"the router of {block.path} has no [experts, hidden] weight matrix")
    return weight.detach().float().cpu().numpy()


def _dense(weight: object) -> object:
    """A quantized expert store (perft.quantization) as its dequantized tensor; anything else as is."""
    from perft.quantization import QuantizedExpertWeights

    return weight.dequantize() if isinstance(weight, QuantizedExpertWeights) else weight


def _up_layout(experts: nn.Module, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight view [E, out, d], indices of its up-projection rows along `out`)."""
    transposed = getattr(experts, "is_transposed", None)
    weight = _dense(getattr(experts, "gate_up_proj", None))
    gated = isinstance(weight, torch.Tensor)
    if not gated:
        weight = _dense(getattr(experts, "up_proj", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise PerftError(
            f"cannot find the experts' up-projection ({type(experts).__name__} has no 3-D gate_up_proj/up_proj)"
        )
    if transposed is None:  # no flag: the hidden axis tells
        transposed = weight.shape[1] == hidden_size and weight.shape[2] != hidden_size
    w = weight.detach().transpose(1, 2) if transposed else weight.detach()  # [E, out, d]
    if not gated:
        return w, torch.arange(w.shape[1])
    inter = w.shape[1] // 2
    if getattr(experts, "is_concatenated", True):
        return w, torch.arange(inter, 2 * inter)  # [gate; up]
    return w, torch.arange(1, 2 * inter, 2)  # [g0, u0, g1, u1, ...]


def up_projection_rows(experts: nn.Module, hidden_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The up-projection rows [E, I', d] of fused experts (optionally only rows `rows` of I).

    Handles transformers' layouts: `gate_up_proj` [E, 2I, d] with gate and up concatenated
    (up = second half) or interleaved (up = odd rows), stored transposed ([E, d, 2I], e.g.
    gpt-oss) or not, as the `is_transposed` / `is_concatenated` flags of
    `use_experts_implementation` say; or a plain `up_proj` when the experts have no gate.
    """
    w, up_rows = _up_layout(experts, hidden_size)
    if rows is not None:
        up_rows = up_rows[rows]
    return w.index_select(1, up_rows.to(w.device))


def base_key_vectors(block: MoEBlockInfo, *, per_expert: int | None = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [M, d], expert id of each [M]): up-projection rows, `per_expert` per expert
    (the same random rows of every expert; None or 0 = all rows)."""
    _, up_rows = _up_layout(block.experts, block.hidden_size)
    inter = up_rows.numel()
    rows = None
    if per_expert and per_expert < inter:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(inter, generator=generator)[:per_expert].sort().values
    vectors = up_projection_rows(block.experts, block.hidden_size, rows).float().cpu()  # [E, I', d]
    ids = np.repeat(np.arange(vectors.shape[0]), vectors.shape[1])
    return vectors.reshape(-1, vectors.shape[-1]).numpy(), ids


@dataclass
class AdapterVectors:
    """One run's adapter vectors in one layer: router rows [N, d] (PERFT-R) and A rows [N, r, d]."""

    down: np.ndarray
    router: np.ndarray | None = None


@dataclass
class RunVectors:
    """What the projection needs from one run (taken before the adapter is unloaded)."""

    name: str
    variant: str
    layers: dict[int, AdapterVectors] = field(default_factory=dict)


def adapter_vectors(model: nn.Module, name: str, layers: list[int] | None = None) -> RunVectors:
    """Copy the (small) adapter tensors of a PerftModel's chosen layers to the CPU."""
    from perft.analysis.recorder import select_blocks

    perft_layers = getattr(model, "perft_layers", {})
    run = RunVectors(name, getattr(getattr(model, "perft_config", None), "variant", "none"))
    for block in select_blocks(model, layers):
        layer = perft_layers.get(block.path)
        if layer is None:
            continue
        router = layer.router.weight.detach().float().cpu().numpy() if layer.router is not None else None
        run.layers[block.layer] = AdapterVectors(layer.experts.down.detach().float().cpu().numpy(), router)
    return run


# ---------------------------------------------------------------------- projection
def project_layer(
    base_experts: np.ndarray,
    base_keys: np.ndarray,
    base_key_expert: np.ndarray,
    runs: list[RunVectors],
    layer: int,
    *,
    method: str = "umap",
    seed: int = 0,
    n_neighbors: int = UMAP_NEIGHBORS,
    min_dist: float = UMAP_MIN_DIST,
    variance: float = PCA_VARIANCE,
) -> dict[str, Any]:
    """2-D coordinates of all expert and key vectors of one layer, in one shared space."""
    if method not in PROJECTIONS:
        raise PerftError(f"unknown projection {method!r}; choose one of {', '.join(PROJECTIONS)}")
    parts: list[np.ndarray] = [base_experts, base_keys]
    spans: dict[str, Any] = {}
    for run in runs:
        vec = run.layers.get(layer)
        if vec is None:
            continue
        n, r, d = vec.down.shape
        parts.append(vec.down.reshape(n * r, d))
        spans[run.name] = {"keys": n * r, "experts": 0 if vec.router is None else vec.router.shape[0], "rank": r}
        if vec.router is not None:
            parts.append(vec.router)
    data = np.concatenate(parts).astype(np.float64)
    coords, components, explained = _embed(data, method, seed, n_neighbors, min_dist, variance)
    out: dict[str, Any] = {"method": method, "pca_components": components, "pca_explained_variance": explained}
    at = 0

    def take(count: int) -> list[list[float]]:
        nonlocal at
        chunk = coords[at : at + count]
        at += count
        return np.round(chunk, 5).tolist()

    out["base_experts"] = take(base_experts.shape[0])
    out["base_keys"] = take(base_keys.shape[0])
    out["base_key_expert"] = np.asarray(base_key_expert).astype(int).tolist()
    out["runs"] = {}
    for run in runs:
        span = spans.get(run.name)
        if span is None:
            continue
        keys = take(span["keys"])
        experts = take(span["experts"]) if span["experts"] else None
        n = span["keys"] // span["rank"]
        out["runs"][run.name] = {
            "variant": run.variant,
            "keys": keys,
            "key_expert": np.repeat(np.arange(n), span["rank"]).tolist(),
            "experts": experts,
        }
    return out


def _embed(
    data: np.ndarray, method: str, seed: int, n_neighbors: int, min_dist: float, variance: float
) -> tuple[np.ndarray, int, float]:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    if data.shape[0] < 3:
        raise PerftError("too few vectors to project (need at least 3)")
    z = StandardScaler().fit_transform(data)
    pca = PCA(n_components=min(data.shape), svd_solver="full", random_state=seed).fit(z)
    ratio = np.cumsum(pca.explained_variance_ratio_)
    k = int(np.searchsorted(ratio, variance - 1e-12) + 1)
    k = max(2, min(k, len(ratio)))
    reduced = pca.transform(z)[:, :k]
    if method == "pca":
        return reduced[:, :2], k, float(ratio[k - 1])
    try:
        import umap
    except ImportError:  # pragma: no cover - depends on the installation
        raise PerftError("the UMAP projection needs umap-learn: pip install 'perft[analysis]', or use --projection pca") from None
    reducer = umap.UMAP(
        n_neighbors=max(2, min(n_neighbors, data.shape[0] - 1)), min_dist=min_dist, n_components=2,
        random_state=seed, n_jobs=1,  # a seed makes UMAP single-threaded anyway
    )
    return np.asarray(reducer.fit_transform(reduced)), k, float(ratio[k - 1])


# ---------------------------------------------------------------------- router geometry
def router_geometry(router: np.ndarray, base_router: np.ndarray | None = None) -> dict[str, Any]:
    """Norms and pairwise cosines of PERFT-R router rows [N, d], and cosines to the base rows [E, d]."""
    router = np.asarray(router, dtype=np.float64)
    norms = np.linalg.norm(router, axis=1)
    unit = router / np.maximum(norms, 1e-12)[:, None]
    cos = unit @ unit.T
    n = router.shape[0]
    off = cos[~np.eye(n, dtype=bool)]
    out: dict[str, Any] = {
        "norms": norms.tolist(),
        "pairwise_cos": cos.tolist(),
        "mean_pairwise_cos": float(off.mean()) if off.size else None,
        "max_pairwise_cos": float(off.max()) if off.size else None,
    }
    if base_router is not None:
        base = np.asarray(base_router, dtype=np.float64)
        base_unit = base / np.maximum(np.linalg.norm(base, axis=1), 1e-12)[:, None]
        to_base = unit @ base_unit.T  # [N, E]
        out["cos_to_base"] = to_base.tolist()
        out["max_abs_cos_to_base"] = np.abs(to_base).max(1).tolist()
        out["nearest_base_expert"] = np.abs(to_base).argmax(1).astype(int).tolist()
    return out


_STEP = re.compile(r"(\d+)(?!.*\d)")


def find_checkpoints(run_dir: str | Path) -> list[tuple[int | None, str, Path]]:
    """Adapter directories under `run_dir` as (step, label, dir), by step (unnumbered last).

    The step is the last number in the directory's name (`checkpoint-80` -> 80); hidden
    directories (a checkpoint being written) are skipped.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise PerftError(f"checkpoint directory {root} does not exist")
    found: list[tuple[int | None, str, Path]] = []
    for weights in sorted(root.rglob(WEIGHTS_NAME)):
        directory = weights.parent
        if any(part.startswith(".") for part in directory.relative_to(root).parts):
            continue  # e.g. `.tmp-checkpoint-N/`, a checkpoint still being written
        label = directory.relative_to(root).as_posix()
        label = "final" if label == "." else label
        match = _STEP.search(directory.name) if directory != root else None
        found.append((int(match.group(1)) if match else None, label, directory))
    if not found:
        raise PerftError(f"no {WEIGHTS_NAME} under {root}: give a training run directory with saved checkpoints")
    return sorted(found, key=lambda item: (item[0] is None, item[0] or 0, item[1]))


def read_routers(directory: Path) -> dict[str, np.ndarray]:
    """Only the PERFT-R router tensors (`<block path>.router`) of a saved adapter (safetensors, lazily)."""
    from safetensors import SafetensorError, safe_open

    path = directory / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {
                key[: -len(".router")]: handle.get_tensor(key).float().numpy()
                for key in handle.keys()
                if key.endswith(".router")
            }
    except (SafetensorError, OSError) as err:
        raise PerftError(f"{path} is not a readable safetensors file ({err})") from None


def _check_router(source: Path, path: str, rows: np.ndarray, base: Any) -> None:
    """A router read back from a checkpoint: a finite [N, hidden] matrix of the base's width (issue 15)."""
    width = np.asarray(base).shape[1] if base is not None else None
    if rows.ndim != 2 or rows.shape[0] < 1 or (width is not None and rows.shape[1] != width):
        raise PerftError(f"{source}: router {path}.router has shape {tuple(rows.shape)}, not [experts, "
                         f"{width or 'hidden'}]; the checkpoint is damaged or belongs to another model")
    if not np.isfinite(rows).all():
        raise PerftError(f"{source}: router {path}.router contains NaN or Inf; the checkpoint is damaged "
                         "(or its run diverged): leave it out of --checkpoints")


def checkpoint_geometry(
    run_dir: str | Path, base_routers: dict[str, np.ndarray], layer_of: dict[str, int]
) -> dict[str, Any]:
    """The router geometry of every checkpoint of a run, step by step, per layer.

    `base_routers` / `layer_of`: block path -> frozen router rows / layer index (only these
    layers are read).
    """
    checkpoints = find_checkpoints(run_dir)
    series: dict[str, dict[str, list[Any]]] = {}
    steps, labels = [], []
    for step, label, directory in checkpoints:
        routers = read_routers(directory)
        if not routers:
            continue
        steps.append(step)
        labels.append(label)
        for path, rows in routers.items():
            if path not in layer_of:
                continue
            _check_router(directory / WEIGHTS_NAME, path, rows, base_routers.get(path))
            geo = router_geometry(rows, base_routers.get(path))
            entry = series.setdefault(str(layer_of[path]), {"path": path, "steps": [], "geometry": []})  # type: ignore[dict-item]
            entry["steps"].append(step if step is not None else label)
            entry["geometry"].append(geo)
    if not steps:
        raise PerftError(f"the checkpoints under {run_dir} have no router: router geometry needs PERFT-R (variant routed)")
    if not series:
        raise PerftError(f"the checkpoints under {run_dir} adapt none of the analysed layers")
    return {"run_dir": str(run_dir), "steps": steps, "labels": labels, "layers": dict(sorted(series.items(), key=lambda kv: int(kv[0])))}
