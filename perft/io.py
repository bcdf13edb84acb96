"""Safe file I/O: atomic writes and safetensors-only weight loading (never unpickle)."""

from __future__ import annotations

import hashlib
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
    try:
        _atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except SafetensorError as err:  # e.g. the disk filled up while serialising
        raise PerftError(f"cannot write {path}: {err}; free some disk space (or pick another --output) "
                         "and resume") from None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (data files and checkpoint files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pickle_siblings(path: str | Path) -> list[str]:
    """Pickle-based files next to a missing safetensors file `path` (same stem), by name."""
    path = Path(path)
    return sorted(p.name for p in (path.with_suffix(s) for s in PICKLE_SUFFIXES) if p.exists())


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; refuse pickle-based formats with a message."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise PerftError(
            f"refusing to load {path}: pickle-based files can run arbitrary code; "
            "convert it to .safetensors with a tool you trust"
        )
    if not path.is_file():
        pickles = pickle_siblings(path)
        if pickles:
            raise PerftError(
                f"weights file {path} does not exist; refusing the pickle-based {pickles[0]} next to it "
                "(pickle files can run arbitrary code): convert it to .safetensors with a tool you trust"
            )
        raise PerftError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise PerftError(f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupted") from None


def check_writable_dir(path: str | Path, what: str = "--output") -> None:
    """Refuse an output folder that cannot be created or written, before any work is done.

    Looks at `path` or, when it does not exist yet, its nearest existing parent, and creates
    and deletes one empty hidden file there (permission bits do not bind root, but a
    read-only mount or an immutable folder does).
    """
    path = Path(path)
    probe = path
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == path:
            raise PerftError(f"{what} {path} exists and is not a folder: pick another {what}")
        raise PerftError(f"cannot create {what} {path}: {probe} is a file, not a folder")
    if not probe.exists():  # a dangling symlink on the way
        raise PerftError(f"cannot create {what} {path}: {probe} is a broken symbolic link")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PerftError(f"cannot write to {what} {path}: {probe} is read-only for this user (permission denied)")
    try:  # root passes os.access; a read-only mount or an immutable folder still refuses the write
        fd, name = tempfile.mkstemp(prefix=".perft-write-check-", dir=probe)
    except OSError as err:
        raise PerftError(f"cannot write to {what} {path}: {err.strerror or err} in {probe}") from None
    os.close(fd)
    os.unlink(name)


def describe_os_error(err: OSError) -> str:
    """`[Errno 28] No space left on device: 'x'` -> `file system error on x: No space left on device`."""
    where = f" {err.filename}" if err.filename else ""
    return f"file system error on{where}: {err.strerror or err}"
