"""The `perft` command line.

Every module in this package that defines `register(subparsers)` contributes one
sub-command (train, eval, demo, pretrain, analyze, ...). `register` adds a parser and sets
`func=<callable(args) -> int>` as its default. Errors a user can fix are `PerftError`s and
are printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from perft.errors import PerftError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perft", description="Parameter-Efficient Routed Fine-Tuning for Mixture-of-Experts models."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PerftError as err:
        message = _one_line(str(err))  # one line, whatever a value holds
        print(f"perft {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the disk filled up or a folder turned read-only mid-run
        from perft.io import describe_os_error

        print(f"perft {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"perft {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug: one line and a log to report, never a bare traceback
        if type(err).__name__ == "SafetensorError":  # safetensors' own type, for full disks and damaged files
            print(f"perft {args.command}: error: a safetensors file could not be written or read "
                  f"({_one_line(str(err))}); check the free disk space and the files named above", file=sys.stderr)
            return 2
        log = write_crash_log(args.command, argv)
        print(f"perft {args.command}: internal error ({type(err).__name__}: {_one_line(str(err))[:200]}); "
              f"this is a perft bug, please report it with the traceback in {log}", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def write_crash_log(command: str, argv: list[str] | None) -> str:
    """Write the current exception's traceback to a log file; return its path (or a note why not)."""
    import os
    import tempfile
    import time
    import traceback

    text = (f"perft {command} failed at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            f"argv: {sys.argv if argv is None else argv!r}\n\n{traceback.format_exc()}")
    try:
        fd, path = tempfile.mkstemp(prefix=f"perft-{command}-crash-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as handle:
            handle.write(text)
        return path
    except OSError:
        return "(no log: the temporary folder is not writable)"


if __name__ == "__main__":
    sys.exit(main())
