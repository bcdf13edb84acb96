"""perft: Parameter-Efficient Routed Fine-Tuning (PERFT) for Mixture-of-Experts language models."""

from perft.adapter_kinds import AdapterKind, register_adapter_kind
from perft.arch import MoEArchitecture, find_moe_blocks, register_architecture
from perft.config import PerftConfig
from perft.errors import PerftError
from perft.model import PerftModel, get_perft_model

__version__ = "0.1.0"

__all__ = [
    "AdapterKind",
    "MoEArchitecture",
    "PerftConfig",
    "PerftError",
    "PerftModel",
    "find_moe_blocks",
    "get_perft_model",
    "register_adapter_kind",
    "register_architecture",
    "__version__",
]
