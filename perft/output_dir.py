"""One policy for every folder a perft command writes (train, eval, analyze, pretrain, demo).

A folder is either new (absent or empty), a folder of the same kind that perft recognises
by its own marker file `.perft-output.json`, or refused with a message naming the folder and
`--overwrite-output-dir`. With that flag a folder perft did not write (or one of another
kind) is moved aside to `<name>.replaced-<n>` next to it: nothing is deleted that perft did
not create. Each folder is held under an exclusive OS lock (`fcntl.flock` on
`.perft.lock`) for the life of the command; the kernel drops it when the process dies, so a
crashed run never leaves a stale lock, and a second run on the same folder fails at once.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from perft.errors import PerftError
from perft.io import atomic_write_text, check_writable_dir

MARKER_NAME = ".perft-output.json"
LOCK_NAME = ".perft.lock"
OWN_NAMES = (MARKER_NAME, LOCK_NAME)
KINDS = ("train", "eval", "analyze", "pretrain", "demo")


def read_marker(path: Path) -> str | None:
    """The kind of perft output `path` holds, from its marker; None when unmarked or unreadable."""
    marker = Path(path) / MARKER_NAME
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if kind in KINDS else None


def user_entries(path: Path) -> list[str]:
    """Entries of `path` other than perft's own marker and lock files, sorted."""
    try:
        return sorted(name for name in os.listdir(path) if name not in OWN_NAMES)
    except FileNotFoundError:
        return []


def check_output(path: str | Path, kind: str, *, overwrite: bool = False, flag: str = "--output",
                 legacy: bool = False) -> None:
    """Refuse (before any work) an output folder that `kind` may not write into.

    `legacy`: the folder is a run of this kind written by a perft without markers.
    """
    path = Path(path)
    check_writable_dir(path, flag)
    if not path.is_dir():
        return
    entries = user_entries(path)
    if not entries:
        return
    if read_marker(path) == kind or legacy:  # written in place: never through a link someone placed there
        links = [name for name in entries if (path / name).is_symlink()]
        if links:
            raise PerftError(
                f"{flag} {path} contains the symbolic link {links[0]!r}, which perft did not create and will not "
                f"write through: remove it, or pick another {flag}"
            )
        return
    if overwrite:  # moved aside whole by `OutputFolder.begin`
        return
    other = read_marker(path)
    what = f"a perft {other} output" if other else f"files perft did not write ({', '.join(entries[:3])}" + (
        ", ...)" if len(entries) > 3 else ")")
    raise PerftError(
        f"{flag} {path} holds {what}: pick a new or empty {flag}, or pass --overwrite-output-dir to move "
        f"that folder aside to {path.name}.replaced-N (nothing is deleted)"
    )


def move_aside(path: Path) -> Path:
    """Rename `path` to the first free `<name>.replaced-<n>` next to it."""
    n = 1
    while True:
        target = path.with_name(f"{path.name}.replaced-{n}")
        if not target.exists() and not target.is_symlink():
            try:
                os.rename(path, target)
            except OSError as err:
                raise PerftError(f"cannot move {path} aside to {target}: {err.strerror or err}; "
                                 "move it yourself or pick another --output") from None
            return target
        n += 1


class OutputLock:
    """An exclusive `flock` on `<folder>/.perft.lock`, held until `release()` or process death."""

    def __init__(self, folder: Path, flag: str = "--output") -> None:
        import fcntl

        self.folder, self.path = folder, folder / LOCK_NAME
        self.created_folder = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise PerftError(f"{self.path} is a symbolic link perft did not create: remove it") from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise PerftError(
                    f"{flag} {folder} is in use by another perft run{f' (process {holder})' if holder else ''}: "
                    f"wait for it to finish, or pick another {flag}"
                ) from None
            try:  # the file we locked must still be the one at the path (a releaser may have unlinked it)
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd: int | None = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self.path.exists() and os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
            if self.created_folder and not any(self.folder.iterdir()):
                self.folder.rmdir()  # a folder this command created and never wrote into
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


class OutputFolder:
    """An output folder claimed for one command: checked, locked, then marked when writing starts."""

    def __init__(self, path: str | Path, kind: str, *, overwrite: bool = False, flag: str = "--output",
                 legacy: bool = False) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown output kind {kind!r}")
        self.path, self.kind, self.overwrite, self.flag = Path(path), kind, overwrite, flag
        check_output(self.path, kind, overwrite=overwrite, flag=flag, legacy=legacy)
        self.lock: OutputLock | None = OutputLock(self.path, flag)
        self.moved_to: Path | None = None

    def begin(self) -> Path | None:
        """Called just before the first write: move a foreign folder aside, then mark it as ours.

        Returns where an old folder was moved, if it was.
        """
        entries = user_entries(self.path)
        if entries and read_marker(self.path) != self.kind and self.overwrite:
            assert self.lock is not None
            old_lock = self.lock
            self.moved_to = move_aside(self.path)
            old_lock.path = self.moved_to / LOCK_NAME
            old_lock.folder, old_lock.created_folder = self.moved_to, False
            self.lock = OutputLock(self.path, self.flag)
            old_lock.release()
        if read_marker(self.path) != self.kind:
            marker = self.path / MARKER_NAME
            if marker.is_symlink():
                marker.unlink()
            atomic_write_text(marker, json.dumps({"kind": self.kind, "written_by": "perft"}) + "\n")
        return self.moved_to

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_input_outside(path: str | Path, output: str | Path, what: str, managed: tuple[str, ...]) -> None:
    """Refuse an input file that sits where the command will write (e.g. `--data OUT/metrics.jsonl`)."""
    try:
        resolved, out = Path(path).resolve(), Path(output).resolve()
    except (OSError, RuntimeError):
        return
    if resolved.parent == out and resolved.name in managed:
        raise PerftError(f"{what} {path} is a file this command writes in its output folder {output}: "
                         f"move or rename it, or pick another --output")
