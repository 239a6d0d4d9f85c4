"""The sampler plug-in interface, and the language-model operations samplers are built on.

A sampler turns one prompt into `n` streamed completions. It sees the model only through
`LanguageModel`, so that sampler code never imports vLLM and can be tested on any model that
implements the protocol.
"""

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one output token, with the most likely alternatives at its position."""

    token_id: int
    token: str
    logprob: float
    top: tuple["TokenLogprob", ...] = ()
    rank: int | None = None  # by log p in the vocabulary (1: the likeliest), where the engine reports it


@dataclass
class ChoiceDelta:
    """New output of one choice: the tokens added since the last delta of that choice.

    `finish_reason` is set on a choice's last delta: "stop" (EOS, stop string or stop token),
    "length" (max_tokens) or "abort".
    """

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(frozen=True)
class Scheduling:
    """When and where the engine runs a request's work; every engine request of one request
    carries the request's, a power sampler's many included."""

    priority: int = 0  # lower first, under vLLM's --scheduling-policy priority (else ignored)
    # With data parallelism, the engine that runs them all, so that they share its prefix cache;
    # None: vLLM balances each engine request on its own.
    engine_rank: int | None = None


@dataclass(frozen=True)
class DecodeParams:
    """What a request asks of decoding, independent of the sampler that serves it.

    `logprobs` is the number of alternatives to report per output token (None: no logprobs).
    `top_k` 0 and `top_p` 1 mean no truncation.
    """

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    adapter: str | None = None  # decode with this LoRA adapter of the model (a distilled model)
    scheduling: Scheduling = Scheduling()
    # Constraints and detokenization options that plain decoding passes to the engine (the power
    # samplers draw with their own decoding parameters, and the server refuses these for them).
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    structured_outputs: dict | None = None  # vLLM's StructuredOutputsParams, as keyword arguments
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True


@dataclass
class Spend:
    """What a sampler cost the engine, counted by the engine adapter as requests run.

    `generated`: tokens the engine decoded; `prefilled`: prompt tokens of decoding requests that
    missed the prefix cache (computed, not read from cached KV); `scored`: tokens run through the
    model only to read their log-probabilities (a full prefill each time: scoring skips the prefix
    cache). Plain decoding spends its output tokens plus one prefill of its prompt per choice not
    found in the cache. `events` counts sampler-specific happenings (proposals, acceptances, ...;
    exported to Prometheus); `details` holds derived figures for the response (an acceptance
    rate, ...); `proposal` says how a power sampler obtained its proposal densities.
    """

    generated: int = 0
    prefilled: int = 0
    scored: int = 0
    events: dict[str, int] = field(default_factory=dict)
    details: dict[str, float | list[float]] = field(default_factory=dict)
    proposal: str | None = None

    def count(self, event: str, times: int = 1) -> None:
        self.events[event] = self.events.get(event, 0) + times


class LanguageModel(Protocol):
    """The engine operations a sampler may use.

    `processed_logprobs`: whether the log-probabilities that `decode` reports are those of the
    distribution each token was drawn from (after temperature, top-k and top-p), rather than the
    model's own log p before them (vLLM's `raw_logprobs`, the default). `score` always gives the
    model's own log p, where `can_score` says it works. `max_logprobs` is the most alternatives a
    position may report. Every call records what it made the engine compute in `spend`.
    """

    processed_logprobs: bool
    can_score: bool
    vocab_size: int
    max_logprobs: int
    eos_token_ids: frozenset[int]  # the tokens that end a completion unless `ignore_eos`

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of the tokens, special tokens left out."""
        ...

    async def score(self, token_ids: list[int], start: int, request_id: str, spend: Spend,
                    alternatives: int = 0, scheduling: Scheduling = Scheduling()) -> list[TokenLogprob]:
        """log p(token_ids[i] | token_ids[:i]) under the model at temperature 1, for i >= start,
        each with the `alternatives` most likely tokens at its position (and its rank); `scheduling`
        as DecodeParams has it."""
        ...

    def decode(
        self, prompt_token_ids: list[int], params: DecodeParams, request_id: str, spend: Spend
    ) -> AsyncIterator[list[ChoiceDelta]]:
        """Stream `params.n` completions of the prompt, a batch of per-choice deltas at a time.

        Closing or cancelling the iterator aborts the engine request.
        """
        ...


class ChoiceStream:
    """The deltas of one choice whose tokens arrive a piece at a time: the text of each piece is
    what its tokens add to the whole's, a trailing partial character held back until the bytes that
    complete it arrive. `logprobs`: whether deltas carry each token's log p."""

    def __init__(self, model: "LanguageModel", index: int, logprobs: bool):
        self.model = model
        self.index = index
        self.logprobs = logprobs
        self.token_ids: list[int] = []
        self.text = ""

    def delta(self, token_ids: list[int], logprobs: list[float], finish_reason: str | None = None,
              stop_reason: int | str | None = None) -> ChoiceDelta:
        self.token_ids += token_ids
        text = self.model.detokenize(self.token_ids)
        if finish_reason is None and text.endswith("\ufffd"):
            new_text = ""
        else:
            new_text, self.text = text[len(self.text):], text
        return ChoiceDelta(
            index=self.index,
            token_ids=token_ids,
            text=new_text,
            logprobs=[TokenLogprob(t, self.model.detokenize([t]), lp) for t, lp in zip(token_ids, logprobs)]
            if self.logprobs else None,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
        )


class InvalidRequest(ValueError):
    """A request that cannot be served as asked; `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_power_request(sampler: str, decode: DecodeParams, truncation: str = "") -> None:
    """Refuse the decoding options that would change a power sampler's target p^alpha;
    `truncation` tells what the sampler offers instead of top_k and top_p."""
    if decode.temperature != 1.0:
        raise InvalidRequest(f"{sampler} targets p^power_alpha, where temperature has no role: "
                             "sharpen with power_alpha.", param="temperature")
    for option, untruncated in (("top_k", 0), ("top_p", 1.0)):
        if getattr(decode, option) != untruncated:
            raise InvalidRequest(f"{sampler} targets p^power_alpha, which {option} would truncate. "
                                 f"{truncation}".strip(), param=option)
    if decode.stop:
        raise InvalidRequest(f"{sampler} cannot cut at stop strings, which would change its target; "
                             "use stop_token_ids.", param="stop")
    for option in ("min_tokens", "presence_penalty", "frequency_penalty"):
        if getattr(decode, option):
            raise InvalidRequest(f"{sampler} does not take {option}.", param=option)
    if decode.repetition_penalty != 1.0:
        raise InvalidRequest(f"{sampler} does not take repetition_penalty.", param="repetition_penalty")
    if decode.logprobs:
        raise InvalidRequest(f"{sampler} reports each token's base log p, without alternatives: "
                             "ask for 0.", param="logprobs")


class NoParams(BaseModel):
    """A sampler that takes no parameters of its own."""

    model_config = ConfigDict(extra="forbid")


class Sampler(ABC):
    """One way of drawing completions. Subclasses register themselves in `samplers.REGISTRY`.

    `Params` is the pydantic model of the flat request fields this sampler owns; it must forbid
    extra fields so that a misspelt parameter is an error, not silently ignored.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    # How many of its requests the server runs at once unless told otherwise (--max-concurrent).
    # The engine batches plain requests well; a power request costs tens to hundreds of them.
    default_max_concurrent: ClassVar[int] = 256

    def check(self, model: LanguageModel, decode: DecodeParams, params: BaseModel) -> None:
        """Reject request combinations that make no sense for this sampler (raise InvalidRequest)."""

    def max_engine_tokens(self, prompt_length: int, decode: DecodeParams, params: BaseModel) -> int:
        """The most engine tokens (`Spend.generated` + `Spend.scored`) one prompt can cost; the
        server refuses requests above its cap (--max-request-cost). Plain decoding: its output.
        Prefills of decoding requests are left out: how many hit the prefix cache is not known
        beforehand."""
        return decode.n * decode.max_tokens

    @abstractmethod
    def sample(
        self,
        model: LanguageModel,
        prompt_token_ids: list[int],
        decode: DecodeParams,
        params: BaseModel,
        request_id: str,
        spend: Spend,
    ) -> AsyncIterator[ChoiceDelta]:
        """Stream the completions' deltas, recording the engine work in `spend` as it goes."""


@dataclass
class Completion:
    """One finished choice of a `decode` call: its tokens, each token's reported log-probability
    and, when alternatives were asked for, theirs (most likely first)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    top: list[tuple[TokenLogprob, ...]] = field(default_factory=list)

    @property
    def alternatives(self) -> list[list[float]]:
        """The log-probabilities of the alternatives at each position, most likely first."""
        return [[a.logprob for a in position] for position in self.top]

    @property
    def ended(self) -> bool:
        """Ended by EOS or a stop token (not cut at max_tokens)."""
        return self.finish_reason == "stop"


async def complete(model: LanguageModel, prompt_token_ids: list[int], params: DecodeParams,
                   request_id: str, spend: Spend) -> list[Completion]:
    """Run `decode` to the end and return its `params.n` completions, with logprobs if asked for."""
    completions = [Completion() for _ in range(params.n)]
    async with aclosing(model.decode(prompt_token_ids, params, request_id, spend)) as batches:
        async for batch in batches:
            for delta in batch:
                done = completions[delta.index]
                done.token_ids += delta.token_ids
                done.logprobs += [t.logprob for t in delta.logprobs or ()]
                done.top += [t.top for t in delta.logprobs or ()]
                if delta.finish_reason is not None:
                    done.finish_reason, done.stop_reason = delta.finish_reason, delta.stop_reason
    return completions


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator:
    """Interleave several async streams as their items arrive; closing this closes them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator) -> None:
        try:
            async with aclosing(stream) as items:
                async for item in items:
                    await queue.put(item)
            await queue.put(done)
        except Exception as exc:
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
