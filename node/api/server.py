"""Serves the worklist application with uvicorn in a thread, so `pleura node` can run it beside
the SCP (or `pleura worklist` on its own)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import uvicorn

from config.settings import Settings
from node.api.app import create_app
from node.ledger import Ledger
from node.listening import bind_socket

log = logging.getLogger(__name__)


class AppServer:
    """An ASGI application served by uvicorn in a daemon thread, with start() and stop()."""

    thread_name = "pleura-http"
    what = "the HTTP server"
    settings_hint = "the settings"
    """The settings that choose the address and port, named in a :class:`ListenError`."""

    def __init__(self, app: Any, host: str, port: int, *, log_level: str = "warning") -> None:
        self.host, self.port = host, port
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            log_config=None,  # uvicorn's loggers go through ours (text or JSON)
            access_log=False,  # URLs carry no patient data, but there is no need to log every poll
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; raises :class:`ListenError` when the port cannot be opened (in use, say).

        The socket is bound here, in the caller's thread, so that the reason reaches the caller
        (uvicorn, binding it in its own thread, would log it and end the thread)."""
        sock = bind_socket(self.what, self.host, self.port, self.settings_hint)
        self._thread = threading.Thread(target=self._server.run, args=([sock],), name=self.thread_name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"{self.what} on {self.host}:{self.port} stopped while starting (see the log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.what} did not start within {timeout:.0f} s")
            time.sleep(0.05)
        log.info("%s on %s", self.what, self.url)

    def serve(self) -> None:
        """Serve in this thread until interrupted (`pleura worklist`); :class:`ListenError` as start()."""
        self._server.run([bind_socket(self.what, self.host, self.port, self.settings_hint)])

    def stop(self) -> None:
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(15)
        self._thread = None


class WorklistServer(AppServer):
    thread_name = "pleura-worklist"
    what = "the worklist API"
    settings_hint = "PLEURA_API_PORT (PLEURA_API_HOST)"

    def __init__(
        self, settings: Settings, ledger: Ledger, *, host: str | None = None, port: int | None = None,
        log_level: str = "warning",
    ) -> None:
        self.settings = settings
        super().__init__(
            create_app(settings, ledger), host or settings.api_host, port if port is not None else settings.api_port,
            log_level=log_level,
        )
