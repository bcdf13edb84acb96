"""`--device`: the devices a model can be run on, checked before the model load."""

from __future__ import annotations

import re

from perft.errors import PerftError


def check_device(text: str | None) -> str:
    """`cpu`, `cuda`, `cuda:N` or `mps` that exists here; None means cuda when available, else cpu."""
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d{1,3}))?", text.strip())
    if not match:
        raise PerftError(f"--device {text!r} is not a device perft can run a model on: pass cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), int(match.group(2) or 0)
    if kind == "cuda" and index >= torch.cuda.device_count():
        raise PerftError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         "pass cpu or an existing cuda:N")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise PerftError(f"--device {text}: MPS is not available here; pass cpu")
    return text.strip()
