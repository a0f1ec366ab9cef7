"""The STAT lane: studies a sender marks urgent (C-STORE Priority HIGH, a calling AE listed in
``stat_calling_aes``) are dispatched to the STAT queue, which radiograph workers consume first."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

import dicom_peers
from contract.tasks import ANALYSE_STUDY, RADIOGRAPH_QUEUE, STAT_QUEUE, with_stat_queue
from node.dispatch import make_dispatcher, queue_depths
from node.ledger import utcnow
from node.settle import SettleLoop
from scp_node import Node, running_node
from test_node_dispatch import next_message
from test_node_scp import crafted_cr
from test_settle_on_release import associate, write_cr
from contract.celery_app import make_celery
from worker.startup import queue_kinds

URGENT_STUDY = "1.2.826.0.1.3680043.8.498.7101"
ROUTINE_STUDY = "1.2.826.0.1.3680043.8.498.7102"
HIGH_STUDY = "1.2.826.0.1.3680043.8.498.7103"


@pytest.fixture()
def stat_node(tmp_path: Path) -> Iterator[Node]:
    yield from running_node(tmp_path, stat_calling_aes=["ED-CR"], settle_seconds=1)


def test_a_stat_calling_ae_sends_its_study_to_the_stat_queue(stat_node: Node, tmp_path: Path) -> None:
    for calling_ae, study_uid in (("ED-CR", URGENT_STUDY), ("WARD-CR", ROUTINE_STUDY)):
        sent = dicom_peers.storescu(
            stat_node.port, [write_cr(tmp_path, StudyInstanceUID=study_uid)], called_ae="PLEURA", calling_ae=calling_ae
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
    app = make_celery(stat_node.settings)  # the embedded broker
    loop = SettleLoop(stat_node.ledger, make_dispatcher(app), settle_seconds=1)

    # The urgent study is dispatched first, to the STAT queue; the routine one to the radiograph queue.
    assert loop.run_once(utcnow() + timedelta(seconds=5)) == [URGENT_STUDY, ROUTINE_STUDY]
    assert {k: v for k, v in queue_depths(app).items() if v} == {STAT_QUEUE: 1, RADIOGRAPH_QUEUE: 1}
    headers, (args, _, _) = next_message(app, STAT_QUEUE)
    assert (headers["task"], args[0]) == (ANALYSE_STUDY, URGENT_STUDY)
    assert "urgent" not in args[2]  # the queue says it; the analysis options are unchanged
    headers, (args, _, _) = next_message(app, RADIOGRAPH_QUEUE)
    assert (headers["task"], args[0]) == (ANALYSE_STUDY, ROUTINE_STUDY)


def test_priority_high_makes_the_study_urgent(stat_node: Node) -> None:
    assoc = associate(stat_node.port, "WARD-CR")
    try:
        assert assoc.send_c_store(crafted_cr(StudyInstanceUID=HIGH_STUDY), priority=1).Status == 0x0000
        assert assoc.send_c_store(crafted_cr(StudyInstanceUID=ROUTINE_STUDY), priority=0).Status == 0x0000
    finally:
        assoc.release()
    due = stat_node.ledger.due_studies(1, utcnow() + timedelta(seconds=5))
    assert {study.study_uid: study.urgent for study in due} == {HIGH_STUDY: True, ROUTINE_STUDY: False}
    assert due[0].study_uid == HIGH_STUDY  # urgent studies first


def test_radiograph_workers_consume_the_stat_queue_first() -> None:
    assert with_stat_queue("radiograph") == "stat,radiograph"
    assert with_stat_queue("radiograph,ct") == "stat,radiograph,ct"
    assert with_stat_queue("ct,stat") == "stat,ct"
    assert with_stat_queue("ct") == "ct"
    assert queue_kinds("stat") == ["radiograph"]
    assert queue_kinds("ct") == ["ct"]
