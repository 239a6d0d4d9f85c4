"""The sampler plug-in interface, and the language-model operations samplers are built on.

A sampler turns one prompt into `n` streamed completions. It sees the model only through
`LanguageModel`, so that sampler code never imports vLLM and can be tested on any model that
implements the protocol.
"""

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
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


@dataclass
class Spend:
    """What a sampler cost the engine beyond the prompt, updated while it runs.

    `generated`: tokens the engine decoded; `scored`: tokens it ran through the model only to
    read their log-probabilities. Plain decoding spends exactly its output tokens. `events`
    counts sampler-specific happenings (proposals, acceptances, ...; exported to Prometheus);
    `details` holds derived figures for the response (an acceptance rate, ...).
    """

    generated: int = 0
    scored: int = 0
    events: dict[str, int] = field(default_factory=dict)
    details: dict[str, float] = field(default_factory=dict)

    def count(self, event: str, times: int = 1) -> None:
        self.events[event] = self.events.get(event, 0) + times


class LanguageModel(Protocol):
    """The engine operations a sampler may use.

    `processed_logprobs`: whether the log-probabilities that `decode` reports are those of the
    distribution each token was drawn from (after temperature, top-k and top-p), rather than the
    model's own. `score` always gives the model's own log p.
    """

    processed_logprobs: bool

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of the tokens, special tokens left out."""
        ...

    async def score(self, token_ids: list[int], start: int, request_id: str) -> list[float]:
        """log p(token_ids[i] | token_ids[:i]) under the model at temperature 1, for i >= start."""
        ...

    def decode(
        self, prompt_token_ids: list[int], params: DecodeParams, request_id: str
    ) -> AsyncIterator[list[ChoiceDelta]]:
        """Stream `params.n` completions of the prompt, a batch of per-choice deltas at a time.

        Closing or cancelling the iterator aborts the engine request.
        """
        ...


class InvalidRequest(ValueError):
    """A request that cannot be served as asked; `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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

    def check(self, model: LanguageModel, decode: DecodeParams, params: BaseModel) -> None:
        """Reject request combinations that make no sense for this sampler (raise InvalidRequest)."""

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
