"""power_smc against exact laws on the tiny random Llama, through the real vLLM engine.

The model and prompt are those of the power_mcmc test (conftest's `tiny`): 3 tokens, completions
of at most 3 tokens, 15 outcomes. Sequential Monte Carlo with N particles is consistent: its law
approaches p^alpha as N grows, but at a finite N it is its own law, which tiny_models.smc_distribution
simulates on the exact next-token table (the engine plays no part there). The engine's draws must
follow that law; with one particle it is the proposal's, temperature 1/alpha, far from p^alpha.

Every assertion on draws allows the McDiarmid noise bound of tiny_models.noise_bound (failure
probability 1e-4 each) plus the simulated law's own Monte Carlo error bound.
"""

import functools
from collections import Counter

import pytest

from harness import tiny_models as tm
from samplers import DecodeParams
from samplers import power_smc
from samplers.power_smc import PowerSMCParams, PowerSMCSampler

ALPHA = 4.0
MAX_TOKENS = tm.MAX_TOKENS
FAILURE_PROBABILITY = 1e-4
REFERENCE_REPS = 100_000
RUNS = 1024


@pytest.fixture(scope="module")
def target(tiny):
    return tm.power_distribution(tiny[1], MAX_TOKENS, ALPHA)


@pytest.fixture(scope="module")
def law_of(tiny):
    """power_smc's law at N particles and an ESS threshold, and its Monte Carlo error bound."""
    return functools.cache(lambda particles, threshold: tm.smc_distribution(
        tiny[1], MAX_TOKENS, ALPHA, particles, threshold, REFERENCE_REPS))


def draw(engine, table: dict, particles: int, threshold: float) -> tuple[dict, list]:
    """RUNS completions; each one's streamed pieces must join into it, and its log p be the model's."""
    params = PowerSMCParams(power_alpha=ALPHA, particles=particles, ess_threshold=threshold, proposal_top_k=0)
    results = engine.draw(PowerSMCSampler(), RUNS, DecodeParams(max_tokens=MAX_TOKENS, logprobs=0), params)
    for choices, _ in results:
        for choice in choices:
            for t, entry in enumerate(choice.logprobs):
                assert entry.logprob == pytest.approx(table[tuple(choice.token_ids[:t])][entry.token_id], abs=1e-4)
    counts = Counter(tuple(choice.token_ids) for choices, _ in results for choice in choices)
    assert sum(counts.values()) == RUNS
    return {y: c / RUNS for y, c in counts.items()}, results


def test_the_law_approaches_the_power_distribution_as_particles_grow(target, law_of):
    distances = [tm.total_variation(law_of(n, 0.5)[0], target) for n in (1, 4, 16, 64)]
    # Each step's fall (0.10, 0.15, 0.13) dwarfs the simulations' errors (0.009 each).
    assert all(a - b > 2 * 0.01 for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] < 0.08


def test_one_particle_is_the_proposal(tiny_engine, tiny, target):
    _, table = tiny
    empirical, results = draw(tiny_engine, table, 1, 0.5)
    proposal = tm.tempered_distribution(table, MAX_TOKENS, 1 / ALPHA)
    bound = tm.noise_bound(proposal, RUNS, FAILURE_PROBABILITY)
    assert tm.total_variation(empirical, proposal) < bound
    assert tm.total_variation(proposal, target) > 2 * bound  # and the proposal is far from p^alpha
    assert results[0][1].events["resamplings"] == 0  # one particle's ESS is always N


PARTICLES = 16


@pytest.mark.parametrize("threshold, chunk", [(0.5, power_smc.CHUNK), (1.0, 1)])
def test_particles_follow_the_algorithms_law(tiny_engine, tiny, law_of, monkeypatch, threshold, chunk):
    """16 particles follow the law the simulation gives, 0.19 from p^alpha and 0.26 from the
    proposal's (the bound is about 0.10). With the default chunk a particle's one request decodes all three tokens,
    mostly before the first check: this checks the weights of tokens drawn ahead of the checks.
    With chunks of one token the particles wait for each check, and at threshold 1 every check
    whose weights differ resamples, so copies and drops happen."""
    monkeypatch.setattr(power_smc, "CHUNK", chunk)
    _, table = tiny
    law, reference_error = law_of(PARTICLES, threshold)
    empirical, results = draw(tiny_engine, table, PARTICLES, threshold)
    bound = reference_error + tm.noise_bound(law, RUNS, FAILURE_PROBABILITY)
    assert tm.total_variation(empirical, law) < bound
    proposal = tm.tempered_distribution(table, MAX_TOKENS, 1 / ALPHA)
    assert tm.total_variation(law, proposal) > 2 * bound
    spend = results[0][1]
    assert spend.scored == 0  # log Z_t comes from the decoding pass
    if threshold == 1.0:
        resamplings = spend.events["resamplings"]
        assert resamplings > 0 and len(spend.details["ess_at_resampling"]) == resamplings
        assert spend.events["particles"] > 64 * PARTICLES  # copies are new particles
