"""The one-pass proposal's densities, shared by power_mcmc and power_smc (docs/samplers.md, power_mcmc,
"the one-pass proposal", and power_smc).

A token drawn with probability proportional to p^exponent among the K most likely tokens at its
position has log q = exponent * log p(y) - log Z, where Z = sum over the kept tokens v of
p(v)^exponent. An engine in raw_logprobs mode (vLLM's default) reports the drawn token's log p and
the log p of the most likely tokens there, so log q and log Z follow from the decoding pass itself,
with nothing scored.
"""

import math

from samplers.base import InvalidRequest, LanguageModel, Scheduling, Spend


def kept_tokens(top_k: int, vocab_size: int) -> int:
    """The proposal's K: `top_k`, the whole vocabulary when 0 (untruncated)."""
    return vocab_size if top_k == 0 else min(top_k, vocab_size)


def truncated_log_q(logp: float, alternatives: list[float], k: int, exponent: float,
                    vocab_size: int) -> float | None:
    """log q of a token drawn with probability proportional to p^exponent among the k most likely
    tokens at its position, from its own log p and the log p of the most likely tokens there
    (`alternatives`, highest first, at least k of them).

    vLLM keeps every token whose logit reaches the k-th largest, so a tie at the k-th value keeps
    more than k; the kept set is known once an alternative falls below that value (or all the
    vocabulary is there). None when it is not: every alternative reported ties with the k-th.
    """
    kth = alternatives[k - 1]
    if len(alternatives) < vocab_size and alternatives[-1] >= kth:
        return None
    kept = [exponent * value for value in alternatives if value >= kth]
    top = max(kept)
    return exponent * logp - top - math.log(sum(math.exp(value - top) for value in kept))


def check_alternatives_reported(model: LanguageModel, kept: int, reader: str, advice: str = "") -> None:
    """Refuse a proposal whose K = `kept` tokens the engine cannot report with one more beside them
    (or the whole vocabulary), which `truncated_log_q` needs to see where the kept set ends."""
    if kept >= model.max_logprobs and model.vocab_size > model.max_logprobs:
        raise InvalidRequest(
            f"{reader} reads more than its K = {kept} most likely tokens at each position (all of them when "
            f"untruncated), beyond this server's --max-logprobs ({model.max_logprobs}). Set proposal_top_k "
            f"below {model.max_logprobs}{advice}.", param="proposal_top_k")


class RescoreBudget:
    """The ties one run may rescore within its cost bound; a run that needs more fails rather than
    break the bound (an unresolved tie comes about once in ten thousand tokens with bf16 logits)."""

    def __init__(self, limit: int):
        self.left = limit

    def take(self) -> None:
        if self.left == 0:
            raise InvalidRequest("More ties at the proposal's top-k cut than this request's cost bound "
                                 "allows rescoring; choose another proposal_top_k.", param="proposal_top_k")
        self.left -= 1


def alternatives_to_read(model: LanguageModel, kept: int) -> int:
    """Alternatives to read per position: twice K as the engine allows, so that a tie at the K-th
    value is almost always seen to its end (`truncated_log_q`); as many as it allows where a wider
    tie cannot be rescored (bf16 logits tied past 2K = 32 alternatives once in 160 proposals of
    the power_mcmc benchmarks in docs/benchmarks.md)."""
    wanted = 2 * kept if model.can_score else model.vocab_size
    return min(wanted, model.vocab_size, model.max_logprobs)


async def rescored_log_q(model: LanguageModel, prefix: list[int], tokens: list[int], kept: int, exponent: float,
                         request_id: str, spend: Spend, scheduling: Scheduling) -> list[float]:
    """log q of tokens drawn after `prefix` where a tie ran past the alternatives the pass reported:
    score them with as many alternatives as the engine allows."""
    spend.count("ties_rescored")
    if not model.can_score:
        raise InvalidRequest(
            f"A tie among more than {alternatives_to_read(model, kept)} tokens at the proposal's top-k cut "
            "needs scoring, which this engine cannot do while it serves distilled models; choose another "
            "proposal_top_k.", param="proposal_top_k")
    count = min(model.max_logprobs, model.vocab_size)
    scored = await model.score(prefix + tokens, len(prefix), f"{request_id}-ties", spend, count, scheduling)
    log_q = [truncated_log_q(t.logprob, [a.logprob for a in t.top], kept, exponent, model.vocab_size)
             for t in scored]
    if None in log_q:
        raise InvalidRequest(f"A tie among more than {count} tokens at the proposal's top-k cut: its density "
                             "cannot be computed; choose another proposal_top_k.", param="proposal_top_k")
    return log_q
