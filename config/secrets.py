"""One way to hide secrets wherever Pleura prints or logs something: `pleura config`, `/readyz`
details, error messages and log lines all pass their text through :func:`mask_text` (or their
settings through :func:`mask_values`), so a password in a database or broker URL, an API token or a
webhook secret never reaches a terminal, a log collector or a monitoring probe's answer."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

SECRET_KEYS = frozenset({"token", "secret", "password", "token_sha256", "client_secret"})
"""Keys whose values are secrets wherever they appear in the settings (nested ones included)."""

# scheme://user:password@host, scheme://:password@host (Redis), and ?password=... query parameters.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<secret>[^@\s/]+)(?P<at>@)")
_QUERY_SECRET = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|token|secret|access_key|secret_key)=)(?P<secret>[^&\s]+)", re.I)


def mask_text(text: str) -> str:
    """``text`` with every URL password and secret query parameter replaced by ``***``."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK + m["at"], text)
    return _QUERY_SECRET.sub(lambda m: m["head"] + MASK, text)


def mask_values(value: Any) -> Any:
    """A copy of ``value`` (settings as JSON-like data) with secret keys shown as ``***`` and every
    string passed through :func:`mask_text`."""
    if isinstance(value, dict):
        return {k: MASK if k in SECRET_KEYS and v else mask_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_values(v) for v in value]
    if isinstance(value, str):
        return mask_text(value)
    return value
