"""DICOM TLS with a CA made in the test: the SCP (DCMTK's echoscu and storescu as TLS clients) and
deliveries to a TLS peer (pynetdicom), mutual authentication included."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt

import dicom_peers
from config.destinations import Destination
from config.settings import Settings
from node.audit import AuditTrail
from node.export import DeliveryError, send_results
from node.tls import client_context, server_context
from test_node_admission import start_node
from test_node_export import write_result


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class Certificates:
    """A CA, a certificate for 127.0.0.1 (the server) and a client certificate, all PEM."""

    def __init__(self, folder: Path, name: str = "Pleura test CA") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca = folder / "ca.key", folder / "ca.pem"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                 "-keyout", str(self.ca_key), "-out", str(self.ca))
        self.server_key, self.server = self._issue(folder, "server", "subjectAltName=IP:127.0.0.1,DNS:localhost")
        self.client_key, self.client = self._issue(folder, "client", "extendedKeyUsage=clientAuth")

    def _issue(self, folder: Path, name: str, extension: str) -> tuple[Path, Path]:
        key, request, cert, ext = (folder / f"{name}.{suffix}" for suffix in ("key", "csr", "pem", "ext"))
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(request))
        ext.write_text(extension + "\n")
        _openssl("x509", "-req", "-in", str(request), "-CA", str(self.ca), "-CAkey", str(self.ca_key),
                 "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
        return key, cert


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("pki"))


def tls_echo(port: int, certificates: Certificates, *, client_cert: bool = True, verify_with: Path | None = None) -> subprocess.CompletedProcess:
    args = [dicom_peers.dcmtk_tool("echoscu"), "-aet", "MODALITY", "-aec", "PLEURA", "-to", "10"]
    if client_cert:
        args += ["+tls", str(certificates.client_key), str(certificates.client)]
    else:
        args += ["+tla"]  # TLS without a certificate of our own
    args += ["+cf", str(verify_with or certificates.ca), "127.0.0.1", str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def test_the_scp_speaks_tls_and_requires_a_client_certificate(tmp_path: Path, certificates: Certificates) -> None:
    scp, settings, _ = start_node(
        tmp_path, tls_cert_file=certificates.server, tls_key_file=certificates.server_key, tls_ca_file=certificates.ca
    )
    try:
        ok = tls_echo(settings.port, certificates)
        assert ok.returncode == 0, ok.stderr
        plain = dicom_peers.echoscu(settings.port, "PLEURA")
        assert plain.returncode != 0  # no plain TCP on a TLS port
        anonymous = tls_echo(settings.port, certificates, client_cert=False)
        assert anonymous.returncode != 0  # mutual TLS: a caller without a certificate is refused
    finally:
        scp.stop()
        scp.ledger.close()


def test_a_silent_socket_does_not_stop_tls_callers(tmp_path: Path, certificates: Certificates) -> None:
    """The handshake runs in the connection's own thread, within association_request_timeout: a
    connection that never speaks costs one slot for seconds, never the listener."""
    scp, settings, _ = start_node(
        tmp_path, tls_cert_file=certificates.server, tls_key_file=certificates.server_key, tls_ca_file=certificates.ca,
        association_request_timeout=3, network_timeout=120,
    )
    silent = [socket.create_connection(("127.0.0.1", settings.port), timeout=30) for _ in range(2)]
    try:
        started = time.monotonic()
        ok = tls_echo(settings.port, certificates)  # at once, while the silent sockets are open
        assert ok.returncode == 0, ok.stderr
        assert time.monotonic() - started < 20
        for sock in silent:  # and the silent ones are closed at the deadline, not after network_timeout
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < 30
    finally:
        for sock in silent:
            sock.close()
        scp.stop()
        scp.ledger.close()
    dropped = [e for e in AuditTrail(settings.storage_dir).events() if e["event"] == "connection-dropped"]
    assert len(dropped) == 2 and all("PLEURA_ASSOCIATION_REQUEST_TIMEOUT" in e["reason"] for e in dropped)


def test_a_client_that_does_not_trust_the_node_will_not_talk(tmp_path: Path, certificates: Certificates) -> None:
    other = Certificates(tmp_path / "other", name="Another CA")
    scp, settings, _ = start_node(tmp_path, tls_cert_file=certificates.server, tls_key_file=certificates.server_key)
    try:
        assert tls_echo(settings.port, certificates).returncode == 0  # no client CA set: any client
        assert tls_echo(settings.port, certificates, verify_with=other.ca).returncode != 0
    finally:
        scp.stop()
        scp.ledger.close()


class TlsPACS:
    """A pynetdicom Storage SCP behind TLS, requiring a client certificate from `client_ca`."""

    def __init__(self, certificates: Certificates) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(certificates.server), str(certificates.server_key))
        context.load_verify_locations(cafile=str(certificates.ca))
        context.verify_mode = ssl.CERT_REQUIRED
        self.port = dicom_peers.free_port()
        self.received: list[str] = []
        self.ae = AE(ae_title="PACS")
        for context_ in AllStoragePresentationContexts:
            self.ae.add_supported_context(context_.abstract_syntax, ExplicitVRLittleEndian)

        def store(event) -> int:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, ssl_context=context, evt_handlers=[(evt.EVT_C_STORE, store)]
        )

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def tls_pacs(certificates: Certificates) -> Iterator[TlsPACS]:
    pacs = TlsPACS(certificates)
    yield pacs
    pacs.stop()


def test_results_are_delivered_over_tls_with_the_nodes_certificate(
    tmp_path: Path, certificates: Certificates, tls_pacs: TlsPACS
) -> None:
    result = write_result(tmp_path, "SEG")
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=tls_pacs.port, tls=True, tls_ca_file=certificates.ca)
    settings = Settings(
        storage_dir=tmp_path, destinations=[destination],
        tls_cert_file=certificates.client, tls_key_file=certificates.client_key,
    )
    assert send_results(destination, "PLEURA", [tmp_path / result["key"]], client_context(settings, destination)) == [0]
    assert tls_pacs.received == [result["sop_instance_uid"]]

    # Without a certificate of its own the node is refused by this PACS; a PACS whose certificate
    # another CA signed is refused by the node.
    anonymous = Settings(storage_dir=tmp_path, destinations=[destination])
    with pytest.raises(DeliveryError):
        send_results(destination, "PLEURA", [tmp_path / result["key"]], client_context(anonymous, destination))
    other = Certificates(tmp_path / "other", name="Another CA")
    distrusting = destination.model_copy(update={"tls_ca_file": other.ca})
    with pytest.raises(DeliveryError):
        send_results(distrusting, "PLEURA", [tmp_path / result["key"]], client_context(settings, distrusting))
    assert len(tls_pacs.received) == 1


def test_tls_settings_are_checked(tmp_path: Path, certificates: Certificates) -> None:
    from config.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="go together"):
        load_settings(storage_dir=tmp_path, tls_cert_file=certificates.server)
    with pytest.raises(SettingsError, match="is not a file"):
        load_settings(storage_dir=tmp_path, tls_cert_file=tmp_path / "missing.pem", tls_key_file=certificates.server_key)
    assert server_context(Settings(storage_dir=tmp_path)) is None
