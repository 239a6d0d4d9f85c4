"""Transport: a run served as one JSON body or as an SSE stream with keep-alives, within its
deadline, aborted when the client leaves."""

import asyncio
import json
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from samplers import ChoiceDelta
from server.requests import IGNORED_FIELDS_HEADER
from server.serving import Run

# A blank line: to SSE an empty event, which every client skips. Not a ": comment" line: vLLM's
# load generator strips each network chunk before parsing, so a comment arriving alone loses its
# blank-line terminator, swallows the events after it, and the request counts as failed.
HEARTBEAT = "\n"
HEARTBEAT_S = 5.0


class Format:
    """How an endpoint turns a run into response objects (see `server.formats`)."""

    def opening(self, run: Run) -> list[BaseModel]:
        return []

    def chunks(self, run: Run, delta: ChoiceDelta) -> list[BaseModel]:
        raise NotImplementedError

    def usage_chunk(self, run: Run) -> BaseModel:
        raise NotImplementedError

    def final(self, run: Run) -> BaseModel:
        raise NotImplementedError


class RunStream(StreamingResponse):
    """An SSE response that finishes its run even when the client leaves before the stream starts
    (Starlette then never starts the body generator, whose own cleanup would not run)."""

    def __init__(self, run: Run, fmt: Format):
        super().__init__(_sse(run, fmt), media_type="text/event-stream", headers=_headers(run))
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.finish(asyncio.CancelledError())  # a no-op if the stream finished it


async def respond(run: Run, http_request: Request, stream: bool, fmt: Format) -> Response:
    """Serve a run as an SSE stream or as one JSON body, within the run's deadline."""
    if stream:
        return RunStream(run, fmt)

    async def collect() -> BaseModel:
        async with aclosing(run.deltas()) as deltas:
            async for _ in deltas:
                pass
        return fmt.final(run)

    task = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(_disconnected(http_request))
    try:
        await asyncio.wait({task, watcher}, timeout=run.remaining_s(), return_when=asyncio.FIRST_COMPLETED)
        client_left = watcher.done()
    finally:
        watcher.cancel()
    if not task.done():  # cancelling aborts every engine request of the run
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if client_left:
            run.finish(asyncio.CancelledError())
            return Response(status_code=499)
        error = run.timed_out()
        run.finish(error)
        raise error
    if (exc := task.exception()) is not None:
        error = run.failure(exc)
        run.finish(error)
        raise error from None
    run.finish(None)
    return JSONResponse(task.result().model_dump(mode="json"), headers=_headers(run))


def _headers(run: Run) -> dict[str, str]:
    """The request's ignored fields, if any, named in a header of the response; percent-encoded
    where a name is not plain ASCII letters, digits and '_.-~', since a header is latin-1 text and
    the list is comma-separated."""
    if not run.ignored_fields:
        return {}
    return {IGNORED_FIELDS_HEADER: ", ".join(urllib.parse.quote(name, safe="") for name in run.ignored_fields)}


async def _disconnected(http_request: Request) -> None:
    # FastAPI has read the body already, so the only message left to receive is the disconnect.
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def _sse(run: Run, fmt: Format) -> AsyncIterator[str]:
    error: BaseException | None = None
    try:
        for chunk in fmt.opening(run):
            yield _event(chunk)
        async with aclosing(_paced(run)) as deltas:
            async for delta in deltas:
                if delta is None:
                    yield HEARTBEAT
                    continue
                for chunk in fmt.chunks(run, delta):
                    yield _event(chunk)
        if run.include_usage:
            yield _event(fmt.usage_chunk(run))
    except asyncio.CancelledError as exc:  # the client went away: the engine requests are aborted
        error = exc
        raise
    except Exception as exc:
        error = run.failure(exc)
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        run.finish(error)
    yield "data: [DONE]\n\n"


async def _paced(run: Run) -> AsyncIterator[ChoiceDelta | None]:
    """The run's deltas, with a None whenever HEARTBEAT_S pass without one, until its deadline.

    Samplers that decide nothing until their chains finish would otherwise leave a stream silent
    for minutes, and proxies and clients drop silent connections.
    """
    stream = run.deltas()
    iterator = aiter(stream)
    pending = asyncio.ensure_future(anext(iterator))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=min(HEARTBEAT_S, max(run.remaining_s(), 0)))
            if not done:
                if run.remaining_s() <= 0:
                    raise run.timed_out()
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(iterator))
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await stream.aclose()


def _event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"

