"""The analysis output: `analysis.json` (every number), PNG figures, and a one-page HTML report.

The HTML embeds the PNGs as data URIs, so the single file can be mailed or attached to an
issue and still show everything; the PNGs are written beside it for papers and slides.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from perft.analysis import plots
from perft.io import atomic_write_text

JSON_NAME = "analysis.json"
HTML_NAME = "report.html"
FIGURES_DIR = "figures"


def summarize_run(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over layers of the headline numbers of one run (None where no layer has them)."""
    out: dict[str, Any] = {}
    for kind in ("base", "adapter"):
        for key in ("utilisation_entropy", "token_entropy", "balance_coef", "max_utilisation_ratio"):
            values = [e[kind][key] for e in layers.values() if e.get(kind) and e[kind].get(key) is not None]
            out[f"{kind}_{key}"] = sum(values) / len(values) if values else None
        dead = [e[kind]["num_dead"] for e in layers.values() if e.get(kind)]
        out[f"{kind}_dead_experts"] = sum(dead) if dead else None
    mi = [e["cooccurrence"]["mutual_information"] for e in layers.values() if e.get("cooccurrence")]
    nmi = [e["cooccurrence"]["normalized_mutual_information"] for e in layers.values() if e.get("cooccurrence")]
    out["mutual_information"] = sum(mi) / len(mi) if mi else None
    out["normalized_mutual_information"] = sum(nmi) / len(nmi) if nmi else None
    return out


def write_report(result: dict[str, Any], output: str | Path) -> dict[str, Path]:
    """Write JSON, figures and HTML into `output`; returns name -> path of what was written."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    json_path = out / JSON_NAME
    atomic_write_text(json_path, json.dumps(_finite(result), indent=1, sort_keys=False) + "\n")
    written["json"] = json_path
    figures = out / FIGURES_DIR
    detail = result.get("detail_layers") or []
    drawn = {
        "utilisation": plots.plot_utilisation(result, figures / "utilisation.png"),
        "layer_curves": plots.plot_layer_curves(result, figures / "layer_curves.png"),
        "topk_weights": plots.plot_topk_weights(result, figures / "topk_weights.png"),
        "cooccurrence": plots.plot_cooccurrence(result, figures / "cooccurrence.png", detail),
        "groups": plots.plot_groups(result, figures / "groups.png"),
        "projection": plots.plot_projection(result, figures / "projection.png"),
        "router_training": plots.plot_router_training(result, figures / "router_training.png"),
    }
    for name, path in drawn.items():
        if path is not None:
            written[name] = path
        else:  # not drawn this time: a figure left by an earlier analysis here would mislead
            (figures / f"{name}.png").unlink(missing_ok=True)
    html_path = out / HTML_NAME
    atomic_write_text(html_path, render_html(result, {k: v for k, v in drawn.items() if v is not None}))
    written["html"] = html_path
    for path in (json_path, html_path):
        _readable(path)
    return written


def _readable(path: Path) -> None:
    """Atomic writes create 0600 files; a report is meant to be shared (as the PNGs are)."""
    path.chmod(0o644)


_CAPTIONS = {
    "utilisation": "Share of the routing each expert receives, per layer (1 = its even share).",
    "layer_curves": "Per layer: how evenly experts are used, how confident the router is, the Switch balance "
    "coefficient and the number of experts never chosen.",
    "topk_weights": "The kept routing weights, largest first.",
    "cooccurrence": "For PERFT-R: which base experts are active when each adapter expert is chosen, with the "
    "mutual information of the two choices.",
    "groups": "The same statistics split by a field of the data.",
    "projection": "Expert vectors (router rows) and key memory vectors (up-projection rows; adapters' A rows), "
    "standardised, reduced by PCA to 50% of the variance and projected to 2-D, one shared space per layer.",
    "router_training": "The PERFT-R router's rows over the checkpoints of a run.",
}


def render_html(result: dict[str, Any], figures: dict[str, Path]) -> str:
    """A self-contained one-page report: headline table and every figure inline."""
    esc = html.escape
    rows = []
    columns = ("base_utilisation_entropy", "base_balance_coef", "base_dead_experts", "adapter_utilisation_entropy",
               "adapter_balance_coef", "adapter_dead_experts", "mutual_information")
    for run in result["runs"]:
        summary = run.get("summary", {})
        cells = "".join(f"<td>{_fmt(summary.get(c))}</td>" for c in columns)
        rows.append(f"<tr><td>{esc(run['name'])}</td><td>{esc(str(run.get('variant')))}</td>{cells}</tr>")
    header = "".join(f"<th>{esc(c.replace('_', ' '))}</th>" for c in columns)
    blocks = []
    for name, path in figures.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        blocks.append(
            f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(_CAPTIONS.get(name, name))}</figcaption></figure>"
        )
    meta = (
        f"model <code>{esc(str(result.get('model')))}</code>, data <code>{esc(str(result.get('data')))}</code>: "
        f"{result.get('num_samples')} samples, {result.get('num_tokens')} tokens"
        + (f", split by <code>{esc(str(result['split_by']))}</code>" if result.get("split_by") else "")
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PERFT routing analysis</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 1.5em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }} td, th {{ border: 1px solid #ccc; padding: 3px 6px; }}
figure {{ margin: 1.2em 0; }} img {{ max-width: 100%; }} figcaption {{ font-size: 0.85em; color: #555; }}
</style></head><body>
<h1>PERFT routing analysis</h1>
<p>{meta}. Every number is in <code>{JSON_NAME}</code>.</p>
<table><tr><th>run</th><th>variant</th>{header}</tr>
{"".join(rows)}
</table>
{"".join(blocks)}
</body></html>
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
