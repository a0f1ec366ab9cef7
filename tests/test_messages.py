"""The task options between node and worker: built by the node as a typed message, sent in the
wire form version 1 used, read back and checked by the worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import Settings
from contract.messages import AnalysisOptions, MessageError, ReportRef
from node.dispatch import analysis_options

REPORT = {"study_uid": "1.2", "sop_instance_uid": "1.2.9", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.22",
          "storage_key": "results/1.2/1.2.9.dcm", "model_name": "pleura-demo", "model_version": "1.0"}


def test_the_node_sends_the_options_as_version_1_did_and_the_worker_reads_them_back(tmp_path: Path) -> None:
    settings = Settings(storage_dir=tmp_path, sc_heatmap=True)
    sent = analysis_options(settings, {"supersedes": REPORT, "not_analysed_reason": "it stopped its worker twice"})
    assert sent == {
        "objects": ["SR", "SEG", "GSPS", "SC"], "sc_heatmap": True, "heartbeat_seconds": 5.0,
        "supersedes": REPORT, "not_analysed_reason": "it stopped its worker twice",
    }
    read = AnalysisOptions.from_message(sent)
    assert read.version == 1 and read.objects == ["SR", "SEG", "GSPS", "SC"] and read.sc_heatmap is True
    assert read.supersedes == ReportRef(**REPORT) and read.not_analysed_reason == "it stopped its worker twice"
    assert read.to_message() == sent


def test_options_from_an_older_node_or_none_at_all_read_as_the_defaults() -> None:
    for sent in ({}, {"objects": None}):
        read = AnalysisOptions.from_message(sent)
        assert (read.objects, read.sc_heatmap, read.heartbeat_seconds, read.supersedes) == (None, False, None, None)
    later = {"objects": ["SR"], "sc_heatmap": False, "version": 2, "a_later_option": True}
    assert AnalysisOptions.from_message(later).version == 2  # a newer sender's keys are ignored
    assert AnalysisOptions.from_message(later).to_message() == {"version": 2, "objects": ["SR"], "sc_heatmap": False}


def test_options_that_do_not_fit_are_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(MessageError, match=r"analysis options: objects\[1\] 'PDF' is not one of"):
        AnalysisOptions.from_message({"objects": ["SR", "PDF"]})
    with pytest.raises(MessageError, match="'supersedes' has no 'storage_key'"):
        analysis_options(Settings(storage_dir=tmp_path), {"supersedes": {"sop_instance_uid": "1.2.9"}})
    with pytest.raises(MessageError, match="analysis options: the analysis options must be an object, got list"):
        AnalysisOptions.from_message(["SR"])
