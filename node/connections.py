"""Every connection to the SCP, from accept to close: who may connect, and how long it may take.

pynetdicom's timeouts are idle timeouts: a peer that sends one byte now and then is never idle, so
a request that never completes holds an association slot (and a thread) for ever, and the calling
AE allowlist is only consulted once the A-ASSOCIATE-RQ has arrived whole. With DICOM TLS the
handshake ran inside the server's single accept loop, so one silent socket stopped the listener.

:class:`NodeServer` (the server :class:`node.admission.NodeAE` makes) changes that, through the
hooks pynetdicom and :mod:`socketserver` document:

- ``verify_request`` (in the accept loop, before anything is read): the address part of the
  allowlist and the per-address connection cap; a refused connection is closed at once.
- ``get_request`` accepts without the TLS handshake; ``process_request_thread`` (the connection's
  own thread) does it, so a slow TLS client costs one thread, never the listener.
- the accepted socket (plain, or the context's ``sslsocket_class`` for TLS) feeds every byte the
  upper layer reads into a :class:`PduMeter`, which follows the PDU stream: where each PDU and each
  DIMSE message starts and ends, and how long a PDU says it is.
- a watchdog thread checks absolute deadlines that bytes trickled in do not extend: the TLS
  handshake and the A-ASSOCIATE-RQ within ``association_request_timeout`` of the connect, each PDU
  within ``pdu_timeout`` of its first byte, each DIMSE message (a C-STORE with its data set) within
  ``store_timeout`` of its first fragment. A connection past one is shut down under the upper layer,
  which sees the transport close and ends the association.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from config.settings import Settings

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
MAX_CONTROL_PDU = 1024 * 1024
"""Largest PDU other than P-DATA-TF accepted (an A-ASSOCIATE-RQ with every context is ~100 kB)."""
WATCH_INTERVAL = 0.2
"""Seconds between two checks of the deadlines: how late past one a connection may be dropped."""

Refused = Callable[[str, str, str], None]
"""Called with (event, address, reason) for each connection refused or dropped (the audit trail)."""


class PduRefused(ConnectionAbortedError):
    """A PDU the node will not read; an OSError, so the upper layer treats it as a closed
    connection and ends the association."""


@dataclass
class Limits:
    association_request_timeout: float
    pdu_timeout: float
    store_timeout: float
    max_pdu: int
    max_per_address: int

    @classmethod
    def from_settings(cls, settings: Settings) -> "Limits":
        return cls(
            association_request_timeout=settings.association_request_timeout,
            pdu_timeout=settings.pdu_timeout,
            store_timeout=settings.store_timeout,
            max_pdu=settings.max_pdu,
            max_per_address=settings.max_associations_per_address,
        )


class PduMeter:
    """Follows the PDU stream of one connection as the upper layer reads it (PS3.8 9.3): the
    6-byte PDU header (type, reserved, length), and inside P-DATA-TF the PDV items (length, context,
    message control header), without keeping any of the bytes."""

    IDLE, COMMAND, COMMAND_DONE, DATA = range(4)

    def __init__(self, max_pdu: int) -> None:
        self.max_pdu = max_pdu
        self.lock = threading.Lock()
        self.associate_requested = False
        self.pdu_started: float | None = None
        self.message_started: float | None = None
        self._message = self.IDLE
        self._header = bytearray()
        self._pdu_type = 0
        self._pdu_left = 0
        self._pdv_header = bytearray()
        self._pdv_left = 0

    @property
    def message_in_progress(self) -> bool:
        """A DIMSE message has begun and its last fragment has not arrived (the wait between a
        command and its data set counts only once the data set starts)."""
        return self._message in (self.COMMAND, self.DATA)

    def feed(self, data: bytes, now: float) -> None:
        """Account for `data`, the next bytes of the stream; raises :class:`PduRefused` for a PDU
        longer than the node accepts."""
        view = memoryview(data)
        with self.lock:
            while view:
                if self._pdu_left == 0:
                    view = self._read_header(view, now)
                else:
                    view = self._read_body(view)

    def _read_header(self, view: memoryview, now: float) -> memoryview:
        if not self._header:
            self.pdu_started = now
        take = 6 - len(self._header)
        self._header += view[:take]
        view = view[take:]
        if len(self._header) < 6:
            return view
        self._pdu_type, _, length = struct.unpack(">BBL", self._header)
        self._header.clear()
        limit = (self.max_pdu + 6 if self.max_pdu else None) if self._pdu_type == P_DATA_TF else MAX_CONTROL_PDU
        if limit is not None and length > limit:
            raise PduRefused(
                f"a PDU of type 0x{self._pdu_type:02X} declares {length} bytes, more than the {limit} accepted"
                + (" (PLEURA_MAX_PDU)" if self._pdu_type == P_DATA_TF else "")
            )
        self._pdu_left = length
        if length == 0:
            self._pdu_done()
        return view

    def _read_body(self, view: memoryview) -> memoryview:
        take = min(len(view), self._pdu_left)
        if self._pdu_type == P_DATA_TF:
            self._read_pdvs(view[:take])
        self._pdu_left -= take
        if self._pdu_left == 0:
            self._pdu_done()
        return view[take:]

    def _read_pdvs(self, view: memoryview) -> None:
        while view:
            if self._pdv_left:
                skip = min(len(view), self._pdv_left)
                self._pdv_left -= skip
                view = view[skip:]
                continue
            take = 6 - len(self._pdv_header)
            self._pdv_header += view[:take]
            view = view[take:]
            if len(self._pdv_header) == 6:
                length, _, control = struct.unpack(">LBB", self._pdv_header)
                self._pdv_header.clear()
                self._pdv_left = max(length - 2, 0)
                self._fragment(is_command=bool(control & 1), last=bool(control & 2))

    def _fragment(self, is_command: bool, last: bool) -> None:
        if is_command:
            if self._message in (self.IDLE, self.COMMAND_DONE):
                self.message_started = self.pdu_started
            self._message = self.COMMAND_DONE if last else self.COMMAND
        else:
            if self._message == self.IDLE:
                self.message_started = self.pdu_started
            self._message = self.IDLE if last else self.DATA

    def _pdu_done(self) -> None:
        if self._pdu_type == A_ASSOCIATE_RQ:
            self.associate_requested = True
        self.pdu_started = None


class MeteredSocket(socket.socket):
    """The accepted TCP socket, feeding what the upper layer reads into its meter."""

    meter: PduMeter | None = None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:  # type: ignore[override]
        data = super().recv(bufsize, flags)
        if self.meter is not None and data:
            self.meter.feed(data, time.monotonic())
        return data


class MeteredSSLSocket(ssl.SSLSocket):
    """The same for DICOM TLS: what is metered is the decrypted stream (``sslsocket_class``)."""

    meter: PduMeter | None = None

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        data = super().recv(buflen, flags)
        if self.meter is not None and data:
            self.meter.feed(data, time.monotonic())
        return data


@dataclass
class Connection:
    """One accepted connection, from accept to close."""

    address: str
    opened: float
    sock: socket.socket
    meter: PduMeter
    assoc: Association | None = None
    started: bool = False
    dropped: str | None = None
    closed: bool = field(default=False)

    def overdue(self, limits: Limits, now: float) -> str | None:
        """Why this connection is past a deadline, or None."""
        meter = self.meter
        if not meter.associate_requested and now > self.opened + limits.association_request_timeout:
            return (
                "no complete association request (and TLS handshake) within PLEURA_ASSOCIATION_REQUEST_TIMEOUT "
                f"({limits.association_request_timeout:g} s) of the connect"
            )
        pdu_started = meter.pdu_started
        if pdu_started is not None and now > pdu_started + limits.pdu_timeout:
            return f"a PDU not complete within PLEURA_PDU_TIMEOUT ({limits.pdu_timeout:g} s) of its first byte"
        message_started = meter.message_started
        if meter.message_in_progress and message_started is not None and now > message_started + limits.store_timeout:
            return (
                f"a DIMSE message (C-STORE) not complete within PLEURA_STORE_TIMEOUT ({limits.store_timeout:g} s) "
                "of its first fragment"
            )
        return None

    def ended(self) -> bool:
        return self.closed or (self.started and self.assoc is not None and not self.assoc.is_alive())

    def shut(self) -> None:
        """Shut the transport under the upper layer (from another thread): a blocked read returns
        and the association sees the connection closed. The base class's shutdown, so that a TLS
        socket's state is left to the thread that uses it."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass


class ConnectionGuard:
    """The open connections, their per-address count and their deadlines (checked by a thread)."""

    def __init__(
        self, limits: Limits, address_allowed: Callable[[str], bool], on_refused: Refused | None = None
    ) -> None:
        self.limits = limits
        self.address_allowed = address_allowed
        self.on_refused = on_refused or (lambda event, address, reason: None)
        self._lock = threading.Lock()
        self._connections: dict[int, Connection] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pleura-connection-guard", daemon=True)
        self._thread.start()

    def admit(self, sock: socket.socket, address: str) -> Connection | None:
        """Register a new connection, or None when it must be closed at once (the reason logged
        and passed to ``on_refused``)."""
        reason = None
        if not self.address_allowed(address):
            reason = "address not in any allowed caller's hosts (PLEURA_ALLOWED_CALLERS)"
        with self._lock:
            self._forget_ended()
            if reason is None and self.limits.max_per_address:
                held = sum(1 for c in self._connections.values() if c.address == address)
                if held >= self.limits.max_per_address:
                    reason = f"{held} connections already open from this address (PLEURA_MAX_ASSOCIATIONS_PER_ADDRESS)"
            if reason is None:
                connection = Connection(address, time.monotonic(), sock, PduMeter(self.limits.max_pdu))
                self._connections[id(sock)] = connection
                return connection
        log.warning("refused a connection from %s: %s", address, reason)
        self.on_refused("connection-refused", address, reason)
        return None

    def connection(self, sock: socket.socket) -> Connection | None:
        with self._lock:
            return self._connections.get(id(sock))

    def close(self, connection: Connection) -> None:
        connection.closed = True
        with self._lock:
            self._connections.pop(id(connection.sock), None)

    def rekey(self, connection: Connection, old: socket.socket, new: socket.socket) -> None:
        """The connection's socket is now `new` (wrapped for TLS)."""
        with self._lock:
            self._connections.pop(id(old), None)
            connection.sock = new
            self._connections[id(new)] = connection

    def drop_if_late(self, connection: Connection, now: float) -> bool:
        """Mark `connection` dropped for the deadline it passed by `now`, unless it is marked
        already (by the watchdog); True when this call marked it, which then reports it."""
        with self._lock:
            why = None if connection.dropped is not None else connection.overdue(self.limits, now)
            if why is None:
                return False
            connection.dropped = why
        self.on_refused("connection-dropped", connection.address, why)
        return True

    @property
    def open_connections(self) -> int:
        with self._lock:
            self._forget_ended()
            return len(self._connections)

    def _forget_ended(self) -> None:
        for key in [key for key, c in self._connections.items() if c.ended()]:
            del self._connections[key]

    def check(self, now: float | None = None) -> None:
        """Drop every connection past a deadline."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._forget_ended()
            late = [(c, why) for c in self._connections.values() if c.dropped is None and (why := c.overdue(self.limits, now))]
            for connection, why in late:
                connection.dropped = why
        for connection, why in late:
            log.warning("dropped the connection from %s: %s", connection.address, why)
            self.on_refused("connection-dropped", connection.address, why)
            connection.shut()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            try:
                self.check()
            except Exception:  # the watchdog must outlive any one connection's oddity
                log.exception("connection guard check failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class NodeRequestHandler(RequestHandler):
    """pynetdicom's handler, which also tells the guard which association runs the connection."""

    server: "NodeServer"

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        connection = self.server.guard.connection(self.request)
        if connection is not None:
            connection.assoc = assoc
        return assoc

    def handle(self) -> None:
        super().handle()  # starts the association's thread; from now on its end is the connection's
        connection = self.server.guard.connection(self.request)
        if connection is not None:
            connection.started = True


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the node's connection guard (see the module docstring)."""

    guard: ConnectionGuard

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        self.guard = guard
        kwargs.setdefault("request_handler", NodeRequestHandler)
        super().__init__(*args, **kwargs)
        if self.ssl_context is not None:
            self.ssl_context.sslsocket_class = MeteredSSLSocket

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept, without the TLS handshake (it runs in the connection's own thread)."""
        listener = self.socket
        accepted, address = listener.accept()
        sock = MeteredSocket(listener.family, listener.type, listener.proto, fileno=accepted.detach())
        sock.setblocking(True)  # as socket.accept() leaves it: pynetdicom reads with select + blocking recv
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """In the accept loop, before anything is read: the address allowlist and the per-address
        cap. A refused connection is closed by socketserver."""
        return self.guard.admit(request, str(client_address[0])) is not None

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        connection = self.guard.connection(request)
        try:
            if connection is not None:
                if self.ssl_context is not None:
                    request = self._handshake(connection, request)
                    if request is None:
                        return
                connection.sock.meter = connection.meter  # type: ignore[attr-defined]
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
            if connection is not None:
                self.guard.close(connection)

    def _handshake(self, connection: Connection, raw: socket.socket) -> ssl.SSLSocket | None:
        """The TLS handshake within the association request deadline (the watchdog shuts the socket
        when it passes; the timeout bounds each wait as well)."""
        context = self.ssl_context
        assert context is not None
        wrapped = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        self.guard.rekey(connection, raw, wrapped)
        try:
            wrapped.settimeout(max(0.1, connection.opened + self.guard.limits.association_request_timeout - time.monotonic()))
            wrapped.do_handshake()
            wrapped.settimeout(None)
        except (OSError, ValueError) as exc:
            # The handshake's own timeout ends at the deadline too, and may come first (a busy
            # watchdog): that is the deadline's drop, reported once, as the watchdog reports it.
            self.guard.drop_if_late(connection, time.monotonic() + WATCH_INTERVAL)
            reason = connection.dropped or f"TLS handshake failed: {exc}"
            log.warning("closed the connection from %s: %s", connection.address, reason)
            if connection.dropped is None:
                self.guard.on_refused("connection-refused", connection.address, reason)
            self.shutdown_request(wrapped)
            self.guard.close(connection)
            return None
        return wrapped

    def shutdown(self) -> None:
        super().shutdown()
        self.guard.stop()
