"""`perft plan`: how many parameters a method trains and how much memory a run needs, before renting hardware.

The model is built from its `config.json` alone on the meta device (no weights are read),
the method is attached to that skeleton, and parameter counts are read off it exactly;
memory per device is then derived from those counts (exact where it is only counts times
bytes) and from an activation model (estimated). See `perft.planning.plan`.
"""

from perft.planning.methods import (
    TrainableEstimate,
    load_model_config,
    meta_model,
    register_method_planner,
    trainable_estimate,
)
from perft.planning.plan import Figure, MemoryPlan, format_plan, plan_memory

__all__ = [
    "Figure", "MemoryPlan", "TrainableEstimate", "format_plan", "load_model_config", "meta_model", "plan_memory",
    "register_method_planner", "trainable_estimate",
]
