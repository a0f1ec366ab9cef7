"""`pleura check`: can this site's configuration work, end to end? One check per dependency and
per peer, each run once, in parallel, bounded in time:

- ``database``: the ledger's database answers ``SELECT 1`` (no schema is created or changed);
- ``broker``: the Celery broker takes a connection;
- ``storage``: the storage directory takes a new file, and has more free space than
  ``min_free_disk_mb`` (below it the node refuses associations);
- ``model``: the active radiograph bundle loads (manifest, checksums, networks);
- ``destination <label>``: a C-ECHO to each DICOM destination (with its TLS, as deliveries do);
- ``hl7 <label>``: a TCP connection (and the TLS handshake) to each HL7 listener; no message is sent;
- ``webhook <url>``: an HTTP ``HEAD`` request to each webhook, answered with any status that is
  not a gateway or availability error (an endpoint that takes only POST answers 405: reachable).

Unlike ``/readyz`` (node/ops/health.py), which a running process answers about itself, this runs
before or beside the processes, from the operator's shell, and reaches the peers they will call.
Every detail passes through :func:`config.secrets.mask_text`.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

from celery import Celery
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import create_engine, text

from config.errors import PleuraError
from config.secrets import mask_text
from config.destinations import Destination, DicomwebDestination, FhirEndpoint, HttpAuth, Hl7Destination, Webhook
from config.settings import Settings
from node.admission import free_disk_mb
from node.http_auth import authorized_session
from node.notify.hl7 import open_mllp
from node.ops.health import check_broker, check_model, check_storage
from node.tls import client_context

DEFAULT_TIMEOUT_SECONDS = 10.0
MODEL_GRACE_SECONDS = 60.0
"""Time a check may take beyond ``timeout``: loading the model bundle builds and runs its networks."""
GATEWAY_ERRORS = frozenset({502, 503, 504})
"""HTTP answers that say the endpoint behind a proxy is not there: the webhook check fails on them."""


class CheckFailed(PleuraError):
    """A check's reason, in words for the operator."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def check_database(settings: Settings, timeout: float) -> str:
    """``SELECT 1`` on the ledger's database through its own engine, which is disposed of again."""
    url = settings.ledger_url
    connect_args = {"timeout": timeout} if url.startswith("sqlite") else {"connect_timeout": max(1, int(timeout))}
    engine = create_engine(url, connect_args=connect_args if not url.startswith("sqlite:///:memory:") else {})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    return engine.url.render_as_string(hide_password=True)


def check_free_space(settings: Settings) -> str:
    """The storage directory is writable and has more than ``min_free_disk_mb`` free."""
    where = check_storage(settings)
    free = free_disk_mb(settings.storage_dir)
    if free < settings.min_free_disk_mb:
        raise CheckFailed(
            f"{where}: {free:.0f} MB free, below min_free_disk_mb {settings.min_free_disk_mb} MB "
            "(the node refuses studies): free space or lower PLEURA_MIN_FREE_DISK_MB"
        )
    return f"{where} (writable, {free:.0f} MB free)"


def echo_destination(settings: Settings, destination: Destination, timeout: float) -> str:
    """A C-ECHO to ``destination`` with the calling AE title and TLS its deliveries use."""
    calling = destination.calling_ae_title or settings.ae_title
    ae = AE(ae_title=calling)
    ae.connection_timeout = timeout
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    context = client_context(settings, destination)
    tls_args = (context, destination.host) if context is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            answer = assoc.acceptor.primitive
            raise CheckFailed(f"association rejected: {answer.result_str}, {answer.reason_str} (is {calling} known there?)")
        raise CheckFailed("no association: connection refused, timed out or aborted (host, port, TLS?)")
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        raise CheckFailed("no answer to the C-ECHO")
    if int(status.Status) != 0:
        raise CheckFailed(f"C-ECHO answered 0x{int(status.Status):04X}")
    return f"C-ECHO ok{' (TLS)' if context is not None else ''}, as {calling}"


def reach_hl7(destination: Hl7Destination, timeout: float) -> str:
    """Open (and close) a connection to the MLLP listener; no message is sent."""
    with open_mllp(destination, timeout=timeout) as connection:
        tls = getattr(connection, "version", lambda: None)()
    return f"connected{f' ({tls})' if tls else ''}"


def reach_webhook(webhook: Webhook, timeout: float) -> str:
    """A ``HEAD`` request: any HTTP answer but a gateway error shows the endpoint is there."""
    request = urllib.request.Request(webhook.url, method="HEAD", headers={"User-Agent": "pleura-check"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            code = response.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    if code in GATEWAY_ERRORS:
        raise CheckFailed(f"HTTP {code}: the endpoint behind the proxy is not available")
    return f"HTTP {code}"


def reach_http(endpoint: HttpAuth, path: str, timeout: float) -> str:
    """A GET of `path` under the endpoint's URL with its authentication and CA bundle: refused
    credentials and gateway errors fail, any other answer shows the service is there."""
    url = f"{endpoint.url.rstrip('/')}/{path}"
    response = authorized_session(endpoint).get(url, timeout=min(timeout, endpoint.timeout_seconds))
    if response.status_code in (401, 403):
        raise CheckFailed(f"HTTP {response.status_code}: the credentials were refused")
    if response.status_code in GATEWAY_ERRORS:
        raise CheckFailed(f"HTTP {response.status_code}: the service behind the proxy is not available")
    return f"HTTP {response.status_code}"


def site_checks(settings: Settings, celery_app: Celery, timeout: float) -> list[tuple[str, Callable[[], str]]]:
    """Every check that the settings call for, as (name, function)."""
    checks: list[tuple[str, Callable[[], str]]] = [
        ("database", lambda: check_database(settings, timeout)),
        ("broker", lambda: check_broker(celery_app)),
        ("storage", lambda: check_free_space(settings)),
        ("model", lambda: check_model(settings)),
    ]
    for destination in settings.destinations:
        if isinstance(destination, DicomwebDestination):  # a QIDO-RS search: is it there, are we let in?
            checks.append((f"destination {destination.label}",
                           lambda d=destination: reach_http(d, "studies?limit=1", timeout)))
        else:
            checks.append((f"destination {destination.label}", lambda d=destination: echo_destination(settings, d, timeout)))
    for hl7 in settings.hl7_destinations:
        checks.append((f"hl7 {hl7.label}", lambda h=hl7: reach_hl7(h, timeout)))
    for webhook in settings.webhooks:
        checks.append((f"webhook {mask_text(webhook.url)}", lambda w=webhook: reach_webhook(w, timeout)))
    fhir: FhirEndpoint | None = settings.fhir
    if fhir is not None:
        checks.append((f"fhir {fhir.label}", lambda: reach_http(fhir, "metadata", timeout)))
    return checks


def run_site_checks(
    settings: Settings, celery_app: Celery, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> list[CheckResult]:
    """Run every check at once; each passes, fails with its reason, or fails for taking longer
    than ``timeout`` (plus :data:`MODEL_GRACE_SECONDS`)."""
    checks = site_checks(settings, celery_app, timeout)
    pool = ThreadPoolExecutor(max_workers=max(1, len(checks)), thread_name_prefix="pleura-check")
    try:
        futures = [(name, pool.submit(run)) for name, run in checks]
        deadline = timeout + MODEL_GRACE_SECONDS
        wait([future for _, future in futures], timeout=deadline)
        results = []
        for name, future in futures:
            if not future.done():
                results.append(CheckResult(name, False, f"no answer within {deadline:.0f} s"))
                continue
            try:
                results.append(CheckResult(name, True, mask_text(str(future.result()))))
            except PleuraError as exc:  # its message is meant for the operator as it is
                results.append(CheckResult(name, False, mask_text(str(exc))[:500]))
            except Exception as exc:
                results.append(CheckResult(name, False, mask_text(f"{type(exc).__name__}: {exc}")[:500]))
        return results
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
