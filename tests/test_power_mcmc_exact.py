"""power_mcmc against the exact p^alpha of a tiny random Llama, through the real vLLM engine.

The model (tests/tiny_models.py) has 3 tokens and completions of at most 3 tokens: 15 outcomes
whose probabilities are computed exactly, as is the law of the chain after a given number of
steps (its 15 x 15 transition kernel). EOS carries about half of p^alpha's mass, so completions
of different lengths compete and the length term matters.
"""

import math
import uuid
from collections import Counter, defaultdict

import pytest

from samplers import DecodeParams
from samplers.power_mcmc import PowerMCMCParams, PowerMCMCSampler
from tests import tiny_models as tm

ALPHA = 4.0
MAX_TOKENS = 3
STEPS = 30
CHAINS = 1024
# A chosen model: p, temperature 1/alpha and the chain without the length term are all far from
# p^alpha (TV 0.39, 0.45 and 0.22), while EOS holds half its mass.
SEED, SHARPNESS, EOS_TILT = 0, 12.0, 1.0
FAILURE_PROBABILITY = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tm.build(tmp_path_factory.mktemp("tiny"), SEED, SHARPNESS, EOS_TILT)
    return directory, tm.next_token_logprobs(directory, tm.PROMPT, MAX_TOKENS)


@pytest.fixture(scope="module")
def drawer(tiny):
    drawer = tm.TinyEngine(tiny[0])
    yield drawer
    drawer.close()


def test_chain_matches_exact_power_distribution(drawer, tiny):
    _, table = tiny
    target = tm.power_distribution(table, MAX_TOKENS, ALPHA)
    chain_law = tm.mcmc_distribution(table, MAX_TOKENS, ALPHA, STEPS)
    without_length_term = tm.mcmc_distribution(table, MAX_TOKENS, ALPHA, STEPS, length_term=False)
    plain = tm.tempered_distribution(table, MAX_TOKENS, 1.0)
    low_temperature = tm.tempered_distribution(table, MAX_TOKENS, 1 / ALPHA)

    results = drawer.draw(PowerMCMCSampler(), CHAINS, DecodeParams(max_tokens=MAX_TOKENS),
                          PowerMCMCParams(power_alpha=ALPHA, mcmc_steps=STEPS, block_size=MAX_TOKENS,
                                   proposal_temperature=1.0))
    counts = Counter(tuple(d.token_ids) for deltas, _ in results for d in deltas)
    assert sum(counts.values()) == CHAINS
    empirical = {y: c / CHAINS for y, c in counts.items()}

    bias = tm.total_variation(chain_law, target)  # what STEPS steps leave of the start (~1e-4)
    bound = bias + tm.noise_bound(target, CHAINS, FAILURE_PROBABILITY)
    assert tm.total_variation(empirical, target) < bound
    # The test has the power to tell: every wrong sampler is further than the bound, and would
    # be with the same probability.
    for wrong in (without_length_term, plain, low_temperature):
        assert tm.total_variation(wrong, target) > 2 * bound
        assert tm.total_variation(empirical, wrong) > bound
    spend = results[0][1]
    assert spend.events["proposals"] == 64 * STEPS
    assert spend.scored == 0  # q = p: nothing to score
    assert 0 < spend.events["accepted"] < spend.events["proposals"]


def test_stored_log_p_and_log_q_are_exact(drawer, tiny):
    """With a tempered, top-k proposal the chain's log p comes from scoring and log q from the
    engine's processed logprobs; both equal the float64 reference."""
    _, table = tiny
    [(deltas, spend)] = drawer.draw(PowerMCMCSampler(), 64, DecodeParams(max_tokens=MAX_TOKENS, top_k=2, logprobs=0),
                                    PowerMCMCParams(power_alpha=ALPHA, mcmc_steps=2, block_size=1))
    for delta in deltas:
        for t, entry in enumerate(delta.logprobs):
            assert entry.logprob == pytest.approx(table[tuple(delta.token_ids[:t])][entry.token_id], abs=1e-4)
    assert spend.scored > 0

    async def proposals() -> dict[int, list]:
        decode = DecodeParams(max_tokens=MAX_TOKENS, temperature=0.25, top_k=2, logprobs=0, n=16)
        by_choice = defaultdict(list)
        async for batch in drawer.model.decode(tm.PROMPT, decode, uuid.uuid4().hex):
            for delta in batch:
                by_choice[delta.index] += delta.logprobs
        return by_choice

    for entries in drawer.run(proposals()).values():
        prefix = ()
        for entry in entries:
            row = table[prefix] / 0.25
            kept = sorted(row, reverse=True)[:2]  # top-k = 2 renormalises over the two best
            log_q = row[entry.token_id] - math.log(sum(map(math.exp, kept)))
            assert entry.logprob == pytest.approx(log_q, abs=1e-4)
            prefix += (entry.token_id,)
