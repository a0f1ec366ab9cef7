"""DICOM TLS (PS3.15 Annex B, the BCP 195 profile): SSL contexts for the SCP and for deliveries.

The SCP listens with TLS when the node has a certificate (``tls_cert_file``/``tls_key_file``) and
asks callers for a certificate signed by ``tls_ca_file`` when that is set. A destination with
``tls`` is reached with TLS, its certificate checked against its ``tls_ca_file`` (else the system's
CAs) and its host name; the node presents its own certificate when it has one. An HL7 destination
with ``tls`` is reached the same way (MLLP inside TLS), without a client certificate.
"""

from __future__ import annotations

import ssl

from config.destinations import Destination, Hl7Destination
from config.settings import Settings

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The SCP's context, or None for plain TCP."""
    if not settings.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    if settings.tls_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(settings: Settings, destination: Destination) -> ssl.SSLContext | None:
    """The context for an association with ``destination``, or None for plain TCP."""
    if not destination.tls:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(destination.tls_ca_file) if destination.tls_ca_file else None
    )
    context.minimum_version = MINIMUM_VERSION
    if settings.tls:
        context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    return context


def hl7_client_context(destination: Hl7Destination) -> ssl.SSLContext | None:
    """The context for MLLP to ``destination``, or None for plain TCP: its certificate checked
    against its ``tls_ca_file`` (else the system's CAs) and its host name, TLS 1.2 at least."""
    if not destination.tls:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(destination.tls_ca_file) if destination.tls_ca_file else None
    )
    context.minimum_version = MINIMUM_VERSION
    return context
