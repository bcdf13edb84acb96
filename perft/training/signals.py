"""Ctrl-C / SIGTERM during training: finish the step, save a checkpoint, stop cleanly."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any


class StopRequests:
    """A context that catches SIGINT/SIGTERM into `signum`; a second Ctrl-C aborts at once.

    Handlers are installed only on the main thread (Python allows no other) and the previous
    ones are restored on leaving.
    """

    def __init__(self, announce: bool, command: str = "perft train") -> None:
        self.announce = announce
        self.command = command
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum
        if self.announce:
            print(f"\n{self.command}: got {signal.Signals(signum).name}; saving a checkpoint after this step "
                  "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()
