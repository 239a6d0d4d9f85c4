"""The serving layer: an OpenAI request -> a sampler run -> an OpenAI response or SSE stream.

Endpoints differ only in how they build the prompt and how they format choices; both run through
`Run`, which resolves the sampler, validates the request against the model and the sampler,
drives the sampler for every prompt, and records metrics.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from samplers import REGISTRY, ChoiceDelta, DecodeParams, Sampler, Spend, TokenLogprob, merge_streams
from server import protocol as p
from server.admission import QUEUE_FACTOR, Gate, Limits
from server.errors import APIError, bad_request, from_exception
from server.metrics import RequestMetrics

logger = logging.getLogger(__name__)

DEFAULT_SAMPLER = "direct"
# A distilled model (a --distilled adapter) decodes with `direct`; metrics and usage name it so.
DISTILLED = "distilled"
# A blank line: to SSE an empty event, which every client skips. Not a ": comment" line: vLLM's
# load generator strips each network chunk before parsing, so a comment arriving alone loses its
# blank-line terminator, swallows the events after it, and the request counts as failed.
HEARTBEAT = "\n"
HEARTBEAT_S = 5.0


class EngineState:
    """The model being served, whether its engine can take requests, and the admission gates."""

    def __init__(self, served_name: str, root: str, limits: Limits = Limits(),
                 adapters: dict[str, str] | None = None):
        self.served_name = served_name
        self.root = root
        self.adapters = adapters or {}  # distilled model name -> its PEFT adapter directory
        self.model = None  # samplers.vllm_engine.VllmModel once loaded
        self.created = 0
        self.limits = limits
        self.gates = {}
        for name, sampler in REGISTRY.items():
            concurrent = limits.max_concurrent.get(name, sampler.default_max_concurrent)
            queued = limits.max_queued.get(name, QUEUE_FACTOR * concurrent)
            self.gates[name] = Gate(served_name, name, concurrent, queued)

    def ready_model(self):
        if self.model is None:
            raise APIError(503, "The engine is still loading; retry when GET /health answers 200.")
        if self.model.errored:
            raise APIError(503, "The engine has stopped; the server must be restarted.")
        return self.model


@dataclass
class ChoiceState:
    """Everything one choice has produced so far."""

    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.token_ids.extend(delta.token_ids)
        self.text += delta.text
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason


def resolve_sampler(state: EngineState, body: p.SamplingFields) -> tuple[Sampler, BaseModel, str | None]:
    """Pick the sampler named by `sampler` or a ':SAMPLER' model suffix, validate its fields, and
    say which distilled model's adapter to decode with, if the request names one."""
    names = [state.served_name, *state.adapters]
    base, suffix = body.model, None
    if base not in names:
        base, _, suffix = body.model.rpartition(":")
        if base not in names:
            raise APIError(404, f"The model '{body.model}' does not exist; "
                           f"this server serves {', '.join(map(repr, names))}.", param="model")
    adapter = base if base in state.adapters else None
    if suffix and body.sampler and suffix != body.sampler:
        raise bad_request(f"The model suffix ':{suffix}' and sampler '{body.sampler}' disagree.",
                          param="sampler")
    name = suffix or body.sampler or DEFAULT_SAMPLER
    if adapter and name != DEFAULT_SAMPLER:
        raise bad_request(f"'{adapter}' is a distilled model, which decodes directly: its sampler can "
                          f"only be '{DEFAULT_SAMPLER}'.", param="sampler")
    sampler = REGISTRY.get(name)
    if sampler is None:
        raise bad_request(f"Unknown sampler '{name}'. Valid samplers: {', '.join(sorted(REGISTRY))}.",
                          param="sampler")
    try:
        params = sampler.Params.model_validate(body.model_extra or {})
    except ValidationError as exc:
        raise _sampler_param_error(sampler, exc) from None
    return sampler, params, adapter


def _sampler_param_error(sampler: Sampler, exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        own = ", ".join(sampler.Params.model_fields) or "none"
        return bad_request(
            f"Unknown parameter '{param}' for sampler '{sampler.name}'. Its own parameters: {own}; "
            f"other samplers: {', '.join(sorted(REGISTRY))} (GET /v1/samplers lists theirs).",
            param=param,
        )
    return bad_request(f"{param}: {first['msg']}", param=param)


class Run:
    """One request's sampler run over one or more prompts, with its metrics."""

    def __init__(
        self,
        state: EngineState,
        body: p.SamplingFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: int | None,
        request_id: str,
    ):
        self.sampler, self.params, self.adapter = resolve_sampler(state, body)
        self.label = DISTILLED if self.adapter else self.sampler.name
        self.metrics = RequestMetrics(self.adapter or state.served_name, self.label)
        self.spend = Spend()
        self.request_id = request_id
        self.model_name = body.model
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.ticket = None
        self.finished = False
        try:
            limits = state.limits
            self.timeout = body.request_timeout or limits.request_timeout
            if self.timeout > limits.max_request_timeout:
                raise bad_request(f"request_timeout may be at most {limits.max_request_timeout:g} s "
                                  "on this server.", param="request_timeout")
            self.deadline = asyncio.get_running_loop().time() + self.timeout
            self.model = state.ready_model()
            if not prompts:
                raise bad_request("The prompt list is empty.", param="prompt")
            self.prompts = [_checked_prompt(self.model, ids) for ids in prompts]
            longest = max(len(ids) for ids in self.prompts)
            room = self.model.max_model_len - longest
            if room < 1:
                raise bad_request(f"The prompt ({longest} tokens) leaves no room for output in the "
                                  f"model's context of {self.model.max_model_len} tokens.", param="prompt")
            if max_tokens is None:
                max_tokens = room
            if max_tokens > room:
                raise bad_request(
                    f"The prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds the "
                    f"model's context of {self.model.max_model_len} tokens.", param="max_tokens")
            self.decode = body.decode_params(max_tokens, logprobs, self.adapter)
            _check_decode(self.model, self.decode)
            self.sampler.check(self.model, self.decode, self.params)
            cost = sum(self.sampler.max_engine_tokens(len(ids), self.decode, self.params)
                       for ids in self.prompts)
            if cost > limits.max_request_cost:
                raise bad_request(
                    f"This request could cost up to {cost} engine tokens with sampler "
                    f"'{self.sampler.name}', over this server's cap of {limits.max_request_cost} per "
                    "request: lower max_tokens, n, the number of prompts or the sampler's parameters.")
            self.ticket = state.gates[self.sampler.name].admit()
        except Exception as exc:
            self.finish(exc)
            raise
        n = self.decode.n
        self.choices = [ChoiceState(i * n + j, ids) for i, ids in enumerate(self.prompts) for j in range(n)]

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Every choice's deltas as they come, with indices numbered across prompts."""
        await self.ticket.wait()
        n = self.decode.n
        streams = [
            self._offset(i * n, self.sampler.sample(self.model, ids, self.decode, self.params,
                                                    f"{self.request_id}-{i}", self.spend))
            for i, ids in enumerate(self.prompts)
        ]
        merged = streams[0] if len(streams) == 1 else merge_streams(streams)
        async with aclosing(merged) as stream:
            async for delta in stream:
                self.choices[delta.index].add(delta)
                self.metrics.output_tokens(len(delta.token_ids))
                yield delta

    @staticmethod
    async def _offset(offset: int, stream: AsyncIterator[ChoiceDelta]) -> AsyncIterator[ChoiceDelta]:
        async with aclosing(stream) as deltas:
            async for delta in deltas:
                delta.index += offset
                yield delta

    def usage(self) -> p.Usage:
        prompt = sum(len(ids) for ids in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        return p.Usage(prompt_tokens=prompt, completion_tokens=completion,
                       total_tokens=prompt + completion)

    def sampler_usage(self) -> p.SamplerUsage:
        return p.SamplerUsage(name=self.label, engine_tokens_generated=self.spend.generated,
                              engine_tokens_prefilled=self.spend.prefilled, engine_tokens_scored=self.spend.scored,
                              events=self.spend.events, details=self.spend.details, proposal=self.spend.proposal)

    def failure(self, exc: Exception) -> APIError:
        """The client-facing error for an exception raised while the run was going."""
        if self.model.errored:
            return APIError(503, "The engine has stopped; the server must be restarted.")
        return from_exception(exc)

    def remaining_s(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def timed_out(self) -> APIError:
        # Retrying would only time out again, so the OpenAI SDKs are told not to.
        return APIError(504, f"The request did not finish within its deadline of {self.timeout:g} s "
                        "(request_timeout); its engine work was stopped.", param="request_timeout",
                        headers={"x-should-retry": "false"})

    def finish(self, exc: BaseException | None) -> None:
        """Record the outcome and give up the request's slot; only the first call counts."""
        if self.finished:
            return
        self.finished = True
        if self.ticket is not None:
            self.ticket.release()
        status = exc.status if isinstance(exc, APIError) else None
        if exc is None:
            outcome = "success"
        elif isinstance(exc, asyncio.CancelledError):
            outcome = "aborted"
        elif status in OUTCOMES:
            outcome = OUTCOMES[status]
        elif status is not None and status < 500:
            outcome = "invalid"
        else:
            outcome = "error"
        self.metrics.finish(outcome, self.spend)


OUTCOMES = {429: "rejected", 504: "timeout"}


def _check_decode(model, decode: DecodeParams) -> None:
    """Combinations of fields that no sampler can serve (the engine would refuse them)."""
    if decode.min_tokens > decode.max_tokens:
        raise bad_request(f"min_tokens ({decode.min_tokens}) exceeds max_tokens ({decode.max_tokens}).",
                          param="min_tokens")
    _check_in_vocabulary(model, decode.stop_token_ids, "stop_token_ids", param="stop_token_ids")
    if decode.temperature == 0 and decode.n > 1:
        raise bad_request("Greedy decoding (temperature 0) gives one completion: n must be 1.", param="n")


def _checked_prompt(model, ids: list[int]) -> list[int]:
    if not ids:
        raise bad_request("The prompt is empty.", param="prompt")
    _check_in_vocabulary(model, ids, "Prompt token ids", param="prompt")
    return ids


def _check_in_vocabulary(model, token_ids, what: str, param: str) -> None:
    if any(not 0 <= t < model.vocab_size for t in token_ids):
        raise bad_request(f"{what} must lie in [0, {model.vocab_size}).", param=param)


class Format:
    """How an endpoint turns a run into response objects (see `server.formats`)."""

    def opening(self, run: "Run") -> list[BaseModel]:
        return []

    def chunks(self, run: "Run", delta: ChoiceDelta) -> list[BaseModel]:
        raise NotImplementedError

    def usage_chunk(self, run: "Run") -> BaseModel:
        raise NotImplementedError

    def final(self, run: "Run") -> BaseModel:
        raise NotImplementedError


class RunStream(StreamingResponse):
    """An SSE response that finishes its run even when the client leaves before the stream starts
    (Starlette then never starts the body generator, whose own cleanup would not run)."""

    def __init__(self, run: Run, fmt: Format):
        super().__init__(_sse(run, fmt), media_type="text/event-stream")
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
    return JSONResponse(task.result().model_dump(mode="json"))


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
