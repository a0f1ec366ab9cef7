"""Request bodies are bounded before anything reads them, and validation errors never echo input.

FastAPI reads and parses a body before a route's dependencies run, authentication included, so
without a bound anyone who can reach the port can make the process hold a body of any size (and
the 422 answer used to send it all back). :class:`BodyLimit` is plain ASGI middleware in front of
every route: a declared ``Content-Length`` above the limit is answered 413 before a byte of the
body is read; a body without one (chunked) is counted as it arrives and answered 413 as soon as
it passes the limit, without reading the rest. The limit is ``api_max_body_bytes`` for every route
except the correction upload, which carries a PNG and has ``api_max_upload_bytes``, and STOW-RS
(``POST /dicomweb/studies``), which carries studies and has ``stow_max_request_bytes`` (its parts
have ``stow_max_part_bytes`` each, counted by the route itself).

Hand-written rather than Starlette's ``RequestBodyLimitMiddleware``: that one appeared only in
Starlette 1.0 (FastAPI 0.165), newer than the versions this project supports, keeps one limit per
application or route fixed at import, and answers without naming the setting to change.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UPLOAD_PATHS = (re.compile(r"^/api/studies/[^/]+/images/[0-9]+/correction$"),)
"""Routes that take an upload (the corrected outline PNG) and so the larger limit."""
STOW_PATHS = (re.compile(r"^/dicomweb/studies/?$"),)
"""The STOW-RS route: whole studies, read to disk as they arrive, up to their own limit."""


class BodyTooLarge(HTTPException):
    """Raised from inside the body stream. FastAPI lets an HTTPException through its body parsing
    and Starlette's exception middleware answers it; should it arrive here instead (wrapped by a
    task group), :class:`BodyLimit` answers it itself."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(
            413,
            f"the request body is larger than {limit} bytes ({setting})",
            headers={"Connection": "close"},
        )


class BodyLimit:
    """ASGI middleware: at most `max_body_bytes` per request body (`max_upload_bytes` on the
    upload routes), counted as the body arrives."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, max_upload_bytes: int, max_stow_bytes: int | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.max_stow_bytes = max_stow_bytes if max_stow_bytes is not None else max_upload_bytes

    def limit_for(self, path: str) -> tuple[int, str]:
        if any(pattern.match(path) for pattern in UPLOAD_PATHS):
            return self.max_upload_bytes, "PLEURA_API_MAX_UPLOAD_BYTES"
        if any(pattern.match(path) for pattern in STOW_PATHS):
            return self.max_stow_bytes, "PLEURA_STOW_MAX_REQUEST_BYTES"
        return self.max_body_bytes, "PLEURA_API_MAX_BODY_BYTES"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                too_large = False  # the server's HTTP parser has already refused a malformed one
            if too_large:
                await _refuse(BodyTooLarge(limit, setting), scope, receive, send)
                return
        received = 0
        started = False

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        try:
            await self.app(scope, counting_receive, watching_send)
        except (BodyTooLarge, ExceptionGroup) as exc:
            error = _body_too_large(exc)
            if error is None or started:
                raise
            await _refuse(error, scope, receive, send)


def _body_too_large(exc: BaseException) -> BodyTooLarge | None:
    if isinstance(exc, BaseExceptionGroup):
        matched, _ = exc.split(BodyTooLarge)
        while isinstance(matched, BaseExceptionGroup):
            matched = matched.exceptions[0]
        return matched
    return exc if isinstance(exc, BodyTooLarge) else None


async def _refuse(error: BodyTooLarge, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse({"detail": error.detail}, error.status_code, headers=error.headers)
    await response(scope, receive, send)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with where and what is wrong, never the submitted value: FastAPI's own answer repeats
    the input, which may be a token, a patient's data, or 20 MB of base64."""
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type", "")}
              for error in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(errors)}, 422)


def install_limits(
    app: FastAPI, *, max_body_bytes: int, max_upload_bytes: int, max_stow_bytes: int | None = None
) -> None:
    """The body limit in front of every route and the 422 handler that does not echo input."""
    app.add_middleware(
        BodyLimit, max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes, max_stow_bytes=max_stow_bytes
    )
    app.add_exception_handler(RequestValidationError, validation_error)
