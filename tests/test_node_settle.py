"""Study settling: due_studies with controlled times, and each settled study dispatched once.

These are unit tests with a fake dispatch callable; test_node_dispatch.py sends to real brokers.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import dicom_peers
from node.ledger import Ledger
from node.settle import SettleLoop, due_studies

T0 = datetime(2025, 3, 1, 8, 0, 0, tzinfo=timezone.utc)
SERIES = "1.2.826.0.1.3680043.8.498.99"


@pytest.fixture()
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    yield ledger
    ledger.close()


def receive(ledger: Ledger, study: str, sop: str, at: datetime) -> bool:
    return ledger.record_instance(
        sop_instance_uid=sop,
        study_uid=study,
        series_instance_uid=SERIES,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        storage_key=f"instances/{study}/{SERIES}/{sop}.dcm",
        received_at=at,
    )


class FakeDispatch:
    """Records calls; raises while `down` is set, like a broker that cannot be reached."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[dict[str, str]]]] = []
        self.down = False

    def __call__(self, study_uid: str, instances: list[dict[str, str]]) -> str:
        if self.down:
            raise ConnectionError("broker unreachable")
        self.calls.append((study_uid, instances))
        return f"task-{len(self.calls)}"


def test_due_studies_uses_the_quiet_time_of_each_study(ledger: Ledger) -> None:
    receive(ledger, "1.1", "1.1.1", T0)
    receive(ledger, "2.2", "2.2.1", T0 + timedelta(seconds=3))

    assert due_studies(ledger, 5, T0 + timedelta(seconds=4)) == []
    assert [d.study_uid for d in due_studies(ledger, 5, T0 + timedelta(seconds=5))] == ["1.1"]
    assert [d.study_uid for d in due_studies(ledger, 5, T0 + timedelta(seconds=8))] == ["1.1", "2.2"]
    # A new instance restarts the study's quiet time.
    receive(ledger, "1.1", "1.1.2", T0 + timedelta(seconds=7))
    assert [d.study_uid for d in due_studies(ledger, 5, T0 + timedelta(seconds=8))] == ["2.2"]


def test_each_settled_study_is_dispatched_exactly_once(ledger: Ledger) -> None:
    dispatch = FakeDispatch()
    loop = SettleLoop(ledger, dispatch, settle_seconds=5)
    receive(ledger, "1.1", "1.1.1", T0)
    receive(ledger, "1.1", "1.1.2", T0 + timedelta(seconds=1))

    assert loop.run_once(T0 + timedelta(seconds=5)) == []
    assert loop.run_once(T0 + timedelta(seconds=6)) == ["1.1"]
    for later in range(7, 20):
        assert loop.run_once(T0 + timedelta(seconds=later)) == []
    assert receive(ledger, "1.1", "1.1.1", T0 + timedelta(seconds=20)) is False  # re-sent
    assert loop.run_once(T0 + timedelta(seconds=60)) == []

    assert dispatch.calls == [
        (
            "1.1",
            [
                {"sop_instance_uid": "1.1.1", "key": f"instances/1.1/{SERIES}/1.1.1.dcm", **CR_SERIES},
                {"sop_instance_uid": "1.1.2", "key": f"instances/1.1/{SERIES}/1.1.2.dcm", **CR_SERIES},
            ],
        )
    ]
    study = ledger.study_status("1.1")
    assert (study["status"], study["task_id"]) == ("queued", "task-1")


CR_SERIES = {"series_instance_uid": SERIES, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1"}


def test_a_broker_outage_delays_dispatch_without_losing_it(ledger: Ledger) -> None:
    dispatch = FakeDispatch()
    loop = SettleLoop(ledger, dispatch, settle_seconds=1)
    receive(ledger, "1.1", "1.1.1", T0)
    receive(ledger, "2.2", "2.2.1", T0)

    dispatch.down = True
    assert loop.run_once(T0 + timedelta(seconds=2)) == []
    assert loop.run_once(T0 + timedelta(seconds=3)) == []
    assert ledger.study_status("1.1")["status"] == "receiving"

    dispatch.down = False
    assert loop.run_once(T0 + timedelta(seconds=4)) == ["1.1", "2.2"]
    assert loop.run_once(T0 + timedelta(seconds=5)) == []
    assert [study for study, _ in dispatch.calls] == ["1.1", "2.2"]


def test_instances_arriving_after_dispatch_are_dispatched_on_their_own(ledger: Ledger) -> None:
    dispatch = FakeDispatch()
    loop = SettleLoop(ledger, dispatch, settle_seconds=2)
    receive(ledger, "1.1", "1.1.1", T0)
    assert loop.run_once(T0 + timedelta(seconds=2)) == ["1.1"]

    receive(ledger, "1.1", "1.1.2", T0 + timedelta(seconds=10))
    assert ledger.study_status("1.1")["status"] == "receiving"
    assert loop.run_once(T0 + timedelta(seconds=12)) == ["1.1"]
    assert [[i["sop_instance_uid"] for i in instances] for _, instances in dispatch.calls] == [["1.1.1"], ["1.1.2"]]


def test_the_loop_thread_dispatches_and_stops(ledger: Ledger) -> None:
    dispatch = FakeDispatch()
    loop = SettleLoop(ledger, dispatch, settle_seconds=0.2, interval_seconds=0.05)
    loop.start()
    try:
        receive(ledger, "1.1", "1.1.1", datetime.now(timezone.utc))
        dicom_peers.wait_for(lambda: dispatch.calls, 10, "the settle loop to dispatch the study")
    finally:
        loop.stop()
    assert [study for study, _ in dispatch.calls] == ["1.1"]
    assert ledger.study_status("1.1")["status"] == "queued"


def test_a_study_whose_task_was_lost_is_dispatched_again_after_the_timeout(ledger: Ledger) -> None:
    dispatch = FakeDispatch()
    loop = SettleLoop(ledger, dispatch, settle_seconds=5, analysis_timeout_seconds=600)
    receive(ledger, "1.1", "1.1.1", T0)
    assert loop.run_once(T0 + timedelta(seconds=6)) == ["1.1"]
    assert loop.run_once(T0 + timedelta(seconds=300)) == []  # still within the timeout: no result yet
    assert loop.run_once(T0 + timedelta(seconds=700)) == ["1.1"]  # the task or its summary was lost
    assert [call[1][0]["sop_instance_uid"] for call in dispatch.calls] == ["1.1.1", "1.1.1"]
