"""`power_mcmc`: block-wise Metropolis-Hastings towards p(y|x)^alpha (algorithms.md section 1).

Karan & Du (arXiv 2510.14901). The chain's state is a whole completion with its per-token log p
(base model, temperature 1) and log q (the proposal actually sampled from). Each step resamples a
suffix from a uniformly chosen index and accepts it with the Metropolis-Hastings ratio, including
the index-choice term log(L / L') that makes the chain exact when an EOS changes the length.

Differences from the published code: the log q values are exact (the engine reports the
log-probabilities of the distribution it sampled from), the current state's values are stored and
never recomputed, the length term is kept, and the `n` chains of a request advance in lockstep so
that their proposals reach the engine together.
"""

import asyncio
import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from samplers.base import (
    ChoiceDelta,
    DecodeParams,
    InvalidRequest,
    LanguageModel,
    Sampler,
    Spend,
    TokenLogprob,
    check_power_request,
    complete,
)


class PowerMCMCParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    power_alpha: float = Field(4.0, ge=1.0, description="The exponent alpha of the target p^alpha.")
    mcmc_steps: int = Field(10, ge=0, le=1000, description="Metropolis-Hastings steps per block.")
    block_size: int | None = Field(
        None, ge=1, description="Tokens added per stage; default ceil(max_tokens / 16)."
    )
    proposal_temperature: float | None = Field(
        None, gt=0.0, le=2.0, description="Temperature of the proposal; default 1 / power_alpha."
    )


@dataclass
class Segment:
    """Tokens with their base log p and proposal log q, and whether they end the completion."""

    tokens: list[int]
    logp: list[float]
    logq: list[float]
    ended: bool  # the last token is EOS or a stop token
    stop_reason: int | None = None

    def suffix(self, start: int) -> "Segment":
        return Segment(self.tokens[start:], self.logp[start:], self.logq[start:], self.ended,
                       self.stop_reason)

    def then(self, other: "Segment") -> "Segment":
        return Segment(self.tokens + other.tokens, self.logp + other.logp, self.logq + other.logq,
                       other.ended, other.stop_reason)


def log_acceptance(alpha: float, current: Segment, proposal: Segment, m: int) -> float:
    """log A for replacing current[m:] by `proposal` (algorithms.md section 1, step 3).

    alpha * (log p(z) - log p(y_>=m)) + (log q(y_>=m) - log q(z)) + log(L / L'), where the last
    term is the ratio of the index-choice probabilities: 1/L' for the way back, 1/L for the way in.
    """
    old = current.suffix(m)
    length, new_length = len(current.tokens), m + len(proposal.tokens)
    return (
        alpha * (sum(proposal.logp) - sum(old.logp))
        + (sum(old.logq) - sum(proposal.logq))
        + math.log(length / new_length)
    )


class PowerMCMCSampler(Sampler):
    name = "power_mcmc"
    Params = PowerMCMCParams
    default_max_concurrent = 4

    def max_engine_tokens(self, prompt_length: int, decode: DecodeParams, params: PowerMCMCParams) -> int:
        # Each stage extends a chain to its length limit, then each step redraws at most that limit
        # (algorithms.md section 1); unless q = p every proposal is also scored, prefix included.
        limits = _stage_limits(decode.max_tokens, params)
        generated = decode.max_tokens + params.mcmc_steps * sum(limits)
        scored = 0
        if not _proposal_is_base(decode, params):
            scored = (1 + params.mcmc_steps) * (len(limits) * prompt_length + sum(limits))
        return decode.n * (generated + scored)

    def check(self, model: LanguageModel, decode: DecodeParams, params: PowerMCMCParams) -> None:
        check_power_request(self.name, decode)
        if _proposal_is_base(decode, params):
            return
        if not model.processed_logprobs:
            raise InvalidRequest(
                "This server's engine reports raw logprobs, so only the untruncated temperature-1 "
                "proposal has an exact density; restart it without --logprobs-mode raw_logprobs.",
                param="proposal_temperature")
        if not model.can_score:
            raise InvalidRequest(
                "A proposal other than the untruncated temperature-1 base model needs the model's "
                "log p of each proposal, which this engine cannot compute while it serves distilled "
                "models (vLLM's LoRA support fails on prompt log-probabilities on CPU). Set "
                "proposal_temperature to 1 without top_k/top_p, or use a server without --distilled.",
                param="proposal_temperature")

    async def sample(
        self,
        model: LanguageModel,
        prompt_token_ids: list[int],
        decode: DecodeParams,
        params: PowerMCMCParams,
        request_id: str,
        spend: Spend,
    ) -> AsyncIterator[ChoiceDelta]:
        run = _ChainRun(model, prompt_token_ids, decode, params, request_id, spend)
        chains = await run.run()
        for index, chain in enumerate(chains):
            yield ChoiceDelta(
                index=index,
                token_ids=chain.tokens,
                text=model.detokenize(chain.tokens),
                logprobs=None if decode.logprobs is None else [
                    TokenLogprob(t, model.detokenize([t]), lp) for t, lp in zip(chain.tokens, chain.logp)
                ],
                finish_reason="stop" if chain.ended else "length",
                stop_reason=chain.stop_reason,
            )


def _stage_limits(max_tokens: int, params: PowerMCMCParams) -> list[int]:
    """The completion's length limit at each stage: one more block each, the last cut at max_tokens."""
    block = params.block_size or math.ceil(max_tokens / 16)
    return [min(limit, max_tokens) for limit in range(block, max_tokens + block, block)]


def _proposal_temperature(params: PowerMCMCParams) -> float:
    return params.proposal_temperature or 1.0 / params.power_alpha


def _proposal_is_base(decode: DecodeParams, params: PowerMCMCParams) -> bool:
    """Whether q = p: temperature 1 and no truncation, so log q needs no separate scoring."""
    return _proposal_temperature(params) == 1.0 and decode.top_k <= 0 and decode.top_p >= 1.0


class _ChainRun:
    """The `n` chains of one request, advanced in lockstep."""

    def __init__(self, model, prompt, decode: DecodeParams, params: PowerMCMCParams, request_id, spend):
        self.model = model
        self.prompt = prompt
        self.decode = decode
        self.params = params
        self.request_id = request_id
        self.spend = spend
        self.rng = random.Random(decode.seed)
        self.q_is_p = _proposal_is_base(decode, params)
        self.proposals = 0

    async def run(self) -> list[Segment]:
        chains = [Segment([], [], [], False) for _ in range(self.decode.n)]
        for limit in _stage_limits(self.decode.max_tokens, self.params):
            # Extend every unfinished chain to the stage's length with the proposal.
            extensions = await asyncio.gather(*(
                self._propose(c, len(c.tokens), limit) if not c.ended and len(c.tokens) < limit
                else asyncio.sleep(0) for c in chains  # sleep(0) stands for "nothing to add": None
            ))
            chains = [c if z is None else c.then(z) for c, z in zip(chains, extensions)]
            for _ in range(self.params.mcmc_steps):
                chains = await self._step(chains, limit)
        self.spend.details["acceptance_rate"] = (
            self.spend.events.get("accepted", 0) / max(self.spend.events.get("proposals", 0), 1)
        )
        return chains

    async def _step(self, chains: list[Segment], limit: int) -> list[Segment]:
        cuts = [self.rng.randrange(len(c.tokens)) for c in chains]
        proposals = await asyncio.gather(*(self._propose(c, m, limit) for c, m in zip(chains, cuts)))
        self.spend.count("proposals", len(chains))
        updated = []
        for chain, m, z in zip(chains, cuts, proposals):
            accept = math.log(1.0 - self.rng.random()) < log_acceptance(self.params.power_alpha, chain, z, m)
            if accept:
                self.spend.count("accepted")
                chain = Segment(chain.tokens[:m], chain.logp[:m], chain.logq[:m], False).then(z)
            updated.append(chain)
        return updated

    async def _propose(self, chain: Segment, m: int, limit: int) -> Segment:
        """Draw a suffix after chain[:m] from the proposal, up to `limit` tokens in all, with its log p."""
        prefix = self.prompt + chain.tokens[:m]
        self.proposals += 1
        request_id = f"{self.request_id}-p{self.proposals}"
        params = DecodeParams(
            max_tokens=limit - m,
            temperature=_proposal_temperature(self.params),
            top_p=self.decode.top_p,
            top_k=self.decode.top_k,
            seed=None if self.decode.seed is None else self.rng.randrange(2**31),
            stop_token_ids=self.decode.stop_token_ids,
            ignore_eos=self.decode.ignore_eos,
            logprobs=0,
        )
        [draw] = await complete(self.model, prefix, params, request_id)
        tokens, logq = draw.token_ids, draw.logprobs
        self.spend.generated += len(tokens)
        if self.q_is_p:
            logp = logq
        else:
            logp = await self.model.score(prefix + tokens, len(prefix), f"{request_id}-score")
            self.spend.scored += len(prefix) + len(tokens)
        return Segment(tokens, logp, logq, ended=draw.ended, stop_reason=draw.stop_reason)

