"""Stopping long jobs: SIGTERM as Ctrl-C, and training loops that stop only between whole steps."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from iadgpt.signals import StopAfterStep, interrupts_between_steps


def test_a_signal_is_held_until_the_step_boundary_and_handlers_come_back() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(StopAfterStep), interrupts_between_steps() as boundary:
        os.kill(os.getpid(), signal.SIGTERM)  # mid-step: nothing happens yet
        assert boundary.requested == "SIGTERM"
        boundary.check()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_second_signal_interrupts_at_once() -> None:
    with pytest.raises(KeyboardInterrupt) as info, interrupts_between_steps():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    assert not isinstance(info.value, StopAfterStep)


def test_an_ignored_signal_stays_ignored() -> None:
    """A background job of a script ignores SIGINT; the training block must not turn it into a stop."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_between_steps() as boundary:
            os.kill(os.getpid(), signal.SIGINT)
            boundary.check()
            assert boundary.requested is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_outside_the_main_thread_nothing_is_installed() -> None:
    seen = []

    def worker() -> None:
        with interrupts_between_steps() as boundary:
            seen.append((boundary.requested, signal.getsignal(signal.SIGTERM)))

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [(None, before)]
