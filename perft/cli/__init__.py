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
        message = str(err).replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever a value holds
        print(f"perft {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the disk filled up or a folder turned read-only mid-run
        from perft.io import describe_os_error

        print(f"perft {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"perft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
