"""Running a request: its sampler over every prompt, each choice's output as it comes, and the
outcome recorded in the metrics.

Endpoints differ only in how they build the prompt (server/formats.py) and how they shape the
output; a request is checked (server/requests.py), runs here, and is served as JSON or SSE
(server/transport.py).
"""

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from samplers import ChoiceDelta, Spend, TokenLogprob, merge_streams
from server import protocol as p
from server.errors import APIError, from_exception
from server.metrics import RequestMetrics
from server.requests import check_request, resolve_sampler
from server.state import EngineState

# A distilled model (a --distilled adapter) decodes with `direct`; metrics and usage name it so.
DISTILLED = "distilled"


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
        prompt_logprobs: int | None = None,
    ):
        """`prompt_logprobs`: score each prompt's tokens too, with this many alternatives (for the
        response's prompt_logprobs or an echo's logprobs)."""
        self.sampler, self.params, self.adapter, self.ignored_fields = resolve_sampler(state, body)
        self.label = DISTILLED if self.adapter else self.sampler.name
        self.metrics = RequestMetrics(self.adapter or state.served_name, self.label)
        self.spend = Spend()
        self.request_id = request_id
        self.model_name = body.model
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.ticket = None
        self.engine_rank = None  # the data-parallel engine pinned to the run, once it starts
        self.finished = False
        self.prompt_alternatives = prompt_logprobs
        self.prompt_logprobs: list[list[TokenLogprob]] | None = None  # per prompt, from its second token
        try:
            self.model, self.prompts, self.decode, self.timeout = check_request(
                state, body, self.sampler, self.params, self.adapter, prompts, max_tokens, logprobs,
                scores_prompts=prompt_logprobs is not None)
            self.deadline = asyncio.get_running_loop().time() + self.timeout
            self.ticket = state.gates[self.sampler.name].admit()
        except Exception as exc:
            self.finish(exc)
            raise
        n = self.decode.n
        self.choices = [ChoiceState(i * n + j, ids) for i, ids in enumerate(self.prompts) for j in range(n)]

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Every choice's deltas as they come, with indices numbered across prompts."""
        await self.ticket.wait()
        self.engine_rank = self.model.pin_engine()
        self.decode = dataclasses.replace(self.decode, scheduling=dataclasses.replace(
            self.decode.scheduling, engine_rank=self.engine_rank))
        if self.prompt_alternatives is not None:
            self.prompt_logprobs = [
                await self.model.score(ids, 1, f"{self.request_id}-prompt-{i}", self.spend, self.prompt_alternatives,
                                       self.decode.scheduling)
                for i, ids in enumerate(self.prompts)]
        if self.decode.max_tokens == 0:  # nothing to sample: each choice ends at once
            for choice in self.choices:
                delta = ChoiceDelta(choice.index, [], "", finish_reason="length")
                choice.add(delta)
                yield delta
            return
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
        if self.engine_rank is not None:
            self.model.unpin_engine(self.engine_rank)
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

