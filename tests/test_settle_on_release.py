"""Settling on association release: a study whose sending association was released normally is
due after the short grace even with a long quiet time; an association still open, or aborted,
leaves its study to the quiet time. Real senders (DCMTK's storescu, pynetdicom) against the SCP."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmwrite
from pynetdicom import AE
from sqlalchemy import select

import dicom_peers
from node.ledger import Association, Ledger, utcnow
from node.settle import SettleLoop
from scp_node import Node, running_node
from test_node_scp import CR, crafted_cr

T0 = datetime(2025, 3, 1, 8, 0, 0, tzinfo=timezone.utc)
LONG_SETTLE = 600.0  # no study can be due on the quiet time during a test
GRACE = 0.2


class Dispatch:
    """Records the studies dispatched and the extra options of each."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[dict[str, str]], dict[str, Any]]] = []

    def __call__(self, study_uid: str, instances: list[dict[str, str]], extra: dict[str, Any] | None = None) -> str:
        self.calls.append((study_uid, instances, extra or {}))
        return f"task-{len(self.calls)}"


@pytest.fixture()
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    yield ledger
    ledger.close()


@pytest.fixture()
def release_node(tmp_path: Path) -> Iterator[Node]:
    yield from running_node(tmp_path, settle_seconds=LONG_SETTLE, settle_grace_ms=int(GRACE * 1000))


def receive(ledger: Ledger, study: str, sop: str, at: datetime, association: str | None) -> None:
    ledger.record_instance(
        sop_instance_uid=sop,
        study_uid=study,
        series_instance_uid=f"{study}.9",
        sop_class_uid=CR,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        storage_key=f"instances/{sop}.dcm",
        association_id=association,
        received_at=at,
    )


def due(ledger: Ledger, at: datetime) -> list[str]:
    return [study.study_uid for study in ledger.due_studies(LONG_SETTLE, at, grace_seconds=GRACE)]


def test_a_released_association_makes_its_study_due_after_the_grace_only(ledger: Ledger) -> None:
    for name in ("released", "open", "aborted"):
        ledger.open_association(name, "MODALITY", now=T0)
    receive(ledger, "1.1", "1.1.1", T0, "released")
    receive(ledger, "2.2", "2.2.1", T0, "open")
    receive(ledger, "3.3", "3.3.1", T0, "aborted")
    receive(ledger, "4.4", "4.4.1", T0, None)  # recorded before associations were tracked
    receive(ledger, "5.5", "5.5.1", T0, "released")
    receive(ledger, "5.5", "5.5.2", T0, "open")  # one study over two associations, one still open
    at_release = T0 + timedelta(seconds=1)
    assert ledger.end_association("released", released=True, now=at_release) is True
    assert ledger.end_association("aborted", released=False, now=at_release) is False
    assert ledger.end_association("released", released=False, now=at_release) is False  # the first end counts

    assert due(ledger, at_release + timedelta(seconds=GRACE / 2)) == []
    assert due(ledger, at_release + timedelta(seconds=GRACE)) == ["1.1"]
    assert due(ledger, T0 + timedelta(seconds=LONG_SETTLE - 1)) == ["1.1"]
    # The quiet time stays the fallback for every other study.
    assert due(ledger, T0 + timedelta(seconds=LONG_SETTLE)) == ["1.1", "2.2", "3.3", "4.4", "5.5"]


def test_an_instance_after_the_release_restarts_the_grace(ledger: Ledger) -> None:
    ledger.open_association("first", "MODALITY", now=T0)
    receive(ledger, "1.1", "1.1.1", T0, "first")
    ledger.end_association("first", released=True, now=T0)
    ledger.open_association("second", "MODALITY", now=T0)
    receive(ledger, "1.1", "1.1.2", T0 + timedelta(seconds=0.1), "second")
    assert due(ledger, T0 + timedelta(seconds=5)) == []  # the second association is still open
    ledger.end_association("second", released=True, now=T0 + timedelta(seconds=6))
    assert due(ledger, T0 + timedelta(seconds=6 + GRACE / 2)) == []
    assert due(ledger, T0 + timedelta(seconds=6 + GRACE)) == ["1.1"]


def write_cr(folder: Path, **attributes: object) -> Path:
    dataset = crafted_cr(**attributes)
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    dcmwrite(path, dataset, enforce_file_format=True)
    return path


def associate(port: int, calling_ae: str) -> Any:
    """An association with the node from pynetdicom, which a test releases when it is done."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CR, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA")
    assert assoc.is_established
    return assoc


def associations(node: Node) -> list[Association]:
    with node.ledger.reading() as session:
        return list(session.scalars(select(Association)))


def test_storescu_release_dispatches_the_study_after_the_grace_without_waiting_for_a_tick(
    release_node: Node, tmp_path: Path
) -> None:
    dispatch = Dispatch()
    # A loop that never ticks on its own within the test: only the release can wake it.
    loop = SettleLoop(release_node.ledger, dispatch, LONG_SETTLE, interval_seconds=3600, grace_seconds=GRACE)
    release_node.scp.on_released = loop.association_released
    files = [write_cr(tmp_path, StudyInstanceUID="1.2.826.0.1.3680043.8.498.7001") for _ in range(2)]
    loop.start()
    try:
        sent = dicom_peers.storescu(release_node.port, files, called_ae="PLEURA")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        dicom_peers.wait_for(lambda: dispatch.calls, 60, "the released study to be dispatched")
    finally:
        loop.stop()
    [(study_uid, instances, _)] = dispatch.calls
    assert study_uid == "1.2.826.0.1.3680043.8.498.7001"
    assert len(instances) == 2
    [association] = associations(release_node)
    assert association.released_at is not None and association.aborted_at is None
    assert association.calling_ae == "STORESCU"


def test_storescu_abort_leaves_the_study_to_the_quiet_time(release_node: Node, tmp_path: Path) -> None:
    path = write_cr(tmp_path, StudyInstanceUID="1.2.826.0.1.3680043.8.498.7002")
    sent = dicom_peers.storescu(release_node.port, [path], called_ae="PLEURA", options=["--abort"])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    ended = dicom_peers.wait_for(
        lambda: [a for a in associations(release_node) if a.aborted_at or a.released_at], 30, "the abort recorded"
    )
    assert (ended[0].aborted_at is not None, ended[0].released_at) == (True, None)
    assert due(release_node.ledger, utcnow() + timedelta(seconds=60)) == []
    assert due(release_node.ledger, utcnow() + timedelta(seconds=LONG_SETTLE)) == ["1.2.826.0.1.3680043.8.498.7002"]


def test_an_open_association_keeps_its_study_waiting_until_released(release_node: Node) -> None:
    assoc = associate(release_node.port, "KEEPSOPEN")
    try:
        status = assoc.send_c_store(crafted_cr(StudyInstanceUID="1.2.826.0.1.3680043.8.498.7003"))
        assert status.Status == 0x0000
        assert due(release_node.ledger, utcnow() + timedelta(seconds=60)) == []  # open: not early
    finally:
        assoc.release()
    dicom_peers.wait_for(
        lambda: due(release_node.ledger, utcnow() + timedelta(seconds=1)), 30, "the study due after the release"
    )


def test_a_ct_series_is_sent_whole_after_the_grace(ledger: Ledger) -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    for name in ("first", "second"):
        ledger.open_association(name, "CT", now=T0)
    for index in range(3):
        ledger.record_instance(
            sop_instance_uid=f"9.9.{index}", study_uid="9.9", series_instance_uid="9.9.1", sop_class_uid=ct,
            transfer_syntax_uid="1.2.840.10008.1.2.1", storage_key=f"instances/9.9.{index}.dcm",
            association_id="first" if index < 2 else "second", received_at=T0,
        )
    ledger.end_association("first", released=True, now=T0)
    assert due(ledger, T0 + timedelta(seconds=5)) == []  # one slice came over an association still open
    ledger.end_association("second", released=True, now=T0 + timedelta(seconds=5))
    [study] = ledger.due_studies(LONG_SETTLE, T0 + timedelta(seconds=5 + GRACE), grace_seconds=GRACE)
    assert [i["sop_instance_uid"] for i in study.instances] == ["9.9.0", "9.9.1", "9.9.2"]


def test_a_study_on_the_quiet_time_is_dispatched_when_it_settles_not_at_the_next_tick(ledger: Ledger) -> None:
    """An association still open: the study waits for the quiet time, and the loop wakes when it has
    passed, however far off its next tick is."""
    dispatch = Dispatch()
    settle = 1.0
    loop = SettleLoop(ledger, dispatch, settle, interval_seconds=3600, grace_seconds=GRACE)
    ledger.open_association("open", "KEEPSOPEN", now=utcnow())
    loop.start()  # its first round finds nothing due yet
    try:
        receive(ledger, "1.2.826.0.1.3680043.8.498.7010", "1.2.826.0.1.3680043.8.498.7010.1", utcnow(), "open")
        loop.wake()  # a round (as an instance's arrival or the tick would bring) that learns when it settles
        dicom_peers.wait_for(lambda: dispatch.calls, 60, "the study dispatched once its quiet time passed")
    finally:
        loop.stop()
    [(study_uid, _, _)] = dispatch.calls
    assert study_uid == "1.2.826.0.1.3680043.8.498.7010"
