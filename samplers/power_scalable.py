"""`power_scalable`: autoregressive power sampling with Monte Carlo lookahead (README, power_scalable).

Ji, Tutunov, Zimmer & Bou Ammar (arXiv 2601.21590). The power distribution's next-step conditional is
p(c)^alpha * zeta(c), where zeta(c) = E_{s ~ p}[p(s | c)^(alpha - 1)] is the quality of c's future.
Each decision weighs K candidates by that product, estimating zeta from M rollouts after each
candidate, and commits one; nothing is revisited, so each decision streams as soon as it is made.

- Token level (`block_size` 1): the candidates are the K most likely next tokens.
- Block level: L blocks of `block_size` tokens are drawn from p; the K most likely distinct ones
  are the candidates, each weighing as often as it was drawn. Draws from p weighted by
  p^alpha * zeta (the paper's choice, `power`) tend to p^(alpha+1), not p^alpha; the
  self-normalised importance weight for draws from p is p^(alpha-1) * zeta (`importance`, the
  default).

Every rollout runs at temperature 1 without truncation, so the engine's logprobs are log p itself
and nothing is scored twice. The K rollout requests of a decision go to the engine together and
share the prefix's cached KV; the `n` choices of a request run side by side.
"""

import asyncio
import math
import random
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from samplers.base import (
    ChoiceDelta,
    ChoiceStream,
    Completion,
    DecodeParams,
    InvalidRequest,
    LanguageModel,
    Sampler,
    Spend,
    TokenLogprob,
    check_power_request,
    complete,
    merge_streams,
)


class PowerScalableParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    power_alpha: float = Field(4.0, ge=1.0, description="The exponent alpha of the target p^alpha.")
    block_size: int = Field(
        16, ge=1, le=4096, description="Tokens committed per decision; 1 is the token-level algorithm."
    )
    candidates: int = Field(
        8, ge=1, le=20,
        description="K: candidates weighed per decision (the K most likely next tokens, or the K "
                    "most likely distinct sampled blocks).",
    )
    rollouts: int = Field(8, ge=1, le=64, description="M: rollouts per candidate that estimate zeta.")
    rollout_horizon: int = Field(
        32, ge=1, le=4096, description="H: tokens per rollout at most (EOS and max_tokens end it sooner)."
    )
    jackknife: bool = Field(True, description="Correct the O(1/M) bias of the zeta estimate to O(1/M^2).")
    candidate_blocks: int | None = Field(
        None, ge=1, le=64, description="L: blocks drawn per decision at block level; default `candidates`."
    )
    block_weighting: Literal["importance", "power"] | None = Field(
        None,
        description="Block level: 'importance' weighs each drawn block by p^(alpha-1) * zeta "
                    "(default, consistent for p^alpha); 'power' by p^alpha * zeta (the paper's).",
    )


def candidate_probabilities(log_base: np.ndarray, rollout_logp: np.ndarray, alpha: float,
                            jackknife: bool) -> np.ndarray:
    """The probability of committing each of K candidates (README, power_scalable).

    `log_base[..., k]` is the log of candidate k's own weight (alpha * log p(c) at token level) and
    `rollout_logp[..., k, r]` the log p of rollout r after it (0 where nothing is left to roll out,
    which makes zeta exactly 1). zeta_hat(c) = (1/M) sum_r p(s_r)^(alpha-1), p_hat ∝ base * zeta_hat.
    The jackknife p_JK = M p_hat - ((M-1)/M) sum_s p_hat_{-s}, where p_hat_{-s} leaves rollout s out
    of every candidate's estimate; it is clipped at 0 and renormalised. Leading axes are batches.
    """
    terms = (alpha - 1.0) * rollout_logp
    m = terms.shape[-1]
    p_hat = _softmax(log_base + _logsumexp(terms, axis=-1) - math.log(m), axis=-1)
    if not jackknife:
        return p_hat
    left_out = np.where(np.eye(m, dtype=bool), -np.inf, terms[..., None, :])  # [..., k, s, r]
    loo_log_zeta = _logsumexp(left_out, axis=-1) - math.log(m - 1)  # [..., k, s]
    p_loo = _softmax(log_base[..., None] + loo_log_zeta, axis=-2)  # normalised over candidates
    p_jk = np.clip(m * p_hat - (m - 1) / m * p_loo.sum(axis=-1), 0.0, None)
    return p_jk / p_jk.sum(axis=-1, keepdims=True)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.log(np.exp(x - top).sum(axis=axis)) + np.squeeze(top, axis=axis)


def _softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    weights = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return weights / weights.sum(axis=axis, keepdims=True)


class PowerScalableSampler(Sampler):
    name = "power_scalable"
    Params = PowerScalableParams
    default_max_concurrent = 4

    def max_engine_tokens(self, prompt_length: int, decode: DecodeParams,
                          params: PowerScalableParams) -> int:
        # Per decision: one probe token or L candidate blocks, then M rollouts of at most H tokens
        # after each of the K candidates (README, power_scalable); every decision commits at least
        # a token, a whole block unless the completion ends.
        total, remaining = 0, decode.max_tokens
        while remaining > 0:
            size = min(params.block_size, remaining)
            drawn = 1 if params.block_size == 1 else _candidate_blocks(params) * size
            remaining -= size
            total += drawn + params.candidates * params.rollouts * min(params.rollout_horizon, remaining)
        return decode.n * total

    def check(self, model: LanguageModel, decode: DecodeParams, params: PowerScalableParams) -> None:
        check_power_request(self.name, decode, "power_scalable picks its own candidates: set `candidates`.")
        if params.block_size == 1:
            for field in ("candidate_blocks", "block_weighting"):
                if getattr(params, field) is not None:
                    raise InvalidRequest(f"{field} applies only at block level (block_size > 1).",
                                         param=field)
        elif params.candidates > _candidate_blocks(params):
            raise InvalidRequest("candidates (K) cannot exceed candidate_blocks (L), the blocks drawn "
                                 "to choose them from.", param="candidates")
        if params.jackknife and params.rollouts < 2:
            raise InvalidRequest("The jackknife leaves one rollout out, so it needs rollouts >= 2; "
                                 "or set jackknife to false.", param="rollouts")

    async def sample(
        self,
        model: LanguageModel,
        prompt_token_ids: list[int],
        decode: DecodeParams,
        params: PowerScalableParams,
        request_id: str,
        spend: Spend,
    ) -> AsyncIterator[ChoiceDelta]:
        seeds = random.Random(decode.seed)
        choices = [
            _Choice(model, prompt_token_ids, decode, params, f"{request_id}-{index}", spend, index,
                    random.Random(seeds.randrange(2**63))).deltas()
            for index in range(decode.n)
        ]
        async with aclosing(merge_streams(choices)) as deltas:
            async for delta in deltas:
                yield delta


async def next_token_law(model: LanguageModel, prefix: list[int], remaining: int, params: PowerScalableParams,
                         request_id: str, seed: int | None = None) -> dict[int, float]:
    """power_scalable's token-level estimate of the power distribution's next-token conditional after
    `prefix`, p(c)^alpha * zeta(c) normalised over its K candidates (README, power_scalable), as
    {token: probability}; every other token has probability 0. `remaining` is what is left of the
    completion's budget, which caps the rollouts. Only the token level (block_size 1) has one."""
    if params.block_size != 1:
        raise InvalidRequest("The next-token law exists at token level only: set block_size to 1.",
                             param="block_size")
    choice = _Choice(model, prefix, DecodeParams(max_tokens=remaining, seed=seed), params, request_id, Spend(),
                     0, random.Random(seed))
    candidates, probabilities = await choice.decide(remaining, request_id)
    return {c.draw.token_ids[0]: float(p) for c, p in zip(candidates, probabilities)}


def _candidate_blocks(params: PowerScalableParams) -> int:
    return params.candidate_blocks or params.candidates


@dataclass
class _Candidate:
    draw: Completion  # its tokens, their log p, and whether it ends the completion
    log_base: float  # log of its weight before zeta


class _Choice:
    """One completion, decided a token or a block at a time."""

    def __init__(self, model, prompt, decode: DecodeParams, params: PowerScalableParams, request_id,
                 spend: Spend, index: int, rng: random.Random):
        self.model = model
        self.prompt = prompt
        self.decode = decode
        self.params = params
        self.request_id = request_id
        self.spend = spend
        self.rng = rng
        self.stream = ChoiceStream(model, index, decode.logprobs is not None)

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        for step in range(self.decode.max_tokens):
            candidates, probabilities = await self.decide(self.decode.max_tokens - len(self.stream.token_ids),
                                                          f"{self.request_id}-{step}")
            chosen = self.rng.choices(candidates, weights=probabilities.tolist())[0].draw
            self.spend.count("decisions")
            yield self._commit(chosen)
            if chosen.ended or len(self.stream.token_ids) == self.decode.max_tokens:
                return

    async def decide(self, remaining: int, request_id: str) -> tuple[list[_Candidate], np.ndarray]:
        """The candidates for the next token or block, and the probability of committing each."""
        prefix = self.prompt + self.stream.token_ids
        if self.params.block_size == 1:
            candidates = await self._top_tokens(prefix, request_id)
        else:
            candidates = await self._sampled_blocks(prefix, min(self.params.block_size, remaining), request_id)
        rollout_logp = await asyncio.gather(*(
            self._rollouts(prefix, c.draw, remaining, f"{request_id}-{k}") for k, c in enumerate(candidates)
        ))
        return candidates, candidate_probabilities(
            np.array([c.log_base for c in candidates]), np.array(rollout_logp),
            self.params.power_alpha, self.params.jackknife)

    async def _top_tokens(self, prefix: list[int], request_id: str) -> list[_Candidate]:
        """The K most likely next tokens with their log p, from one decoded token's logprobs."""
        count = min(self.params.candidates, self.model.vocab_size)
        probe = DecodeParams(max_tokens=1, ignore_eos=True, logprobs=count, seed=self._seed())
        top: tuple[TokenLogprob, ...] = ()
        async with aclosing(self.model.decode(prefix, probe, request_id, self.spend)) as batches:
            async for batch in batches:
                for delta in batch:
                    top = delta.logprobs[0].top if delta.logprobs else top
        return [_Candidate(self._token_draw(t), self.params.power_alpha * t.logprob) for t in top]

    def _token_draw(self, token: TokenLogprob) -> Completion:
        stop_token = token.token_id in self.decode.stop_token_ids
        ends = stop_token or (token.token_id in self.model.eos_token_ids and not self.decode.ignore_eos)
        return Completion([token.token_id], [token.logprob], "stop" if ends else None,
                          token.token_id if stop_token else None)

    async def _sampled_blocks(self, prefix: list[int], size: int, request_id: str) -> list[_Candidate]:
        """L blocks drawn from p, reduced to the K most likely distinct ones with their weights."""
        draws = await complete(self.model, prefix, self._from_p(_candidate_blocks(self.params), size),
                               request_id, self.spend)
        counts: dict[tuple[int, ...], int] = {}
        distinct: dict[tuple[int, ...], Completion] = {}
        for draw in draws:
            key = tuple(draw.token_ids)
            counts[key] = counts.get(key, 0) + 1
            distinct.setdefault(key, draw)
        kept = sorted(distinct, key=lambda key: sum(distinct[key].logprobs), reverse=True)

        # Each draw weighs p^alpha (the paper's) or p^(alpha-1) (the self-normalised importance
        # weight for draws from p), so a block drawn k times weighs k times as much.
        exponent = self.params.power_alpha - (self.params.block_weighting != "power")

        def log_weight(key: tuple[int, ...]) -> float:
            return math.log(counts[key]) + exponent * sum(distinct[key].logprobs)

        return [_Candidate(distinct[key], log_weight(key)) for key in kept[:self.params.candidates]]

    async def _rollouts(self, prefix: list[int], candidate: Completion, remaining: int,
                        request_id: str) -> list[float]:
        """log p of M rollouts after the candidate; all 0 (zeta = 1) when nothing can follow it."""
        room = min(self.params.rollout_horizon, remaining - len(candidate.token_ids))
        if candidate.ended or room == 0:
            return [0.0] * self.params.rollouts
        draws = await complete(self.model, prefix + candidate.token_ids,
                               self._from_p(self.params.rollouts, room), request_id, self.spend)
        self.spend.count("rollouts", len(draws))
        return [sum(d.logprobs) for d in draws]

    def _from_p(self, n: int, max_tokens: int) -> DecodeParams:
        """n draws from the model itself: temperature 1, no truncation, so logprobs are log p."""
        return DecodeParams(max_tokens=max_tokens, n=n, seed=self._seed(), logprobs=0,
                            stop_token_ids=self.decode.stop_token_ids, ignore_eos=self.decode.ignore_eos)

    def _seed(self) -> int | None:
        return None if self.decode.seed is None else self.rng.randrange(2**31)

    def _commit(self, chosen: Completion) -> ChoiceDelta:
        finished = chosen.ended or len(self.stream.token_ids) + len(chosen.token_ids) == self.decode.max_tokens
        return self.stream.delta(chosen.token_ids, chosen.logprobs,
                                 ("stop" if chosen.ended else "length") if finished else None, chosen.stop_reason)
