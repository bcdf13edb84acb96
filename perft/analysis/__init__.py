"""Routing analysis of PERFT models: what the adapter experts learn and how tokens reach them.

- `RoutingRecorder`: forward hooks gathering base and adapter routing in one batched pass.
- `perft.routing.stats` (re-exported here): utilisation, entropy, Switch balance coefficient, top-k weights,
  dead experts, adapter-vs-base co-occurrence and its mutual information.
- `perft.analysis.geometry`: expert vectors and key memory vectors projected together
  (standardise, PCA, UMAP); the PERFT-R router's geometry over checkpoints.
- `analyze` + `write_report`: what `perft analyze` runs (JSON, PNGs, one-page HTML).
- `record_routing`, `last_routing_stats`, `summarize_last_routing` (from `perft.routing.live`):
  the live view of the last forward pass, behind `PerftModel.routing_stats()`.
"""

from perft.analysis.pipeline import AnalysisOptions, analyze
from perft.analysis.recorder import RoutingRecorder
from perft.analysis.report import write_report
from perft.routing.live import last_routing_stats, record_routing, summarize_last_routing
from perft.routing.stats import CoOccurrence, RoutingCounts, cooccurrence_summary, routing_summary

__all__ = [
    "AnalysisOptions",
    "CoOccurrence",
    "RoutingCounts",
    "RoutingRecorder",
    "analyze",
    "cooccurrence_summary",
    "last_routing_stats",
    "record_routing",
    "routing_summary",
    "summarize_last_routing",
    "write_report",
]
