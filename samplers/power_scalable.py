"""`power_scalable`: autoregressive power sampling with Monte Carlo lookahead (docs/samplers.md, power_scalable).

Ji, Tutunov, Zimmer & Bou Ammar (arXiv 2601.21590). The power distribution's next-step conditional is
p(c)^alpha * zeta(c), where zeta(c) = sum over futures s of p(s | c)^alpha is the quality of c's
future. Each decision weighs K candidates by that product, estimating zeta from M rollouts after
each candidate, and commits one; nothing is revisited, so each decision streams as soon as it is made.

- Token level (`block_size` 1): the candidates are the K most likely next tokens.
- Block level: L blocks of `block_size` tokens are drawn from the proposal; the K most likely
  distinct ones are the candidates, each weighing as often as it was drawn.

Where blocks and rollouts come from (`proposal`):
- "tempered": q proportional to p^alpha among the `proposal_top_k` most likely tokens at each
  position. A draw s weighs p(s)^alpha / q(s), the product of its tokens' Z_t (samplers/one_pass.py),
  which the decoding pass itself gives; the target becomes p^alpha over completions made of such
  tokens. zeta_hat(c) is the mean of the M rollouts' weights.
- "base": draws from p itself at temperature 1, so logprobs are log p. A rollout weighs
  p(s)^(alpha-1); a block p^(alpha-1) (`importance`, consistent for p^alpha) or p^alpha (the
  paper's `power`, which tends to p^(alpha+1)).

At token level the next decision's K most likely tokens are read from the chosen candidate's
rollouts, whose first step computed them, instead of probing again. The K rollout requests of a
decision go to the engine together and share the prefix's cached KV; the `n` choices of a request
run side by side.
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
from samplers.one_pass import (RescoreBudget, alternatives_to_read, check_alternatives_reported, kept_tokens,
                               rescored_log_q, truncated_log_q)


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
        description="Block level, base proposal: 'importance' weighs each drawn block by p^(alpha-1) * "
                    "zeta (default, consistent for p^alpha); 'power' by p^alpha * zeta (the paper's).",
    )
    proposal: Literal["tempered", "base"] = Field(
        "tempered",
        description="What blocks and rollouts are drawn from: 'tempered', p^alpha among the proposal_top_k "
                    "most likely tokens, weighed exactly by p^alpha / q; 'base', p itself at temperature 1.",
    )
    proposal_top_k: int | None = Field(
        None, ge=0,
        description="Tempered proposal: draw among the K most likely tokens at each position (default 16), "
                    "and the target becomes p^alpha over completions made of such tokens; 0: untruncated.",
    )

# Above this share of zeta_hat, one rollout's term is the estimate: a degenerate estimate.
DEGENERATE_SHARE = 0.9


def candidate_probabilities(log_base: np.ndarray, terms: np.ndarray, jackknife: bool) -> np.ndarray:
    """The probability of committing each of K candidates (docs/samplers.md, power_scalable).

    `log_base[..., k]` is the log of candidate k's own weight (alpha * log p(c) at token level) and
    `terms[..., k, r]` the log weight of rollout r after it: log p(s)^alpha / q(s) (0 where nothing
    is left to roll out, which makes zeta exactly 1). zeta_hat(c) = (1/M) sum_r exp(terms), p_hat ∝
    base * zeta_hat. The jackknife p_JK = M p_hat - ((M-1)/M) sum_s p_hat_{-s}, where p_hat_{-s}
    leaves rollout s out of every candidate's estimate; it is clipped at 0 and renormalised.
    Leading axes are batches.
    """
    m = terms.shape[-1]
    p_hat = _softmax(log_base + _logsumexp(terms, axis=-1) - math.log(m), axis=-1)
    if not jackknife:
        return p_hat
    left_out = np.where(np.eye(m, dtype=bool), -np.inf, terms[..., None, :])  # [..., k, s, r]
    loo_log_zeta = _logsumexp(left_out, axis=-1) - math.log(m - 1)  # [..., k, s]
    p_loo = _softmax(log_base[..., None] + loo_log_zeta, axis=-2)  # normalised over candidates
    p_jk = np.clip(m * p_hat - (m - 1) / m * p_loo.sum(axis=-1), 0.0, None)
    return p_jk / p_jk.sum(axis=-1, keepdims=True)


def zeta_concentration(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate, the effective sample size of its rollouts' terms, (sum w)^2 / sum w^2 (from 1,
    one rollout is the estimate, to M), and the largest term's share of zeta_hat."""
    shares = _softmax(terms, axis=-1)
    return 1.0 / (shares ** 2).sum(axis=-1), shares.max(axis=-1)


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
        # Per decision: L candidate blocks (one probe token in all at token level, which later reads
        # its candidates from rollouts), then M rollouts of at most H tokens after each of the K
        # candidates (docs/samplers.md, power_scalable); every decision commits at least a token, a whole block
        # unless the completion ends. A tempered proposal may rescore one draw per decision.
        total, remaining = 1 if params.block_size == 1 else 0, decode.max_tokens
        while remaining > 0:
            size = min(params.block_size, remaining)
            drawn = 0 if params.block_size == 1 else _candidate_blocks(params) * size
            remaining -= size
            total += drawn + params.candidates * params.rollouts * min(params.rollout_horizon, remaining)
        if params.proposal == "tempered":
            total += _rescore_budget(decode, params) * (prompt_length + decode.max_tokens + params.rollout_horizon)
        return decode.n * total

    def check(self, model: LanguageModel, decode: DecodeParams, params: PowerScalableParams) -> None:
        check_power_request(self.name, decode, "power_scalable picks its own candidates: set `candidates`.")
        if params.block_size == 1:
            for name in ("candidate_blocks", "block_weighting"):
                if getattr(params, name) is not None:
                    raise InvalidRequest(f"{name} applies only at block level (block_size > 1).", param=name)
        elif params.candidates > _candidate_blocks(params):
            raise InvalidRequest("candidates (K) cannot exceed candidate_blocks (L), the blocks drawn "
                                 "to choose them from.", param="candidates")
        if params.jackknife and params.rollouts < 2:
            raise InvalidRequest("The jackknife leaves one rollout out, so it needs rollouts >= 2; "
                                 "or set jackknife to false.", param="rollouts")
        if params.proposal == "base":
            if params.proposal_top_k is not None:
                raise InvalidRequest("proposal_top_k applies only to the tempered proposal.", param="proposal_top_k")
            return
        if params.block_weighting == "power":
            raise InvalidRequest("The tempered proposal weighs each block by p^alpha / q exactly; the paper's "
                                 "'power' weighting is for proposal 'base'.", param="block_weighting")
        if model.processed_logprobs:
            raise InvalidRequest(
                "The tempered proposal weighs draws by the base model's log p of the most likely tokens, which "
                "an engine in processed_logprobs mode does not report; set proposal to 'base', or serve "
                "without --logprobs-mode processed_logprobs.", param="proposal")
        check_alternatives_reported(model, kept_tokens(_proposal_top_k(params), model.vocab_size),
                                    "The tempered proposal")

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
    `prefix`, p(c)^alpha * zeta(c) normalised over its K candidates (docs/samplers.md, power_scalable), as
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


def _proposal_top_k(params: PowerScalableParams) -> int:
    return 16 if params.proposal_top_k is None else params.proposal_top_k


def _rescore_budget(decode: DecodeParams, params: PowerScalableParams) -> int:
    """The most draws one choice rescores: one per decision (`RescoreBudget`)."""
    return math.ceil(decode.max_tokens / params.block_size)


@dataclass
class _Candidate:
    draw: Completion  # its tokens, their log p, and whether it ends the completion
    log_base: float  # log of its weight before zeta
    next_top: tuple[TokenLogprob, ...] = ()  # the most likely tokens after it, once its rollouts ran


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
        self.tempered = params.proposal == "tempered"
        self.kept = kept_tokens(_proposal_top_k(params), model.vocab_size)
        self.top_count = min(params.candidates, model.vocab_size)
        self.alternatives = alternatives_to_read(model, self.kept) if self.tempered else 0
        self.next_top: tuple[TokenLogprob, ...] = ()  # the next decision's most likely tokens, once read
        self.rescores = RescoreBudget(_rescore_budget(decode, params))

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        for step in range(self.decode.max_tokens):
            candidates, probabilities = await self.decide(self.decode.max_tokens - len(self.stream.token_ids),
                                                          f"{self.request_id}-{step}")
            chosen = self.rng.choices(candidates, weights=probabilities.tolist())[0]
            self.next_top = chosen.next_top
            self.spend.count("decisions")
            yield self._commit(chosen.draw)
            if chosen.draw.ended or len(self.stream.token_ids) == self.decode.max_tokens:
                return

    async def decide(self, remaining: int, request_id: str) -> tuple[list[_Candidate], np.ndarray]:
        """The candidates for the next token or block, and the probability of committing each."""
        prefix = self.prompt + self.stream.token_ids
        if self.params.block_size > 1:
            candidates = await self._sampled_blocks(prefix, min(self.params.block_size, remaining), request_id)
        elif self.next_top:
            candidates = self._top_tokens(self.next_top)
        else:
            candidates = self._top_tokens(await self._probe(prefix, request_id))
        rollouts = await asyncio.gather(*(
            self._rollouts(prefix, c, remaining, f"{request_id}-{k}") for k, c in enumerate(candidates)
        ))
        self._record_concentration([terms for terms in rollouts if terms is not None])
        # Where nothing can follow a candidate, zeta is exactly 1: terms of 0.
        terms = np.array([[0.0] * self.params.rollouts if r is None else r for r in rollouts])
        return candidates, candidate_probabilities(np.array([c.log_base for c in candidates]), terms,
                                                   self.params.jackknife)

    async def _probe(self, prefix: list[int], request_id: str) -> tuple[TokenLogprob, ...]:
        """The K most likely next tokens with their log p, from one decoded token's logprobs."""
        probe = DecodeParams(max_tokens=1, ignore_eos=True, logprobs=self.top_count, seed=self._seed(),
                             scheduling=self.decode.scheduling)
        self.spend.count("probes")
        [draw] = await complete(self.model, prefix, probe, request_id, self.spend)
        return draw.top[0]

    def _top_tokens(self, top: tuple[TokenLogprob, ...]) -> list[_Candidate]:
        return [_Candidate(self._token_draw(t), self.params.power_alpha * t.logprob) for t in top[:self.top_count]]

    def _token_draw(self, token: TokenLogprob) -> Completion:
        stop_token = token.token_id in self.decode.stop_token_ids
        ends = stop_token or (token.token_id in self.model.eos_token_ids and not self.decode.ignore_eos)
        return Completion([token.token_id], [token.logprob], "stop" if ends else None,
                          token.token_id if stop_token else None)

    async def _sampled_blocks(self, prefix: list[int], size: int, request_id: str) -> list[_Candidate]:
        """L blocks drawn from the proposal, reduced to the K most likely distinct ones with their weights."""
        draws = await complete(self.model, prefix, self._proposal(_candidate_blocks(self.params), size, 0),
                               request_id, self.spend)
        counts: dict[tuple[int, ...], int] = {}
        distinct: dict[tuple[int, ...], Completion] = {}
        for draw in draws:
            key = tuple(draw.token_ids)
            counts[key] = counts.get(key, 0) + 1
            distinct.setdefault(key, draw)
        kept = sorted(distinct, key=lambda key: sum(distinct[key].logprobs), reverse=True)[:self.params.candidates]
        # A block drawn k times weighs k times its importance weight; the paper's 'power' weighting
        # multiplies in p once more (docs/samplers.md, power_scalable).
        power = self.params.block_weighting == "power"
        log_weights = [await self._log_weight(prefix, distinct[key], f"{request_id}-{i}")
                       + (sum(distinct[key].logprobs) if power else 0.0) for i, key in enumerate(kept)]
        return [_Candidate(distinct[key], math.log(counts[key]) + w) for key, w in zip(kept, log_weights)]

    async def _rollouts(self, prefix: list[int], candidate: _Candidate, remaining: int,
                        request_id: str) -> list[float] | None:
        """The log weights of M rollouts after the candidate; None when nothing can follow it. At
        token level they also give the most likely tokens after it (`next_top`)."""
        room = min(self.params.rollout_horizon, remaining - len(candidate.draw.token_ids))
        if candidate.draw.ended or room == 0:
            return None
        start = prefix + candidate.draw.token_ids
        top_count = self.top_count if self.params.block_size == 1 else 0
        draws = await complete(self.model, start, self._proposal(self.params.rollouts, room, top_count),
                               request_id, self.spend)
        self.spend.count("rollouts", len(draws))
        if top_count:
            candidate.next_top = draws[0].top[0]
        return [await self._log_weight(start, d, f"{request_id}-{r}") for r, d in enumerate(draws)]

    async def _log_weight(self, prefix: list[int], draw: Completion, request_id: str) -> float:
        """log p(s)^alpha / q(s) of a draw from the proposal: (alpha - 1) log p(s) for the base one, the
        sum of its tokens' log Z_t for the tempered one (docs/samplers.md, power_scalable)."""
        alpha = self.params.power_alpha
        if not self.tempered:
            return (alpha - 1.0) * sum(draw.logprobs)
        log_q = [truncated_log_q(lp, alternatives, self.kept, alpha, self.model.vocab_size)
                 for lp, alternatives in zip(draw.logprobs, draw.alternatives)]
        if None in log_q:
            self.rescores.take()
            log_q = await rescored_log_q(self.model, prefix, draw.token_ids, self.kept, alpha, request_id, self.spend,
                                         self.decode.scheduling)
        return alpha * sum(draw.logprobs) - sum(log_q)

    def _proposal(self, n: int, max_tokens: int, top_count: int) -> DecodeParams:
        """n draws from the proposal, reporting at least `top_count` alternatives per token: p itself
        (temperature 1, untruncated, so logprobs are log p), or p^alpha among the kept tokens."""
        truncated = self.tempered and self.kept < self.model.vocab_size
        return DecodeParams(max_tokens=max_tokens, n=n, seed=self._seed(),
                            temperature=1.0 / self.params.power_alpha if self.tempered else 1.0,
                            top_k=self.kept if truncated else 0, logprobs=max(self.alternatives, top_count),
                            stop_token_ids=self.decode.stop_token_ids, ignore_eos=self.decode.ignore_eos,
                            scheduling=self.decode.scheduling)

    def _record_concentration(self, estimates: list[list[float]]) -> None:
        """How spread each zeta_hat of this decision was: its rollouts' effective sample size (the
        mean over candidates goes to `rollout_ess`) and whether one rollout carried more than
        DEGENERATE_SHARE of it (docs/samplers.md, power_scalable, diagnostics)."""
        if not estimates:
            return
        ess, largest = zeta_concentration(np.array(estimates))
        self.spend.count("zeta_estimates", len(estimates))
        self.spend.count("zeta_degenerate", int((largest > DEGENERATE_SHARE).sum()))
        self.spend.details.setdefault("rollout_ess", []).append(round(float(ess.mean()), 3))

    def _seed(self) -> int | None:
        return None if self.decode.seed is None else self.rng.randrange(2**31)

    def _commit(self, chosen: Completion) -> ChoiceDelta:
        finished = chosen.ended or len(self.stream.token_ids) + len(chosen.token_ids) == self.decode.max_tokens
        return self.stream.delta(chosen.token_ids, chosen.logprobs,
                                 ("stop" if chosen.ended else "length") if finished else None, chosen.stop_reason)
