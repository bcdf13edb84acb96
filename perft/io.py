"""Safe file I/O: atomic writes and safetensors-only weight loading (never unpickle)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from perft.errors import PerftError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; refuse pickle-based formats with a message."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise PerftError(
            f"refusing to load {path}: pickle-based files can run arbitrary code; "
            "convert it to .safetensors with a tool you trust"
        )
    if not path.is_file():
        raise PerftError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise PerftError(f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupted") from None
