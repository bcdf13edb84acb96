"""Hostile-input bookkeeping: byte snapshots of folders and a tally of outcomes by class.

`byte_snapshot` records every file's bytes (as a hash), every link's target and every folder
under a path, so a test can assert that a pre-existing file is byte-identical afterwards.
`record` tallies one case; with PERFT_HOSTILE_REPORT=<file> set, each record is appended to
that JSON-lines file, and `python -m tests.helpers.hostile <file>` prints the table of
docs/reliability.md from it (tried, clear error, accepted correctly, data lost, traceback).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

CRASH_MARK = "internal error ("  # perft.cli's last-resort line: no hostile case may reach it


def byte_snapshot(root: Path, *, mtimes: bool = False) -> dict[str, Any] | None:
    """Every file under `root` by content hash (and mtime with `mtimes`), links by target,
    folders as such; None if absent."""
    if not root.exists() and not root.is_symlink():
        return None
    if root.is_symlink():
        return {"": ("link", os.readlink(root))}

    def digest(path: Path) -> Any:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        return (sha, path.stat().st_mtime_ns) if mtimes else sha

    if root.is_file():
        return {"": digest(root)}
    snap: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                snap[rel] = ("link", os.readlink(path))
            elif path.is_file():
                snap[rel] = digest(path)
            else:
                snap[rel] = "dir"
    return snap


def preserved(before: dict[str, Any] | None, after: dict[str, Any] | None) -> bool:
    """Every entry that existed before is still there, unchanged (new files may have appeared)."""
    if before is None:
        return True
    if after is None:
        return False
    return all(after.get(k) == v for k, v in before.items())


def record(klass: str, case: str, *, outcome: str, data_lost: bool = False, traceback: bool = False) -> None:
    """Tally one case: outcome is "error" (a clear one-line error) or "accepted" (correctly)."""
    path = os.environ.get("PERFT_HOSTILE_REPORT")
    if not path:
        return
    line = {"class": klass, "case": case, "outcome": outcome, "data_lost": data_lost, "traceback": traceback}
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def table(path: str | Path) -> str:
    """The markdown table of docs/reliability.md from a report file (a case counted once, by name)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        rows[(item["class"], item["case"])] = item
    by_class: dict[str, Counter] = defaultdict(Counter)
    for item in rows.values():
        counts = by_class[item["class"]]
        counts["tried"] += 1
        counts["error" if item["outcome"] == "error" else "accepted"] += 1
        counts["data_lost"] += bool(item["data_lost"])
        counts["traceback"] += bool(item["traceback"])
    out = ["| Class | Tried | Clear error | Accepted correctly | Data lost | Traceback |", "|---|---|---|---|---|---|"]
    total: Counter = Counter()
    for klass in sorted(by_class):
        c = by_class[klass]
        total.update(c)
        out.append(f"| {klass} | {c['tried']} | {c['error']} | {c['accepted']} | {c['data_lost']} | {c['traceback']} |")
    out.append(f"| **all** | **{total['tried']}** | **{total['error']}** | **{total['accepted']}** | "
               f"**{total['data_lost']}** | **{total['traceback']}** |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1]))
