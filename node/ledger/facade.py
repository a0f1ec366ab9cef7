"""The :class:`Ledger`: one object with every query of the ledger, each public call one transaction.

Its parts live in one module per aggregate (instances and studies, results and outbox, feedback
and labels, notifications, the read views) on the transactions of :mod:`node.ledger.sessions`;
the rules (a re-sent instance creates no work, a new instance reopens an analysed study, a study is
delivered when every result reached every destination) each live in the one module that owns them.
"""

from __future__ import annotations

from node.ledger.feedback import FeedbackLedger
from node.ledger.leases import LeaseLedger
from node.ledger.logins import LoginLedger
from node.ledger.notifications import NotificationLedger
from node.ledger.reanalysis import ReanalysisLedger
from node.ledger.results import ResultLedger
from node.ledger.studies import StudyLedger
from node.ledger.views import ViewLedger


class Ledger(StudyLedger, LeaseLedger, ResultLedger, FeedbackLedger, NotificationLedger, LoginLedger, ReanalysisLedger, ViewLedger):
    """All reads and writes of the ledger database; safe to share between threads."""
