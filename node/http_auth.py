"""HTTP sessions for the services Pleura sends to over HTTP (DICOMweb destinations, the FHIR
server): authentication (none, basic, bearer token, OAuth2 client credentials) and the CA bundle
that signs the server's certificate, from one :class:`~config.destinations.HttpAuth`.

An OAuth2 token is fetched from the token endpoint (``requests-oauthlib``'s backend-application
flow) when a session is made and again once it is about to expire; sessions are kept per endpoint
and process, so a token serves every delivery while it is valid.
"""

from __future__ import annotations

import threading
import time

import requests
from oauthlib.oauth2 import BackendApplicationClient, OAuth2Error
from requests_oauthlib import OAuth2Session

from config.errors import PleuraError
from config.destinations import HttpAuth

TOKEN_MARGIN_SECONDS = 30.0
"""A token this close to its expiry is replaced before it is used."""

_sessions: dict[tuple[str, str], requests.Session] = {}
_lock = threading.Lock()


class AuthError(PleuraError, RuntimeError):
    """The token endpoint refused Pleura's client credentials: trying again cannot help until
    someone changes the configuration (``permanent``), or it could not be reached."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def _verify(endpoint: HttpAuth) -> str | bool:
    return str(endpoint.ca_file) if endpoint.ca_file is not None else True


def _token_expired(session: requests.Session) -> bool:
    token = getattr(session, "token", None) or {}
    expires_at = token.get("expires_at")
    return not token or (expires_at is not None and expires_at < time.time() + TOKEN_MARGIN_SECONDS)


def _fetch_token(endpoint: HttpAuth, session: OAuth2Session) -> None:
    try:
        session.fetch_token(
            token_url=str(endpoint.token_url),
            client_id=endpoint.client_id,
            client_secret=endpoint.client_secret,
            scope=endpoint.scope.split() if endpoint.scope else None,
            timeout=endpoint.timeout_seconds,
            verify=_verify(endpoint),
            include_client_id=True,
        )
    except OAuth2Error as exc:
        raise AuthError(f"the token endpoint {endpoint.token_url} refused the client credentials: {exc.error}",
                        permanent=True) from exc
    except (requests.RequestException, ValueError) as exc:
        raise AuthError(f"cannot get a token from {endpoint.token_url}: {type(exc).__name__}: {exc}",
                        permanent=False) from exc


def _keep_ca_file(session: requests.Session, ca_file: str) -> None:
    """Make the session's CA bundle win over ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE``, which
    requests otherwise prefers to a session's ``verify`` (the environment keeps its proxies)."""
    merge = session.merge_environment_settings

    def merge_keeping_ca(url, proxies, stream, verify, cert):  # type: ignore[no-untyped-def]
        merged = merge(url, proxies, stream, verify, cert)
        if verify is None or verify is True:
            merged["verify"] = ca_file
        return merged

    session.merge_environment_settings = merge_keeping_ca  # type: ignore[method-assign]


def authorized_session(endpoint: HttpAuth) -> requests.Session:
    """A session that authenticates to `endpoint` and checks its certificate with its CA bundle;
    raises :class:`AuthError` when an OAuth2 token cannot be had."""
    key = (type(endpoint).__name__, endpoint.model_dump_json())
    with _lock:
        session = _sessions.get(key)
        if session is None:
            if endpoint.auth == "oauth2":
                session = OAuth2Session(client=BackendApplicationClient(client_id=endpoint.client_id))
            else:
                session = requests.Session()
            if endpoint.auth == "basic":
                session.auth = (str(endpoint.username), str(endpoint.password))
            elif endpoint.auth == "bearer":
                session.headers["Authorization"] = f"Bearer {endpoint.token}"
            session.verify = _verify(endpoint)
            if endpoint.ca_file is not None:
                _keep_ca_file(session, str(endpoint.ca_file))
            session.headers["User-Agent"] = "pleura"
            _sessions[key] = session
        if isinstance(session, OAuth2Session) and _token_expired(session):
            _fetch_token(endpoint, session)
        return session
