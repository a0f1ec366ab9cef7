"""`pleura reanalyse` and re-analysis on promotion: which studies, and the request in the ledger.

The request is a ledger change only (:meth:`~node.ledger.Ledger.request_reanalysis`), so it works
from any process that reaches the ledger: the running node's settle loop dispatches the studies
like newly received ones, a worker analyses them with the model active then, and the new results
are delivered to every destination. A study on its way to a worker already is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from config.errors import PleuraError
from config.settings import Settings
from node.ledger import Ledger, utcnow

log = logging.getLogger(__name__)


class ReanalysisError(PleuraError, ValueError):
    """A re-analysis asked for something that does not exist or names nothing to select by."""


@dataclass(frozen=True)
class Reanalysis:
    """What a request did: the studies sent again, by their worklist reference."""

    refs: list[str] = field(default_factory=list)


def reanalyse(
    ledger: Ledger,
    *,
    study_ref: str | None = None,
    received_since: datetime | None = None,
    model_version: str | None = None,
    now: datetime | None = None,
) -> Reanalysis:
    """Request the re-analysis of one study (its worklist reference), of the studies received
    since a time, or of those last analysed by a model version (``VERSION`` or
    ``NAME/VERSION``); the criteria combine. Raises :class:`ReanalysisError` when none is given
    or the reference is unknown."""
    if study_ref is None and received_since is None and model_version is None:
        raise ReanalysisError("name a study (its reference), a date (--since) or a model version (--model)")
    study_uids = None
    if study_ref is not None:
        study_uid = ledger.study_for_ref(study_ref)
        if study_uid is None:
            raise ReanalysisError(f"no study has the reference {study_ref!r}")
        study_uids = [study_uid]
    candidates = ledger.reanalysis_candidates(
        study_uids=study_uids, received_since=received_since, model_version=model_version
    )
    requested = ledger.request_reanalysis(candidates, now=now) if candidates else []
    refs = [ledger.study_ref(uid) for uid in requested]
    for requested_ref in refs:
        log.info("study %s will be analysed again", requested_ref)
    return Reanalysis(refs=refs)


def reanalyse_after_promotion(settings: Settings, *, now: datetime | None = None) -> Reanalysis:
    """Re-analyse the studies received in the last ``reanalyse_hours_on_promote`` hours (none
    when the setting is 0): called when a radiograph model is promoted or rolled back."""
    hours = settings.reanalyse_hours_on_promote
    if hours <= 0:
        return Reanalysis()
    since = (now or utcnow()) - timedelta(hours=hours)
    done = reanalyse(Ledger(settings.ledger_url), received_since=since, now=now)
    log.info("model promoted: %d stud(ies) of the last %g h will be analysed again", len(done.refs), hours)
    return done


__all__ = ["Reanalysis", "ReanalysisError", "reanalyse", "reanalyse_after_promotion"]
