"""perft: Parameter-Efficient Routed Fine-Tuning (PERFT) for Mixture-of-Experts language models."""

import logging as _logging

from perft.adapter_kinds import AdapterKind, register_adapter_kind
from perft.arch import MoEArchitecture, find_moe_blocks, register_architecture
from perft.config import PerftConfig
from perft.errors import PerftError
from perft.model import PerftModel, get_perft_model
from perft.quantization import quantize_moe_experts

# bitsandbytes' CPU backend warns at import (PEFT imports it whenever it is installed) that an
# optional fused 4-bit kernel from the hub is missing; perft never uses that kernel.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

__version__ = "0.1.0"

__all__ = [
    "AdapterKind",
    "MoEArchitecture",
    "PerftConfig",
    "PerftError",
    "PerftModel",
    "find_moe_blocks",
    "get_perft_model",
    "quantize_moe_experts",
    "register_adapter_kind",
    "register_architecture",
    "__version__",
]
