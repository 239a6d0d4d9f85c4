"""power_scalable against exact laws on a tiny random Llama, through the real vLLM engine.

The model and prompt are those of the power_mcmc test (conftest's `tiny`): 3 tokens, completions
of at most 3 tokens, 15 outcomes. At token level every token is a candidate and rollouts run to the
end, so the only approximation left is the finite number of rollouts M. The law of the algorithm at
a given M (the expected candidate probabilities at each prefix, multiplied along a completion) is
computed by Monte Carlo over the rollouts with `candidate_probabilities`, whose arithmetic
tests/test_power_scalable_math.py checks by hand; the engine's draws must follow that law, and the
law must approach p^alpha as M grows. Both proposals are tested: rollouts from p weighed by
p^(alpha-1) ('base'), and rollouts at temperature 1/alpha weighed by p^alpha / q ('tempered'; the
tiny vocabulary of 3 is within its top-16, so nothing is truncated).

Every assertion on draws allows the McDiarmid noise bound of tiny_models.noise_bound (failure
probability 1e-4 each) plus the reference's own Monte Carlo error bound.
"""

import functools
from collections import Counter

import pytest

from harness import tiny_models as tm
from samplers import DecodeParams
from samplers.power_scalable import PowerScalableParams, PowerScalableSampler

ALPHA = 4.0
MAX_TOKENS = tm.MAX_TOKENS
FAILURE_PROBABILITY = 1e-4
REFERENCE_REPS = 200_000


@pytest.fixture(scope="module")
def target(tiny):
    return tm.power_distribution(tiny[1], MAX_TOKENS, ALPHA)


@pytest.fixture(scope="module")
def law_of(tiny):
    """The law of the token-level algorithm at M rollouts, and its Monte Carlo error bound."""
    return functools.cache(lambda rollouts, jackknife, proposal="base": tm.scalable_distribution(
        tiny[1], MAX_TOKENS, ALPHA, rollouts, jackknife, REFERENCE_REPS, proposal=proposal))


def draw(engine, samples: int, **params) -> tuple[dict, list]:
    results = engine.draw(PowerScalableSampler(), samples, DecodeParams(max_tokens=MAX_TOKENS),
                          PowerScalableParams(power_alpha=ALPHA, **params))
    counts = Counter(tuple(choice.token_ids) for choices, _ in results for choice in choices)
    assert sum(counts.values()) == samples
    return {y: c / samples for y, c in counts.items()}, results


def token_level(rollouts: int, jackknife: bool, proposal: str = "base") -> dict:
    return dict(block_size=1, candidates=len(tm.VOCAB), rollouts=rollouts, jackknife=jackknife,
                rollout_horizon=MAX_TOKENS, proposal=proposal)


def test_token_level_matches_power_distribution(tiny_engine, tiny, target, law_of):
    law, reference_error = law_of(8, True)
    bias = tm.total_variation(law, target)  # what 8 rollouts with the jackknife leave (~0.002)
    samples = 1024
    bound = bias + reference_error + tm.noise_bound(target, samples, FAILURE_PROBABILITY)
    empirical, results = draw(tiny_engine, samples, **token_level(8, jackknife=True))
    assert tm.total_variation(empirical, target) < bound
    low_temperature = tm.tempered_distribution(tiny[1], MAX_TOKENS, 1 / ALPHA)
    # The test can tell: temperature 1/alpha, the per-token sharpening, is far outside the bound.
    assert tm.total_variation(low_temperature, target) > 2 * bound
    assert tm.total_variation(empirical, low_temperature) > bound

    spend = results[0][1]
    decisions = sum(len(choice.token_ids) for choice in results[0][0])
    assert spend.events["decisions"] == decisions
    # Rollouts follow "a" and "b" wherever a token can still come after them: 2 x 8 per decision
    # before the last position.
    assert 0 < spend.events["rollouts"] <= 16 * decisions and spend.events["rollouts"] % 8 == 0
    assert spend.scored == 0  # every log p comes from the engine's temperature-1 decoding
    # One probe per choice at its start; every later decision read its candidates from the chosen
    # candidate's rollouts.
    assert spend.events["probes"] == len(results[0][0]) < decisions
    assert 0 < len(spend.details["rollout_ess"]) <= decisions


def test_tempered_token_level_follows_its_law_and_nears_the_target(tiny_engine, target, law_of):
    """Rollouts at temperature 1/alpha weighed exactly: the engine's draws follow the algorithm's law
    at M = 1, and the law nears p^alpha as M grows (reference numbers: TV 0.024, 0.019, 0.0075 at
    M = 1, 2, 8 and 0.0017 with the jackknife at 8), closer at each M than the base proposal's
    (0.18, 0.084, 0.016)."""
    def bias(rollouts: int, jackknife: bool, proposal: str) -> float:
        return tm.total_variation(law_of(rollouts, jackknife, proposal)[0], target)

    tempered = [bias(m, False, "tempered") for m in (1, 2, 8)]
    assert tempered[0] > tempered[1] > tempered[2]
    assert all(bias(m, False, "base") > t for m, t in zip((1, 2, 8), tempered))
    assert bias(8, True, "tempered") < tempered[2]

    law, reference_error = law_of(1, False, "tempered")
    samples = 1024
    empirical, results = draw(tiny_engine, samples, **token_level(1, jackknife=False, proposal="tempered"))
    assert tm.total_variation(empirical, law) < reference_error + tm.noise_bound(law, samples, FAILURE_PROBABILITY)
    spend = results[0][1]
    assert spend.scored == 0  # log q and log Z_t came from the decoding pass
    assert spend.events["zeta_estimates"] >= spend.events["zeta_degenerate"] >= 0
    assert all(1.0 <= ess <= 1.0 + 1e-9 for ess in spend.details["rollout_ess"])  # one rollout: ESS 1


@pytest.mark.parametrize("rollouts, jackknife, samples", [(1, False, 2048), (2, False, 1024), (2, True, 1024)])
def test_draws_follow_the_algorithms_law_at_each_rollout_count(tiny_engine, law_of, rollouts, jackknife, samples):
    law, reference_error = law_of(rollouts, jackknife)
    empirical, _ = draw(tiny_engine, samples, **token_level(rollouts, jackknife))
    assert tm.total_variation(empirical, law) < reference_error + tm.noise_bound(law, samples,
                                                                                FAILURE_PROBABILITY)


def test_error_falls_with_rollouts_and_the_jackknife_helps(tiny_engine, target, law_of):
    def bias(rollouts: int, jackknife: bool) -> float:
        return tm.total_variation(law_of(rollouts, jackknife)[0], target)

    # Reference numbers: M=1 0.18, M=2 0.084 (0.013 with the jackknife), M=8 0.016 (0.002).
    plain = [bias(m, False) for m in (1, 2, 8)]
    assert plain[0] > plain[1] > plain[2]
    assert bias(2, True) < plain[1] / 4
    assert bias(8, True) < plain[2] / 4
    # Through the engine, one rollout is visibly off target where eight with the jackknife were
    # not: its draws sit further from p^alpha than the first test's bound for the same count.
    samples = 2048
    empirical, _ = draw(tiny_engine, samples, **token_level(1, jackknife=False))
    assert tm.total_variation(empirical, target) > bias(8, True) + tm.noise_bound(target, samples,
                                                                                FAILURE_PROBABILITY)


@pytest.mark.parametrize("weighting", ["importance", "power", "tempered"])
def test_block_choice_follows_its_law(tiny_engine, tiny, target, weighting):
    """One block of the whole completion: 32 draws, every distinct one a candidate, weighed as
    drawn. Draws from p with importance weights tend to p^alpha (TV 0.0045 at 32 draws), with the
    paper's p^alpha weights to p^(alpha+1) (0.035 from p^alpha). Tempered draws weighed by
    p^alpha / q tend to p^alpha too, but slowly here: p^alpha puts 0.41 on ending at once, which
    temperature 1/alpha, sharpening each token alone, draws 2% of the time (TV 0.12 at 32 draws,
    0.018 at 256)."""
    def law(weighting: str, draws: int = 32) -> tuple[dict, float]:
        return tm.block_choice_distribution(tiny[1], MAX_TOKENS, ALPHA, draws, weighting, REFERENCE_REPS)

    choice_law, reference_error = law(weighting)
    samples = 1024
    proposal = dict(proposal="tempered") if weighting == "tempered" else dict(proposal="base",
                                                                               block_weighting=weighting)
    empirical, _ = draw(tiny_engine, samples, block_size=MAX_TOKENS, candidate_blocks=32,
                        candidates=len(tm.completions(MAX_TOKENS)), **proposal)
    assert tm.total_variation(empirical, choice_law) < reference_error + tm.noise_bound(choice_law, samples,
                                                                                      FAILURE_PROBABILITY)
    if weighting == "importance":
        assert tm.total_variation(choice_law, target) < 0.01
    elif weighting == "tempered":
        assert tm.total_variation(law(weighting, 256)[0], target) < tm.total_variation(choice_law, target) / 4
    else:
        assert tm.total_variation(choice_law, tm.power_distribution(tiny[1], MAX_TOKENS, ALPHA + 1)) < \
            tm.total_variation(choice_law, target)
