"""Stopping cleanly: SIGTERM and a first Ctrl-C set a flag; a second Ctrl-C interrupts at once."""

import os
import signal

import pytest

from supcon.core.stop import StopFlag


def test_signals_become_a_flag_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopFlag() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):  # the second request: at once
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_requested_anywhere_counts_this_process_alone_without_a_group():
    stop = StopFlag()
    assert float(stop.requested_anywhere()) == 0.0
    stop.requested = True
    assert float(stop.requested_anywhere()) == 1.0
