"""perft: Parameter-Efficient Routed Fine-Tuning (PERFT) for Mixture-of-Experts language models."""

from perft.arch import MoEArchitecture, find_moe_blocks, register_architecture
from perft.config import PerftConfig
from perft.errors import PerftError
from perft.model import PerftModel, get_perft_model
from perft.quantization import quantize_moe_experts

__version__ = "0.1.0"

__all__ = [
    "MoEArchitecture",
    "PerftConfig",
    "PerftError",
    "PerftModel",
    "find_moe_blocks",
    "get_perft_model",
    "quantize_moe_experts",
    "register_architecture",
    "__version__",
]
