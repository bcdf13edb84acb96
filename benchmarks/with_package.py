"""Run a benchmark script against another copy of the `perft` package (e.g. an older commit).

For before/after comparisons of the adapter code with today's benchmark scripts:

    mkdir -p /tmp/perft-old && git archive <commit> perft | tar -x -C /tmp/perft-old
    .venv/bin/python benchmarks/with_package.py /tmp/perft-old benchmarks/step_time.py --target layer ...

The editable install of the working tree is taken out of the import system first, so
`import perft` really loads the copy under the given directory (checked before running).
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: with_package.py PACKAGE_PARENT_DIR SCRIPT [ARGS...]")
    root, script = sys.argv[1], sys.argv[2]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                        and "editable" not in getattr(f, "__name__", "").lower()]
    sys.path.insert(0, root)
    import perft

    if not perft.__file__.startswith(root):
        raise SystemExit(f"perft still imports from {perft.__file__}, not from {root}")
    print(f"perft package from {perft.__file__}", flush=True)
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
