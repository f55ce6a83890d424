"""SIGTERM (what Kubernetes sends before killing a pod): note it, let the loop checkpoint and exit."""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional


class GracefulStop:
    """A context manager: while inside, SIGTERM sets `requested` instead of killing the process.

    The loop checks `requested` after each optimizer step, saves a checkpoint and returns; a
    second SIGTERM falls through to the previous handler (so a stuck process still dies).
    Only the main thread can install signal handlers; elsewhere this is a no-op."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.requested = False
        self._previous = None

    def __enter__(self) -> "GracefulStop":
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.requested:  # second signal: stop waiting for the loop
            previous = self._previous if callable(self._previous) else signal.SIG_DFL
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)
            return
        self.requested = True
