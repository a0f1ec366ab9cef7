"""Slow and silent DICOM clients, on raw sockets, for the tests of the node's connection deadlines.

Each sends at most a fixed number of bytes at a fixed interval and stops by itself, or as soon as
the node closes the connection; each reports how long the node kept it.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"
TRICKLER_ADDRESS = "127.0.0.2"
"""Tricklers call from here (loopback, another address than the legitimate peers' 127.0.0.1)."""


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(called: str = "PLEURA", calling: str = "TRICKLER") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification (PS3.8 9.3.2)."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION) + _item(0x40, IMPLICIT_VR_LE))
    user = _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, PYNETDICOM_IMPLEMENTATION_UID.encode()))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16).encode()
        + calling.ljust(16).encode()
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT)
        + context
        + user
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def p_data(fragment: bytes, control: int) -> bytes:
    """A P-DATA-TF PDU with one PDV on presentation context 1."""
    pdv = struct.pack(">LBB", len(fragment) + 2, 1, control) + fragment
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


@dataclass
class Trickled:
    connected: bool
    kept_seconds: float
    """From the connect until the node closed the connection (or the trickler gave up)."""
    closed_by_node: bool
    sent: int


def connect(port: int, source: str = TRICKLER_ADDRESS) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def _closed(sock: socket.socket, wait: float) -> bool:
    """Whether the node closed (or answered with an abort or rejection, then closed) within `wait`."""
    readable, _, _ = select.select([sock], [], [], wait)
    if not readable:
        return False
    try:
        data = sock.recv(65536)
    except OSError:
        return True
    return not data or data[:1] in (b"\x03", b"\x07") or _closed(sock, wait)


def _read_pdu(sock: socket.socket) -> bytes:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            raise ConnectionError("closed before a PDU")
        header += chunk
    length = struct.unpack(">L", header[2:])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed inside a PDU")
        body += chunk
    return header + body


def trickle(
    port: int,
    prefix: bytes = b"",
    drip: bytes = b"",
    *,
    associate: bool = False,
    interval: float = 0.5,
    max_drops: int = 60,
    ready: threading.Event | None = None,
) -> Trickled:
    """Connect, send `prefix` at once (after an association, with `associate`), then `drip` one
    byte at a time (or whole, when `drip` is a list of PDUs), every `interval` s, at most
    `max_drops` times; stop when the node closes. `ready` is set once the trickler holds its slot
    (or has failed to), so a test can start its legitimate peers only then."""
    started = time.monotonic()
    try:
        sock = connect(port)
    except OSError:
        if ready is not None:
            ready.set()
        return Trickled(False, 0.0, True, 0)
    sent = 0
    try:
        try:
            if associate:
                sock.sendall(associate_rq())
                answer = _read_pdu(sock)
                assert answer[:1] == b"\x02", f"association not accepted: {answer[:16]!r}"
            if prefix:
                sock.sendall(prefix)
        except OSError:
            return Trickled(True, time.monotonic() - started, True, sent)
        finally:
            if ready is not None:
                ready.set()
        pieces = [drip[i : i + 1] for i in range(len(drip))]
        for index in range(max_drops):
            if _closed(sock, interval):
                return Trickled(True, time.monotonic() - started, True, sent)
            try:
                sock.sendall(pieces[index % len(pieces)] if pieces else b"\x00")
                sent += 1
            except OSError:
                return Trickled(True, time.monotonic() - started, True, sent)
        return Trickled(True, time.monotonic() - started, False, sent)
    finally:
        sock.close()


def trickle_pdus(port: int, pdus: list[bytes], interval: float = 0.5) -> Trickled:
    """Associate, then send whole PDUs, one every `interval` s; stop when the node closes."""
    started = time.monotonic()
    sock = connect(port)
    sent = 0
    try:
        sock.sendall(associate_rq())
        assert _read_pdu(sock)[:1] == b"\x02"
        for pdu in pdus:
            if _closed(sock, interval):
                return Trickled(True, time.monotonic() - started, True, sent)
            try:
                sock.sendall(pdu)
                sent += 1
            except OSError:
                return Trickled(True, time.monotonic() - started, True, sent)
        return Trickled(True, time.monotonic() - started, _closed(sock, interval), sent)
    finally:
        sock.close()
