"""Routing statistics, shared by training, analysis and the demo; imports nothing above it.

- `perft.routing.stats`: streamed counts (`RoutingCounts`, `CoOccurrence`) and the formulas
  (utilisation, entropy, Switch balance coefficient, top-k weights, dead experts, mutual
  information).
- `perft.routing.live`: recording the adapter routing of a forward pass (`recording`, behind
  `PerftModel.record_routing()`) and its statistics.
- `perft.routing.load`: the PERFT-R router load that `perft train` logs over a window of steps.
"""

from perft.routing.live import last_routing_stats, record_routing, recording, summarize_last_routing
from perft.routing.load import RouterLoad, load_summary, routed_layers
from perft.routing.stats import CoOccurrence, RoutingCounts, cooccurrence_summary, routing_summary

__all__ = [
    "CoOccurrence",
    "RouterLoad",
    "RoutingCounts",
    "cooccurrence_summary",
    "last_routing_stats",
    "load_summary",
    "record_routing",
    "recording",
    "routed_layers",
    "routing_summary",
    "summarize_last_routing",
]
