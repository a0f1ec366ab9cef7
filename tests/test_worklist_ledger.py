"""The ledger's worklist queries on SQLite and PostgreSQL: study references, flagged first,
filters, feedback in force and its export."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from node.ledger import Ledger, LedgerError, study_ref_for
from test_notify import analysed_study, database_url, postgres  # noqa: F401  (fixtures)

T0 = datetime.now(timezone.utc) - timedelta(hours=1)


@pytest.fixture
def ledger(tmp_path, database_url):  # noqa: F811
    opened = Ledger(database_url or f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    yield opened
    opened.close()


def test_worklist_references_order_filters_and_feedback(ledger):
    analysed_study(ledger, flagged=False, study="1.2.3.1", at=T0)
    analysed_study(ledger, flagged=True, study="1.2.3.2", at=T0 + timedelta(minutes=1))
    analysed_study(ledger, flagged=False, study="1.2.3.3", at=T0 + timedelta(minutes=2))

    studies = ledger.worklist()
    assert [s["study_uid"] for s in studies] == ["1.2.3.2", "1.2.3.3", "1.2.3.1"]  # flagged, then newest
    assert all(s["ref"] == study_ref_for(s["study_uid"]) and s["feedback"] is None for s in studies)
    assert ledger.study_for_ref(study_ref_for("1.2.3.2")) == "1.2.3.2"
    assert ledger.study_for_ref("unknown") is None
    assert [s["study_uid"] for s in ledger.worklist(flagged_only=True)] == ["1.2.3.2"]
    assert ledger.worklist(statuses=["receiving"]) == []
    assert [s["study_uid"] for s in ledger.worklist(since=T0 + timedelta(minutes=1, seconds=-29))] == ["1.2.3.3"]

    ledger.record_feedback("1.2.3.2", "confirmed", "dr.a", now=T0 + timedelta(minutes=5))
    ledger.record_feedback("1.2.3.2", "rejected", "dr.b", comment="skin fold", now=T0 + timedelta(minutes=6))
    (flagged,) = ledger.worklist(flagged_only=True)
    assert flagged["feedback"]["verdict"] == "rejected" and flagged["feedback"]["user"] == "dr.b"
    assert [f["verdict"] for f in ledger.list_feedback("1.2.3.2")] == ["confirmed", "rejected"]
    with pytest.raises(ValueError):
        ledger.record_feedback("1.2.3.2", "perhaps", "dr.c")
    with pytest.raises(LedgerError):
        ledger.record_feedback("9.9.9", "confirmed", "dr.c")

    (exported,) = ledger.feedback_export()
    assert exported["study_uid"] == "1.2.3.2" and exported["verdict"] == "rejected" and exported["label"] == 0
    assert exported["comment"] == "skin fold" and exported["flagged"] is True
    assert [image["label"] for image in exported["images"]] == [0]
