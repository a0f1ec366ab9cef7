"""The base of every expected failure in Pleura: bad settings, bad input, a refused model, an
unreachable peer. The command line prints such an error as one line (a traceback only with
``pleura --debug``); anything else is a bug and keeps its traceback."""

from __future__ import annotations


class PleuraError(Exception):
    """An expected failure, with a message meant for the person running Pleura."""
