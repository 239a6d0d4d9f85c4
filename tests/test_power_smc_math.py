"""power_smc's arithmetic on hand-computed numbers: resampling counts, effective sample size, and
the particles' bookkeeping of tokens and weights when copied."""

import math
import random

import pytest

from samplers.power_smc import _common_prefix, _Particle, log_ess, multinomial_counts, normalised, systematic_counts

pytestmark = pytest.mark.fast  # needs no engine: `make test-fast`


def test_systematic_counts_on_hand_computed_points():
    # N w = (0.4, 0.8, 1.2, 1.6), edges 0.4, 1.2, 2.4, 4.0.
    weights = [0.1, 0.2, 0.3, 0.4]
    assert systematic_counts(weights, 0.5) == [0, 1, 1, 2]  # points 0.5, 1.5, 2.5, 3.5
    assert systematic_counts(weights, 0.1) == [1, 1, 1, 1]  # points 0.1, 1.1, 2.1, 3.1
    assert systematic_counts(weights, 0.9) == [0, 1, 1, 2]  # points 0.9, 1.9, 2.9, 3.9


def test_systematic_counts_are_n_w_on_average_and_floor_or_ceil_each_time():
    weights = [0.05, 0.3, 0.15, 0.5]
    grid = [(i + 0.5) / 1000 for i in range(1000)]  # u uniform on [0, 1), in a midpoint rule
    runs = [systematic_counts(weights, u) for u in grid]
    for i, w in enumerate(weights):
        assert sum(r[i] for r in runs) / len(runs) == pytest.approx(4 * w, abs=3e-3)
        assert {r[i] for r in runs} <= {math.floor(4 * w), math.ceil(4 * w)}
    assert all(sum(r) == 4 for r in runs)


def test_systematic_counts_survive_rounding_at_the_end():
    # Weights whose scaled sum falls short of N in floating point still place every point.
    assert sum(systematic_counts([0.1] * 10, 0.999999)) == 10


def test_multinomial_counts_sum_to_n_and_follow_the_weights():
    rng = random.Random(0)
    totals = [0, 0, 0]
    for _ in range(2000):
        counts = multinomial_counts([0.2, 0.0, 0.8], rng)
        assert sum(counts) == 3 and counts[1] == 0
        totals = [a + b for a, b in zip(totals, counts)]
    # Each of the 6000 draws lands on the first with probability 0.2: sd of its share 0.005.
    assert totals[0] / 6000 == pytest.approx(0.2, abs=0.025)


def test_effective_sample_size():
    assert math.exp(log_ess([0.0] * 8)) == pytest.approx(8)
    # Weights (1, 3): (1 + 3)^2 / (1 + 9) = 1.6, whatever their common scale.
    assert math.exp(log_ess([math.log(1) - 700, math.log(3) - 700])) == pytest.approx(1.6)
    assert math.exp(log_ess([0.0, -1e6])) == pytest.approx(1.0)
    assert normalised([math.log(1), math.log(3)]) == pytest.approx([0.25, 0.75])


def test_a_copy_takes_the_prefix_at_the_check_and_ends_only_if_its_parent_ended_within_it():
    # log Z_t per token; EOS is the third token, drawn beyond the check at 2.
    ended = _Particle(1, [5, 6, 2], [-0.1, -0.2, -0.3], [-0.5, -0.25, -0.125], ended=True, stop_reason=None)
    ahead = ended.copy(2, length=2)
    assert (ahead.tokens, ahead.log_z, ahead.ended, ahead.task) == ([5, 6], [-0.5, -0.25], False, None)
    # A particle that ended before the check stays ended, with its whole weight's terms.
    done = ended.copy(3, length=4)
    assert done.ended and done.tokens == [5, 6, 2] and sum(done.log_z) == pytest.approx(-0.875)
    assert ahead.log_weight == 0.0  # a copy starts a new generation


def test_common_prefix():
    assert _common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert _common_prefix([[1], [2]]) == 0
    assert _common_prefix([[7, 8], [7, 8]]) == 2
