"""Figures of an analysis result (the JSON-able dict of `perft.analysis.pipeline`).

Every figure is drawn from the result dict alone, so a report can be redrawn from its
`analysis.json` without the model. Figures are built on matplotlib's object API with the
Agg canvas (no display, no global backend switch), several runs side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DPI = 100
_KINDS = (("base", "base experts"), ("adapter", "adapter experts (PERFT-R)"))


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _layer_keys(run: dict[str, Any]) -> list[str]:
    return sorted(run["layers"], key=int)


def _has(result: dict[str, Any], kind: str) -> bool:
    return any(entry.get(kind) for run in result["runs"] for entry in run["layers"].values())


# ---------------------------------------------------------------------- utilisation
def plot_utilisation(result: dict[str, Any], path: Path) -> Path:
    """Heatmaps layer x expert of each expert's share of the routing, per run (columns)."""
    runs = result["runs"]
    kinds = [k for k in _KINDS if _has(result, k[0])]
    fig = _figure(3.6 * len(runs) + 0.8, 2.6 * len(kinds) + 0.4)
    axes = fig.subplots(len(kinds), len(runs), squeeze=False)
    for col, run in enumerate(runs):
        layers = _layer_keys(run)
        for row, (kind, label) in enumerate(kinds):
            ax = axes[row][col]
            stats = [run["layers"][key].get(kind) for key in layers]
            if not any(stats):
                ax.set_axis_off()
                ax.set_title(f"{run['name']}: no {label}", fontsize=8)
                continue
            width = max(s["num_experts"] for s in stats if s)
            grid = np.full((len(layers), width), np.nan)
            for i, s in enumerate(stats):
                if s and s["utilisation"]:
                    grid[i, : s["num_experts"]] = np.asarray(s["utilisation"]) * s["num_experts"]
            image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
            ax.set_yticks(range(len(layers)), layers, fontsize=7)
            ax.set_xlabel("expert", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            ax.set_title(f"{run['name']}: {label}", fontsize=8)
            fig.colorbar(image, ax=ax, fraction=0.046).set_label("share x experts (1 = even)", fontsize=7)
    fig.suptitle("Expert utilisation per layer", fontsize=10)
    return _save(fig, path)


def plot_layer_curves(result: dict[str, Any], path: Path) -> Path:
    """Per-layer curves of entropy, balance and dead experts; one line per run and router."""
    panels = (
        ("utilisation_entropy", "utilisation entropy (norm.)"),
        ("token_entropy", "mean token routing entropy (norm.)"),
        ("balance_coef", "Switch balance coefficient (1 = even)"),
        ("num_dead", "dead experts"),
    )
    from matplotlib.ticker import MaxNLocator

    fig = _figure(10, 6.4)
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, title) in zip(axes, panels):
        for run in result["runs"]:
            layers = _layer_keys(run)
            for kind, style in (("base", "-"), ("adapter", "--")):
                values = [(run["layers"][k].get(kind) or {}).get(key) for k in layers]
                if all(v is None for v in values):
                    continue
                xs = [int(k) for k, v in zip(layers, values) if v is not None]
                ys = [v for v in values if v is not None]
                ax.plot(xs, ys, style, marker="o", markersize=3, label=f"{run['name']} ({kind})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=7)
    fig.suptitle("Routing per layer (solid: base router, dashed: PERFT-R router)", fontsize=10)
    return _save(fig, path)


def plot_topk_weights(result: dict[str, Any], path: Path) -> Path:
    """Distribution of the kept top-k routing weights (all layers pooled), slot by slot."""
    runs = result["runs"]
    kinds = [k for k in _KINDS if _has(result, k[0])]
    fig = _figure(3.6 * len(runs), 2.5 * len(kinds) + 0.4)
    axes = fig.subplots(len(kinds), len(runs), squeeze=False)
    for col, run in enumerate(runs):
        for row, (kind, label) in enumerate(kinds):
            ax = axes[row][col]
            hists = [s[kind]["topk_weight_hist"] for s in run["layers"].values() if s.get(kind) and s[kind]["topk_weight_hist"]]
            if not hists:
                ax.set_axis_off()
                continue
            edges = next(s[kind]["topk_weight_bin_edges"] for s in run["layers"].values() if s.get(kind) and s[kind]["topk_weight_bin_edges"])
            total = np.sum([np.asarray(h) for h in hists], axis=0)  # [k, bins + 1]
            centers = (np.asarray(edges[:-1]) + np.asarray(edges[1:])) / 2
            width = edges[1] - edges[0]
            for slot in range(total.shape[0]):
                frac = total[slot, :-1] / max(total[slot].sum(), 1)
                ax.bar(centers, frac, width=width, alpha=0.55, label=f"slot {slot + 1}")
            ax.set_title(f"{run['name']}: {label}", fontsize=8)
            ax.set_xlabel("routing weight", fontsize=8)
            ax.set_ylabel("fraction of tokens", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
    fig.suptitle("Top-k routing weights (slot 1 = largest)", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------- PERFT-R specifics
def plot_cooccurrence(result: dict[str, Any], path: Path, layers: list[int]) -> Path | None:
    """P(base expert | adapter expert) heatmaps, PERFT-R runs (rows) x chosen layers (columns)."""
    runs = [r for r in result["runs"] if any(e.get("cooccurrence") for e in r["layers"].values())]
    if not runs or not layers:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _figure(3.8 * len(layers), 2.2 * len(runs) + 0.6)
    axes = fig.subplots(len(runs), len(layers), squeeze=False)
    for row, run in enumerate(runs):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            entry = run["layers"].get(str(layer), {}).get("cooccurrence")
            if not entry:
                ax.set_axis_off()
                continue
            image = ax.imshow(np.asarray(entry["p_base_given_adapter"]), aspect="auto", cmap="magma", vmin=0,
                              interpolation="nearest")
            ax.set_title(f"{run['name']} L{layer}: MI {entry['mutual_information']:.3f} nats "
                         f"(norm. {entry['normalized_mutual_information']:.2f})", fontsize=7)
            ax.set_xlabel("base expert", fontsize=7)
            ax.set_ylabel("adapter expert", fontsize=7)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=6)
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("Which base experts each adapter expert shares tokens with: P(base | adapter)", fontsize=10)
    return _save(fig, path)


def plot_groups(result: dict[str, Any], path: Path) -> Path | None:
    """Per-group (task) view: utilisation entropy per layer and expert shares, first run."""
    if len(result.get("groups", [])) < 2:
        return None
    names = result["groups"]
    run = result["runs"][0]
    layers = _layer_keys(run)
    kinds = [k for k in _KINDS if any((run["layers"][key].get(k[0]) or {}).get("groups") for key in layers)]
    last = layers[-1]
    fig = _figure(9, 0.5 * len(names) * len(kinds) + 2.2 * len(kinds))
    axes = fig.subplots(len(kinds), 2, squeeze=False)
    for row, (kind, label) in enumerate(kinds):
        grid = np.array([[_nan((run["layers"][k].get(kind) or {}).get("groups", {}).get(g, {}).get("utilisation_entropy"))
                          for k in layers] for g in names])
        ax = axes[row][0]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(layers)), layers, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_title(f"{run['name']}, {label}: utilisation entropy", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
        stats = run["layers"][last][kind]["groups"]
        shares = np.array([stats[g]["utilisation"] or [np.nan] * stats[g]["num_experts"] for g in names], dtype=float)
        ax = axes[row][1]
        image = ax.imshow(shares * shares.shape[1], aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(f"layer {last} {label}: share x experts", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"Routing by {result.get('split_by')}", fontsize=10)
    return _save(fig, path)


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


# ---------------------------------------------------------------------- geometry
def plot_projection(result: dict[str, Any], path: Path) -> Path | None:
    """The key-memory picture: layers (rows) x runs (columns) in one shared 2-D space per layer."""
    projection = result.get("projection")
    if not projection or not projection.get("layers"):
        return None
    import matplotlib

    layers = sorted(projection["layers"], key=int)
    names = [r["name"] for r in result["runs"] if any(r["name"] in projection["layers"][k]["runs"] for k in layers)]
    names = names or ["base"]
    fig = _figure(3.4 * len(names), 3.2 * len(layers) + 0.4)
    axes = fig.subplots(len(layers), len(names), squeeze=False)
    cmap = matplotlib.colormaps["tab10"]
    for row, layer in enumerate(layers):
        data = projection["layers"][layer]
        keys = np.asarray(data["base_keys"])
        experts = np.asarray(data["base_experts"])
        for col, name in enumerate(names):
            ax = axes[row][col]
            ax.scatter(keys[:, 0], keys[:, 1], s=2, c="0.78", label="base key memory", rasterized=True)
            ax.scatter(experts[:, 0], experts[:, 1], s=16, marker="x", c="0.2", linewidths=0.8, label="base expert vectors")
            run = data["runs"].get(name)
            if run:
                ak = np.asarray(run["keys"])
                colors = [cmap(i % 10) for i in run["key_expert"]]
                ax.scatter(ak[:, 0], ak[:, 1], s=7, c=colors, label="adapter key memory")
                if run["experts"]:
                    ae = np.asarray(run["experts"])
                    ax.scatter(ae[:, 0], ae[:, 1], s=90, marker="*", c=[cmap(i % 10) for i in range(len(ae))],
                               edgecolors="black", linewidths=0.6, label="adapter expert vectors")
            ax.set_title(f"{name} ({run['variant'] if run else 'base'}), layer {layer}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=7, markerscale=1.5)
    method = projection["method"].upper()
    fig.suptitle(f"Expert vectors and key memory vectors ({method} of standardised, PCA-reduced vectors)", fontsize=10)
    return _save(fig, path)


def plot_router_training(result: dict[str, Any], path: Path) -> Path | None:
    """PERFT-R router over training: row norms, pairwise cosine, closeness to the base router."""
    series = result.get("checkpoints")
    if not series:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _figure(12, 3.4)
    axes = fig.subplots(1, 3)
    panels = (
        ("norms", "router row norm (mean, min-max band)"),
        ("mean_pairwise_cos", "mean pairwise cosine of router rows"),
        ("max_abs_cos_to_base", "max |cos| to a base router row (mean)"),
    )
    for layer, entry in series["layers"].items():
        steps = entry["steps"]
        xs = steps if all(isinstance(s, int) for s in steps) else list(range(len(steps)))
        geos = entry["geometry"]
        for ax, (key, title) in zip(axes, panels):
            values = [g.get(key) for g in geos]
            if any(v is None for v in values):
                continue
            if isinstance(values[0], list):
                arr = np.asarray(values, dtype=float)
                (line,) = ax.plot(xs, arr.mean(1), marker="o", markersize=3, label=f"layer {layer}")
                if key == "norms":
                    ax.fill_between(xs, arr.min(1), arr.max(1), color=line.get_color(), alpha=0.15)
            else:
                ax.plot(xs, values, marker="o", markersize=3, label=f"layer {layer}")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"PERFT-R router geometry over training ({series['run_dir']})", fontsize=10)
    return _save(fig, path)
