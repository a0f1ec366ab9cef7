"""Server-sent events: the page hears of a change to the worklist at once instead of polling it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from node.api.auth import Principal, current_principal
from node.api.deps import get_ledger
from node.api.schemas import errors
from node.ledger import Ledger

router = APIRouter(prefix="/api/events", tags=["events"], responses=errors(401))

CHECK_SECONDS = 1.0  # how often the stream looks at the ledger
KEEPALIVE_SECONDS = 15.0  # a comment line, so proxies keep the connection
STREAM_SECONDS = 30.0
"""A stream ends after this long and the browser's EventSource reconnects (after ``retry``): a
stream never outlives the server's graceful shutdown or a session that ended by much."""


@router.get(
    "",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
    summary="A text/event-stream: event `worklist` whenever the worklist may have changed (no data about patients)",
)
async def events(
    request: Request, ledger: Ledger = Depends(get_ledger), principal: Principal = Depends(current_principal)
) -> StreamingResponse:
    async def stream() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        started = last_sent = time.monotonic()
        mark = None
        while time.monotonic() - started < STREAM_SECONDS:
            if await request.is_disconnected():
                return
            current = await run_in_threadpool(ledger.change_mark)
            if current != mark:
                yield "event: worklist\ndata: changed\n\n"
                mark, last_sent = current, time.monotonic()
            elif time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            await asyncio.sleep(CHECK_SECONDS)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
