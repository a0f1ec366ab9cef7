"""Opening a listening port, and the one-line error when it cannot be opened.

The node listens on three ports (DICOM, the worklist API, health and metrics) and `pleura
worklist` on one. A port that another process holds, or an address this host does not have, is a
configuration problem, not a bug: :class:`ListenError` names the port, the settings that choose it
and what to do, and the command line prints it as one line (exit 2).
"""

from __future__ import annotations

import errno
import socket

from config.errors import PleuraError


class ListenError(PleuraError, OSError):
    """A port cannot be listened on; the message names it, its settings and the fix."""


def listen_error(what: str, host: str, port: int, settings_hint: str, exc: OSError) -> ListenError:
    """The error for ``exc``, raised while ``what`` tried to listen on ``host:port``."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        why = (f"{where} is already in use (another Pleura process, or another service?): stop it, "
               f"or choose another port with {settings_hint}")
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = f"{host} is not an address of this host: choose another with {settings_hint}"
    elif exc.errno == errno.EACCES:
        why = f"port {port} needs privileges this process lacks: choose a port above 1023 with {settings_hint}"
    else:
        why = f"{where}: {exc.strerror or exc} (check {settings_hint})"
    return ListenError(f"{what} cannot listen: {why}")


def bind_socket(what: str, host: str, port: int, settings_hint: str) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not listening yet), or :class:`ListenError`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and socketserver do
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise listen_error(what, host, port, settings_hint, exc) from exc
    sock.set_inheritable(True)
    return sock
