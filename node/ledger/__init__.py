"""The ledger: where every received instance, study, result and delivery stands, and why."""

from node.ledger.views import *  # noqa: F401,F403
from node.ledger.views import _as_utc  # noqa: F401
