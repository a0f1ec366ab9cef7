"""Real receivers on loopback for the notification tests: an HL7 MLLP listener (python-hl7's
asyncio MLLP server, answering each message with an ACK), an HTTP webhook receiver, and a small
FHIR server that validates what it receives with fhir.resources."""

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


class FhirServer:
    """A small FHIR R4 server for the EHR side: it takes transaction Bundles POSTed to its base URL
    and conditional updates in them (``PUT Type?identifier=system|value``), validates every resource
    with ``fhir.resources`` and checks every reference (an entry of the same Bundle, or a logical
    reference by identifier with its type) before it keeps anything; a Bundle that fails is answered
    400 with an OperationOutcome and its reasons kept in `errors`. With `client_id` it also is an
    OAuth2 token endpoint (client credentials, at `token_url`) and wants the token it issued.
    It answers `statuses` in turn first (then as above), so a test can make attempts fail."""

    def __init__(self, *, client_id: str | None = None, client_secret: str | None = None,
                 statuses: list[int] | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.client_id, self.client_secret = client_id, client_secret
        self.statuses = list(statuses or [])
        self.errors: list[str] = []
        self.bundles: list[dict] = []
        self.resources: dict[tuple[str, str], dict] = {}  # (type, "system|value") -> {"id", "version", "resource"}
        self.tokens: set[str] = set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/fhir+json" if "resourceType" in body else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/token":
                    self._answer(*server._token(self.headers.get("Authorization", ""), body))
                    return
                if server.client_id is not None and self.headers.get("Authorization", "")[7:] not in server.tokens:
                    self._answer(401, _outcome("no valid token"))
                    return
                if server.statuses:
                    self._answer(server.statuses.pop(0), _outcome("try again later"))
                    return
                self._answer(*server.transaction(body))

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((LOOPBACK, self.port), Handler)
        self.scheme = "http"
        if tls is not None:  # HTTPS only
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fhir-server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}/fhir"

    @property
    def token_url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}/token"

    def _token(self, authorization: str, body: bytes) -> tuple[int, dict]:
        import base64
        import secrets
        from urllib.parse import parse_qs

        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if authorization.startswith("Basic "):
            client_id, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if form.get("grant_type") != "client_credentials" or (client_id, secret) != (self.client_id, self.client_secret):
            return 401, {"error": "invalid_client"}
        token = secrets.token_urlsafe(16)
        self.tokens.add(token)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600}

    def transaction(self, body: bytes) -> tuple[int, dict]:
        from urllib.parse import unquote

        from fhir.resources.R4B.bundle import Bundle

        try:
            bundle = Bundle.model_validate_json(body)  # every resource in it validated by its own model
        except Exception as exc:
            return self._refuse(f"not a valid R4 Bundle: {exc}")
        raw = json.loads(body)
        if bundle.type != "transaction":
            return self._refuse(f"Bundle.type is {bundle.type}, not transaction")
        full_urls = [entry["fullUrl"] for entry in raw["entry"]]
        if len(set(full_urls)) != len(full_urls):
            return self._refuse("two entries share a fullUrl")
        problems = []
        for entry in raw["entry"]:
            resource, request = entry["resource"], entry["request"]
            kind, _, query = request["url"].partition("?identifier=")
            system, _, value = (unquote(part) for part in query.partition("|"))
            if request["method"] != "PUT" or kind != resource["resourceType"]:
                problems.append(f"{request['method']} {request['url']} is no conditional update of the resource")
            if {"system": system, "value": value} not in [{"system": i.get("system"), "value": i.get("value")}
                                                          for i in resource.get("identifier", [])]:
                problems.append(f"{request['url']}: the resource has no such identifier")
            for reference in _references(resource):
                if "reference" in reference and reference["reference"] not in full_urls:
                    problems.append(f"{kind}: reference {reference['reference']} is not in the Bundle")
                if "reference" not in reference and not (reference.get("type") and reference.get("identifier", {}).get("value")):
                    problems.append(f"{kind}: a logical reference without type or identifier: {reference}")
        if problems:
            return self._refuse("; ".join(problems))
        answers = []
        with self._lock:
            self.bundles.append(raw)
            for entry in raw["entry"]:
                kind, _, query = entry["request"]["url"].partition("?identifier=")
                key = (kind, unquote(query))
                kept = self.resources.get(key)
                created = kept is None
                kept = kept or {"id": f"{kind.lower()}-{len(self.resources) + 1}", "version": 0}
                kept.update(version=kept["version"] + 1, resource=entry["resource"] | {"id": kept["id"]})
                self.resources[key] = kept
                answers.append({"response": {"status": "201 Created" if created else "200 OK",
                                             "location": f"{kind}/{kept['id']}/_history/{kept['version']}"}})
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}

    def _refuse(self, why: str) -> tuple[int, dict]:
        self.errors.append(why)
        return 400, _outcome(why)

    def of_type(self, kind: str) -> list[dict]:
        """What the server holds of one resource type: each {"id", "version", "resource"}."""
        return [kept for (k, _), kept in self.resources.items() if k == kind]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def _outcome(why: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid", "diagnostics": why}]}


def _references(value: object):
    """Every Reference in a resource (a dict with "reference", or a logical one with "identifier"
    beside "type")."""
    if isinstance(value, dict):
        if "reference" in value or ("identifier" in value and "type" in value and isinstance(value["type"], str)):
            yield value
            return
        for item in value.values():
            yield from _references(item)
    elif isinstance(value, list):
        for item in value:
            yield from _references(item)
