"""Machine facts printed with every benchmark, and the thread count it runs with."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import torch


# ---------------------------------------------------------------------------- machine
def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads (and inter-op to 1) for the whole run."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core count and library versions of this run."""
    import peft
    import transformers

    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
