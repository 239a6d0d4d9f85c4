"""`power_mcmc`: block-wise Metropolis-Hastings towards p(y|x)^alpha (docs/samplers.md, power_mcmc).

Karan & Du (arXiv 2510.14901). The chain's state is a whole completion with its per-token log p
(base model, temperature 1) and log q (the proposal actually sampled from). Each step resamples a
suffix from a uniformly chosen index and accepts it with the Metropolis-Hastings ratio, including
the index-choice term log(L / L') that makes the chain exact when an EOS changes the length.

Differences from the published code: the log q values are exact, the current state's values are
stored and never recomputed, the length term is kept, the `n` chains of a request advance in
lockstep so that their proposals reach the engine together, and with `lookahead` D > 1 the
proposals of the next D steps are drawn at once from the chain as it is.

Look-ahead stays exact because every step still makes a Metropolis-Hastings move from the chain's
current state y: a proposal drawn ahead is used only if its index was drawn uniformly for y's length
and its suffix was drawn after the prefix that y has at that index; otherwise the index (if the
length changed) or the suffix is drawn again first. What decides this is the chain's past, never the
draw's own outcome, and each draw is independent of that past given the prefix it was conditioned
on, so the index is uniform and the suffix follows q given y's prefix, exactly as when drawn at the
step itself (docs/samplers.md, power_mcmc, "look-ahead").

The proposal draws each token at `proposal_temperature` among the `proposal_top_k` most likely
tokens. Its log p and log q come from one of three paths (`Spend.proposal`):
- "base": q = p (temperature 1, untruncated); the engine's logprobs are both.
- "one_pass" (the engine in raw_logprobs mode, vLLM's default): the engine reports the drawn
  token's log p and the log p of the most likely tokens at each position, from which log q follows
  exactly (`truncated_log_q`). Nothing is scored.
- "scored" (processed_logprobs mode): the engine reports log q, and log p is read by scoring the
  proposal, a full prefill of prompt and completion.
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
from samplers.one_pass import (alternatives_to_read, check_alternatives_reported, kept_tokens, rescored_log_q,
                               truncated_log_q)


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
    proposal_top_k: int = Field(
        16, ge=0,
        description="K: the proposal draws among the K most likely tokens at each position, and the "
                    "target becomes p^alpha over completions made of such tokens; 0 (or at least the "
                    "vocabulary size): untruncated.",
    )
    lookahead: int = Field(
        10, ge=1, le=64,
        description="Steps whose proposals are drawn ahead, all at once, from the chain as it is; "
                    "one whose prefix an accepted step changes is drawn again. 1: one at a time.",
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
    """log A for replacing current[m:] by `proposal` (docs/samplers.md, power_mcmc).

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
        # (docs/samplers.md, power_mcmc). Unless q = p a proposal may be scored, prefix included: every
        # one on the "scored" path, those with an unresolved tie on the "one_pass" path.
        limits = _stage_limits(decode.max_tokens, params)
        draws = _draws_per_stage(params)
        generated = decode.max_tokens + draws * sum(limits)
        scored = 0
        if not _proposal_is_base(params, vocab_size=None):
            scored = (1 + draws) * (len(limits) * prompt_length + sum(limits))
        return decode.n * (generated + scored)

    def check(self, model: LanguageModel, decode: DecodeParams, params: PowerMCMCParams) -> None:
        check_power_request(self.name, decode, "power_mcmc truncates its proposal with proposal_top_k.")
        path = proposal_path(model, params)
        kept = kept_tokens(params.proposal_top_k, model.vocab_size)
        if path == "one_pass":
            check_alternatives_reported(
                model, kept, "The one-pass proposal", ", or proposal_temperature to 1 with proposal_top_k 0 "
                "(q = p), or serve with --logprobs-mode processed_logprobs (which scores every proposal)")
        if path == "scored" and not model.can_score:
            raise InvalidRequest(
                "This engine reports processed logprobs, so a proposal other than the untruncated "
                "temperature-1 base model needs the model's log p of each proposal, which it cannot "
                "compute while it serves distilled models (vLLM's LoRA support fails on prompt "
                "log-probabilities on CPU). Serve without --logprobs-mode processed_logprobs, or set "
                "proposal_temperature to 1 and proposal_top_k to 0.", param="proposal_temperature")

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


def proposal_path(model: LanguageModel, params: PowerMCMCParams) -> str:
    """How the proposal's log p and log q are obtained on this engine (module docstring)."""
    if _proposal_is_base(params, model.vocab_size):
        return "base"
    return "scored" if model.processed_logprobs else "one_pass"


def _stage_limits(max_tokens: int, params: PowerMCMCParams) -> list[int]:
    """The completion's length limit at each stage: one more block each, the last cut at max_tokens."""
    block = params.block_size or math.ceil(max_tokens / 16)
    return [min(limit, max_tokens) for limit in range(block, max_tokens + block, block)]


def _proposal_temperature(params: PowerMCMCParams) -> float:
    return params.proposal_temperature or 1.0 / params.power_alpha


def _proposal_is_base(params: PowerMCMCParams, vocab_size: int | None) -> bool:
    """Whether q = p: temperature 1 and no truncation (with the vocabulary unknown, only K = 0)."""
    untruncated = params.proposal_top_k == 0 or (vocab_size is not None and params.proposal_top_k >= vocab_size)
    return _proposal_temperature(params) == 1.0 and untruncated


def _draws_per_stage(params: PowerMCMCParams) -> int:
    """The most proposals a chain draws for one stage's steps: one per step, two with look-ahead,
    whose discarded draws `_look_ahead` keeps within that budget."""
    return params.mcmc_steps * (1 if params.lookahead == 1 else 2)


@dataclass
class _Slot:
    """An upcoming step of a chain (docs/samplers.md, power_mcmc, "look-ahead"): its index, the chain's
    length when that index was drawn, and the proposal drawn ahead for it, if any, with the prefix
    that proposal follows."""

    cut: int
    length: int
    draw: asyncio.Task | None = None
    prefix: list[int] | None = None

    def discard(self) -> bool:
        """Drop the proposal drawn ahead, if any (aborting its engine request if still running)."""
        if self.draw is None:
            return False
        self.draw.cancel()
        # A draw that failed before it was discarded has nothing left to report.
        self.draw.add_done_callback(lambda task: task.cancelled() or task.exception())
        self.draw = self.prefix = None
        return True


@dataclass
class _Window:
    """A chain's upcoming steps within a stage, and how many proposals it has drawn for them."""

    slots: list[_Slot]
    draws: int = 0


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
        self.path = spend.proposal = proposal_path(model, params)
        self.kept = kept_tokens(params.proposal_top_k, model.vocab_size)
        self.proposals = 0

    async def run(self) -> list[Segment]:
        chains = [Segment([], [], [], False) for _ in range(self.decode.n)]
        for limit in _stage_limits(self.decode.max_tokens, self.params):
            # Extend every unfinished chain to the stage's length with the proposal.
            extensions = await asyncio.gather(*(
                self._launch(c, len(c.tokens), limit) if not c.ended and len(c.tokens) < limit
                else asyncio.sleep(0) for c in chains  # sleep(0) stands for "nothing to add": None
            ))
            chains = [c if z is None else c.then(z) for c, z in zip(chains, extensions)]
            windows = [_Window([]) for _ in chains]
            try:
                for step in range(self.params.mcmc_steps):
                    chains = await self._step(chains, windows, limit, self.params.mcmc_steps - step)
            finally:
                for slot in (slot for window in windows for slot in window.slots):
                    slot.discard()
        self.spend.details["acceptance_rate"] = (
            self.spend.events.get("accepted", 0) / max(self.spend.events.get("proposals", 0), 1)
        )
        return chains

    async def _step(self, chains: list[Segment], windows: list[_Window], limit: int,
                    steps_left: int) -> list[Segment]:
        for chain, window in zip(chains, windows):
            self._look_ahead(chain, window, limit, steps_left)
        proposals = await asyncio.gather(*(window.slots[0].draw for window in windows))
        self.spend.count("proposals", len(chains))
        updated = []
        for chain, window, z in zip(chains, windows, proposals):
            m = window.slots.pop(0).cut
            accept = math.log(1.0 - self.rng.random()) < log_acceptance(self.params.power_alpha, chain, z, m)
            if accept:
                self.spend.count("accepted")
                chain = Segment(chain.tokens[:m], chain.logp[:m], chain.logq[:m], False).then(z)
            updated.append(chain)
        return updated

    def _look_ahead(self, chain: Segment, window: _Window, limit: int, steps_left: int) -> None:
        """Bring the chain's next `lookahead` steps (at most `steps_left`) up to date with the chain
        as it is now (docs/samplers.md, power_mcmc, "look-ahead"): an index drawn for another length is drawn
        again, and a proposal whose prefix has changed is discarded, its index kept. Then the next
        step gets a proposal if it has none, and the later ones while the stage's budget of draws
        (two per step) still leaves one for every remaining step should all held ahead be
        discarded."""
        length = len(chain.tokens)
        for slot in window.slots:
            if slot.length != length:
                slot.cut, slot.length = self.rng.randrange(length), length
                stale = True
            else:
                stale = slot.prefix is not None and chain.tokens[:slot.cut] != slot.prefix
            if stale and slot.discard():
                self.spend.count("discarded")
        while len(window.slots) < min(self.params.lookahead, steps_left):
            window.slots.append(_Slot(self.rng.randrange(length), length))
        budget = _draws_per_stage(self.params)
        for i, slot in enumerate(window.slots):
            if slot.draw is None and (i == 0 or window.draws + steps_left <= budget):
                slot.draw, slot.prefix = self._launch(chain, slot.cut, limit), chain.tokens[:slot.cut]
                window.draws += 1

    def _launch(self, chain: Segment, m: int, limit: int) -> asyncio.Task:
        """Start drawing a suffix after chain[:m] from the proposal, up to `limit` tokens in all.
        The random choices are made here, in call order, so that a seeded run is reproducible."""
        self.proposals += 1
        params = DecodeParams(
            max_tokens=limit - m,
            temperature=_proposal_temperature(self.params),
            top_k=self.kept if self.kept < self.model.vocab_size else 0,
            seed=None if self.decode.seed is None else self.rng.randrange(2**31),
            stop_token_ids=self.decode.stop_token_ids,
            ignore_eos=self.decode.ignore_eos,
            logprobs=alternatives_to_read(self.model, self.kept) if self.path == "one_pass" else 0,
            scheduling=self.decode.scheduling,
        )
        prefix = self.prompt + chain.tokens[:m]
        return asyncio.create_task(self._propose(prefix, params, f"{self.request_id}-p{self.proposals}"))

    async def _propose(self, prefix: list[int], params: DecodeParams, request_id: str) -> Segment:
        """A suffix after `prefix` drawn with `params`, with its log p and log q."""
        [draw] = await complete(self.model, prefix, params, request_id, self.spend)
        tokens = draw.token_ids
        if self.path == "base":
            logp = logq = draw.logprobs
        elif self.path == "scored":
            logq = draw.logprobs
            logp = [t.logprob for t in await self.model.score(prefix + tokens, len(prefix), f"{request_id}-score",
                                                              self.spend, scheduling=params.scheduling)]
        else:
            logp = draw.logprobs
            logq = self._log_q(logp, draw.alternatives)
            if None in logq:
                logq = await rescored_log_q(self.model, prefix, tokens, self.kept,
                                            1.0 / _proposal_temperature(self.params), request_id, self.spend,
                                            params.scheduling)
        return Segment(tokens, logp, logq, ended=draw.ended, stop_reason=draw.stop_reason)

    def _log_q(self, logp: list[float], alternatives: list[list[float]]) -> list[float | None]:
        exponent = 1.0 / _proposal_temperature(self.params)
        return [truncated_log_q(lp, alts, self.kept, exponent, self.model.vocab_size)
                for lp, alts in zip(logp, alternatives)]
