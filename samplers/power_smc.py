"""`power_smc`: sequential Monte Carlo towards p(y|x)^alpha (docs/samplers.md, power_smc).

After Power-SMC (arXiv 2602.10273). N particles grow token by token from the proposal
q(v | y_<t) proportional to p(v | y_<t)^alpha among the K most likely tokens. The target of the
first t tokens is p(y_<=t)^alpha, so a token's incremental weight p(y_t)^alpha / q(y_t) is
Z_t = sum over the kept v of p(v | y_<t)^alpha: it depends on the prefix only, and the one-pass
proposal's own logprobs give it, log Z_t = alpha log p(y_t) - log q(y_t) (samplers/one_pass.py).
A particle that ends (EOS, a stop token or max_tokens) keeps its weight. Every `resample_every`
tokens, when the effective sample size falls below `ess_threshold` N, the particles are resampled
and their weights reset; at the end one is drawn by weight.

Each particle decodes in engine requests of at most CHUNK tokens, streamed, and is checked as its
tokens arrive, so the engine keeps decoding while weights are compared. A particle that resampling
copies keeps its request for one copy; each other copy is a new request from the prefix at the
check, which the prefix cache serves; one that resampling drops is aborted. Tokens a particle drew
beyond the check stay valid: they were drawn from q given its prefix, and whether the particle
survives depends on weights up to the check only, never on them.

Every particle alive at a check shares the prefix common to all of them up to the check with every
particle that can exist later, so that prefix is final and is streamed as it grows.
"""

import asyncio
import math
import random
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from samplers.base import (
    ChoiceDelta,
    ChoiceStream,
    DecodeParams,
    InvalidRequest,
    LanguageModel,
    Sampler,
    Spend,
    check_power_request,
    merge_streams,
)
from samplers.one_pass import (RescoreBudget, alternatives_to_read, check_alternatives_reported, kept_tokens,
                               rescored_log_q, truncated_log_q)

# Most tokens one engine request of a particle decodes. It bounds what a dropped particle may have
# drawn beyond the check that drops it, and so the cost cap; a continuation reads the prefix cache.
CHUNK = 64


class PowerSMCParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    power_alpha: float = Field(4.0, ge=1.0, description="The exponent alpha of the target p^alpha.")
    particles: int = Field(16, ge=1, le=256, description="N: particles per completion.")
    ess_threshold: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Resample when the effective sample size falls below this fraction of N; 0: never.",
    )
    resample_every: int = Field(1, ge=1, description="Tokens between effective sample size checks.")
    resampling: Literal["systematic", "multinomial"] = Field(
        "systematic", description="How offspring are drawn: systematic (one uniform) or multinomial."
    )
    proposal_top_k: int = Field(
        16, ge=0,
        description="K: particles draw among the K most likely tokens at each position, and the target "
                    "becomes p^alpha over completions made of such tokens; 0: untruncated.",
    )


def log_ess(log_weights: list[float]) -> float:
    """log of the effective sample size (sum w)^2 / sum w^2 (docs/samplers.md, power_smc)."""
    top = max(log_weights)
    total = sum(math.exp(w - top) for w in log_weights)
    squares = sum(math.exp(2 * (w - top)) for w in log_weights)
    return 2 * math.log(total) - math.log(squares)


def normalised(log_weights: list[float]) -> list[float]:
    top = max(log_weights)
    weights = [math.exp(w - top) for w in log_weights]
    total = sum(weights)
    return [w / total for w in weights]


def systematic_counts(weights: list[float], u: float) -> list[int]:
    """Offspring counts of systematic resampling: the N points (j + u) / N, j = 0..N-1, fall in
    the particles' stretches of [0, 1), each as long as its normalised weight. Particle i gets
    floor or ceil of N w_i, N w_i on average over u uniform in [0, 1)."""
    n = len(weights)
    edges = list(accumulate(w * n for w in weights))
    edges[-1] = n  # rounding must not leave the last point past the end
    counts, point = [0] * n, 0
    for i, edge in enumerate(edges):
        while point < n and point + u < edge:
            counts[i] += 1
            point += 1
    return counts


def multinomial_counts(weights: list[float], rng: random.Random) -> list[int]:
    counts = [0] * len(weights)
    for i in rng.choices(range(len(weights)), weights=weights, k=len(weights)):
        counts[i] += 1
    return counts


@dataclass
class _Particle:
    """A partial completion with each token's base log p and incremental log weight log Z_t, its
    weight since the last resampling, and the task that extends it (None once it has ended)."""

    line: int  # names its engine requests and seeds them
    tokens: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    log_z: list[float] = field(default_factory=list)
    ended: bool = False  # EOS or a stop token
    stop_reason: int | None = None
    log_weight: float = 0.0
    task: asyncio.Task | None = None

    def copy(self, line: int, length: int) -> "_Particle":
        """A new particle with this one's first `length` tokens (all of them if it ended there)."""
        ended = self.ended and length >= len(self.tokens)
        return _Particle(line, self.tokens[:length], self.logp[:length], self.log_z[:length], ended,
                         self.stop_reason if ended else None)


class PowerSMCSampler(Sampler):
    name = "power_smc"
    Params = PowerSMCParams
    default_max_concurrent = 4

    def max_engine_tokens(self, prompt_length: int, decode: DecodeParams, params: PowerSMCParams) -> int:
        # N particles decode at most max_tokens each; each resampling after a check drops at most
        # N - 1, each of which may have drawn up to a CHUNK beyond the check; a run rescores at
        # most `_rescore_budget` ties, each a prefill of prompt and particle (docs/samplers.md, power_smc).
        checks = math.ceil(decode.max_tokens / params.resample_every) - 1
        dropped = (params.particles - 1) * checks * min(CHUNK, decode.max_tokens)
        rescored = _rescore_budget(decode, params) * (prompt_length + decode.max_tokens)
        return decode.n * (params.particles * decode.max_tokens + dropped + rescored)

    def check(self, model: LanguageModel, decode: DecodeParams, params: PowerSMCParams) -> None:
        check_power_request(self.name, decode, "power_smc truncates its proposal with proposal_top_k.")
        if model.processed_logprobs:
            raise InvalidRequest(
                "power_smc weighs particles by the base model's log p of the most likely tokens, which an "
                "engine in processed_logprobs mode does not report; serve without --logprobs-mode "
                "processed_logprobs.", param="sampler")
        kept = kept_tokens(params.proposal_top_k, model.vocab_size)
        check_alternatives_reported(model, kept, "power_smc")

    async def sample(
        self,
        model: LanguageModel,
        prompt_token_ids: list[int],
        decode: DecodeParams,
        params: PowerSMCParams,
        request_id: str,
        spend: Spend,
    ) -> AsyncIterator[ChoiceDelta]:
        seeds = random.Random(decode.seed)
        runs = [_Population(model, prompt_token_ids, decode, params, f"{request_id}-{index}", spend, index,
                            None if decode.seed is None else seeds.randrange(2**63)).deltas()
                for index in range(decode.n)]
        async with aclosing(merge_streams(runs)) as deltas:
            async for delta in deltas:
                yield delta


def _rescore_budget(decode: DecodeParams, params: PowerSMCParams) -> int:
    """The most ties one run rescores: one per particle and CHUNK (`RescoreBudget`)."""
    return params.particles * math.ceil(decode.max_tokens / CHUNK)


class _Population:
    """The N particles of one completion."""

    def __init__(self, model: LanguageModel, prompt: list[int], decode: DecodeParams, params: PowerSMCParams,
                 request_id: str, spend: Spend, index: int, seed: int | None):
        self.model = model
        self.prompt = prompt
        self.decode = decode
        self.params = params
        self.request_id = request_id
        self.spend = spend
        self.seed = seed
        self.rng = random.Random(seed)
        self.kept = kept_tokens(params.proposal_top_k, model.vocab_size)
        self.alternatives = alternatives_to_read(model, self.kept)
        self.stream = ChoiceStream(model, index, decode.logprobs is not None)
        self.changed = asyncio.Condition()
        self.checked = 0  # tokens whose weights have been taken into account
        self.lines = 0
        self.rescores = RescoreBudget(_rescore_budget(decode, params))

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        particles = [self._start(_Particle(self._line())) for _ in range(self.params.particles)]
        self.spend.count("particles", len(particles))
        self.spend.count("resamplings", 0)  # a run that never resamples still shows 0 on dashboards
        try:
            while True:
                check = min(self.checked + self.params.resample_every, self.decode.max_tokens)
                await self._wait(lambda: all(self._finished(p) or len(p.tokens) >= check for p in particles))
                if all(self._finished(p) for p in particles):
                    check = self.decode.max_tokens  # nothing more will come: take every token's weight
                for p in particles:
                    p.log_weight += sum(p.log_z[self.checked:check])
                await self._advance(check)
                if check == self.decode.max_tokens:
                    break
                ess = math.exp(log_ess([p.log_weight for p in particles])) / len(particles)
                if ess < self.params.ess_threshold:
                    self.spend.details.setdefault("ess_at_resampling", []).append(ess)
                    particles = self._resample(particles)
                shared = _common_prefix([p.tokens[:check] for p in particles])
                streamed = len(self.stream.token_ids)
                if shared > streamed:
                    yield self.stream.delta(particles[0].tokens[streamed:shared], particles[0].logp[streamed:shared])
            chosen = particles[self.rng.choices(range(len(particles)), normalised([p.log_weight for p in particles]))[0]]
            streamed = len(self.stream.token_ids)
            yield self.stream.delta(chosen.tokens[streamed:], chosen.logp[streamed:],
                                    "stop" if chosen.ended else "length", chosen.stop_reason)
        finally:
            for p in particles:
                if p.task is not None:
                    p.task.cancel()

    def _finished(self, particle: _Particle) -> bool:
        """Whether the particle has ended or reached max_tokens; raises what its task failed with."""
        task = particle.task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()
        return particle.ended or len(particle.tokens) == self.decode.max_tokens

    async def _wait(self, ready) -> None:
        async with self.changed:
            await self.changed.wait_for(ready)

    async def _advance(self, check: int) -> None:
        """Move the check forward and let the particles that wait for it draw on."""
        self.checked = check
        async with self.changed:
            self.changed.notify_all()

    def _resample(self, particles: list[_Particle]) -> list[_Particle]:
        """Offspring by weight: a surviving particle goes on as its first copy, the other copies start
        from its prefix at the check, and the rest are dropped; all weights become equal."""
        weights = normalised([p.log_weight for p in particles])
        self.spend.count("resamplings")
        if self.params.resampling == "systematic":
            counts = systematic_counts(weights, self.rng.random())
        else:
            counts = multinomial_counts(weights, self.rng)
        survivors = []
        for particle, count in zip(particles, counts):
            if count == 0 and particle.task is not None:
                particle.task.cancel()
            for copy in range(count):
                survivors.append(particle if copy == 0 else self._start(particle.copy(self._line(), self.checked)))
        self.spend.count("particles", len(particles) - sum(count > 0 for count in counts))
        for particle in survivors:
            particle.log_weight = 0.0
        return survivors

    def _line(self) -> int:
        self.lines += 1
        return self.lines

    def _start(self, particle: _Particle) -> _Particle:
        if not (particle.ended or len(particle.tokens) == self.decode.max_tokens):
            particle.task = asyncio.create_task(self._extend(particle))
        return particle

    async def _extend(self, particle: _Particle) -> None:
        """Decode the particle to its end, a CHUNK at a time, starting a chunk only while the
        particle is not past the next check, so that a dropped one has drawn at most a CHUNK ahead."""
        while not particle.ended and len(particle.tokens) < self.decode.max_tokens:
            await self._wait(lambda: len(particle.tokens) <= self.checked + self.params.resample_every)
            start = len(particle.tokens)
            request_id = f"{self.request_id}-{particle.line}-{start}"
            try:
                await self._decode_chunk(particle, request_id)
            finally:  # the population may be waiting for this particle: wake it, even on failure
                async with self.changed:
                    self.changed.notify_all()
            if len(particle.tokens) == start:
                raise RuntimeError(f"The engine decoded nothing for {request_id}")

    async def _decode_chunk(self, particle: _Particle, request_id: str) -> None:
        """Up to CHUNK more tokens of the particle from the proposal, each with its log p and log Z_t."""
        exponent = self.params.power_alpha
        start = len(particle.tokens)
        params = DecodeParams(
            max_tokens=min(CHUNK, self.decode.max_tokens - start),
            temperature=1.0 / exponent,
            top_k=self.kept if self.kept < self.model.vocab_size else 0,
            seed=None if self.seed is None else random.Random(f"{self.seed}:{particle.line}:{start}").randrange(2**31),
            stop_token_ids=self.decode.stop_token_ids,
            ignore_eos=self.decode.ignore_eos,
            logprobs=self.alternatives,
            scheduling=self.decode.scheduling,
        )
        async with aclosing(self.model.decode(self.prompt + particle.tokens, params, request_id,
                                              self.spend)) as batches:
            async for batch in batches:
                for delta in batch:
                    for token in delta.logprobs:
                        log_q = truncated_log_q(token.logprob, [a.logprob for a in token.top], self.kept,
                                                exponent, self.model.vocab_size)
                        if log_q is None:
                            self.rescores.take()
                            [log_q] = await rescored_log_q(self.model, self.prompt + particle.tokens,
                                                           [token.token_id], self.kept, exponent,
                                                           request_id, self.spend, self.decode.scheduling)
                        particle.tokens.append(token.token_id)
                        particle.logp.append(token.logprob)
                        particle.log_z.append(exponent * token.logprob - log_q)  # log Z_t (docs/samplers.md, power_smc)
                    if delta.finish_reason == "stop":
                        particle.ended, particle.stop_reason = True, delta.stop_reason
                async with self.changed:
                    self.changed.notify_all()


def _common_prefix(sequences: list[list[int]]) -> int:
    """The length of the longest prefix every sequence starts with."""
    length = min(len(s) for s in sequences)
    for i in range(length):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return length
