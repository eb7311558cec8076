"""SIGTERM as Ctrl-C for long workstation jobs (a service stop, `docker stop`, a closed tmux pane):
the same unwinding, so interrupted work is saved or cleaned up instead of lost."""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

log = logging.getLogger(__name__)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class StopAfterStep(KeyboardInterrupt):
    """Raised by a training loop between two steps, after Ctrl-C or SIGTERM asked it to stop."""


class StepBoundary:
    """What `interrupts_between_steps` hands the loop: it calls `check()` after each whole step."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None

    def check(self) -> None:
        if self.requested:
            raise StopAfterStep(self.requested)


@contextmanager
def interrupts_between_steps() -> Iterator[StepBoundary]:
    """Within the block, Ctrl-C and SIGTERM stop a training loop at its next step boundary.

    A KeyboardInterrupt raised mid-step (after the optimizer moved the weights, before the step
    counter did) would save weights one step ahead of their counter, and the resumed run would
    leave the trajectory. A second signal interrupts at once (a step that hangs); the caller then
    keeps its last whole-step checkpoint. Main thread only; elsewhere the flag never rises."""
    boundary = StepBoundary()
    if threading.current_thread() is not threading.main_thread():
        yield boundary
        return

    def request(signum, frame):
        if boundary.requested:
            raise KeyboardInterrupt
        boundary.requested = signal.Signals(signum).name
        log.warning("%s: stopping after this step to save the checkpoint (send it again to stop at once, "
                    "keeping the last saved step)", boundary.requested)

    # a signal the process ignores (SIGINT of a background job in a script, `nohup`) stays ignored
    old = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)
           if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield boundary
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
