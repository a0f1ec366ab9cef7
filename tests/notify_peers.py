"""Real receivers on loopback for the notification tests: an HL7 MLLP listener (python-hl7's
asyncio MLLP server, answering each message with an ACK) and an HTTP webhook receiver."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hl7
import hl7.mllp

from dicom_peers import LOOPBACK, free_port


class MllpListener:
    """Receives HL7 messages over MLLP; `messages` holds them parsed (hl7.Message).

    `ack_code` is what it answers (AA accepts; AE or AR refuse), after the codes of `ack_codes`,
    one per message, in turn; `ack_text` goes in MSA-3 and `error_text` in an ERR segment (ERR-3
    an HL7 error code, ERR-8 the text) of every refusal; `ack_control_id`, when given, replaces
    MSA-2 (the acknowledged message's control ID), as a confused receiver would. With `tls` (a
    server-side SSL context) it speaks MLLP inside TLS only."""

    def __init__(
        self,
        port: int | None = None,
        ack_code: str = "AA",
        ack_control_id: str | None = None,
        tls: ssl.SSLContext | None = None,
        *,
        ack_codes: list[str] | None = None,
        ack_text: str | None = None,
        error_text: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.tls = tls
        self.ack_code = ack_code
        self.ack_codes = list(ack_codes or [])
        self.ack_text = ack_text
        self.error_text = error_text
        self.ack_control_id = ack_control_id
        self.messages: list[hl7.Message] = []
        self.raw: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mllp-listener", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the MLLP listener did not start")

    async def _handle(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.raw.append(str(message))
                self.messages.append(message)
                code = self.ack_codes.pop(0) if self.ack_codes else self.ack_code
                ack = message.create_ack(ack_code=code)
                if self.ack_control_id is not None:
                    ack.segment("MSA")[2] = self.ack_control_id
                answer = str(ack)
                if code != "AA" and (self.ack_text or self.error_text):
                    segments = answer.rstrip("\r").split("\r")
                    msa = str(ack.segment("MSA")).split("|")[:3]
                    segments = [s for s in segments if not s.startswith("MSA")]
                    segments.append("|".join([*msa, self.ack_text or ""]))
                    if self.error_text:
                        segments.append(f"ERR|||207^Application internal error^HL70357|E||||{self.error_text}")
                    answer = "\r".join(segments)
                writer.writemessage(answer)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = await hl7.mllp.start_hl7_server(self._handle, host=LOOPBACK, port=self.port, ssl=self.tls)
            self._ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            await self._server.wait_closed()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class WebhookReceiver:
    """An HTTP server that records every POST (headers and JSON body); it answers `statuses` in
    turn (then 200), so a test can make the first attempts fail."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.port = free_port()
        self.requests: list[dict] = []
        self.statuses = list(statuses or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "raw": body,
                                          "json": json.loads(body)})
                code = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok" if code < 300 else b"try later")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((LOOPBACK, self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/pleura"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
