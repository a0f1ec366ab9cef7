"""The node's loops (node/periodic.py): every wake-up asked for runs a round at its time."""

from __future__ import annotations

import threading
import time

import dicom_peers
from node.periodic import PeriodicTask


class Rounds(PeriodicTask):
    run_at_start = False

    def __init__(self) -> None:
        super().__init__(interval_seconds=3600)  # no tick within the test: only wake-ups run rounds
        self.at: list[float] = []
        self.lock = threading.Lock()

    def run_once(self) -> None:
        with self.lock:
            self.at.append(time.monotonic())


def test_a_later_wake_up_is_kept_when_an_earlier_one_is_pending() -> None:
    """Two senders released their associations a little apart: each study is due at its own
    time, so the second wake-up must run a round of its own, not wait for the next tick."""
    rounds = Rounds()
    rounds.start()
    try:
        asked = time.monotonic()
        rounds.wake(0.05)
        rounds.wake(0.4)  # later than the pending one: kept, not dropped
        dicom_peers.wait_for(lambda: len(rounds.at) >= 2, 30, "a round for each wake-up")
    finally:
        rounds.stop()
    assert rounds.at[0] >= asked + 0.05
    assert rounds.at[1] >= asked + 0.4


def test_wake_ups_due_together_run_one_round() -> None:
    rounds = Rounds()
    rounds.start()
    try:
        due = time.monotonic() + 1.0
        for _ in range(5):  # five wake-ups for one moment, however slowly this loop runs
            rounds.wake(due - time.monotonic())
        dicom_peers.wait_for(lambda: rounds.at, 30, "the round")
        marker = time.monotonic()
        rounds.wake(0.0)  # a marker: the round after it shows nothing else was pending
        dicom_peers.wait_for(lambda: len(rounds.at) >= 2, 30, "the marker's round")
    finally:
        rounds.stop()
    assert rounds.at[1] >= marker  # no second round for the four other wake-ups
