"""power_scalable's candidate probabilities (zeta estimate, leave-one-out, jackknife) and the spread of
its zeta estimates, on hand-computed cases. Rollout terms are log importance weights: with the base
proposal (alpha - 1) log p(s)."""

import numpy as np
import pytest

from samplers.power_scalable import candidate_probabilities, zeta_concentration

pytestmark = pytest.mark.fast  # needs no engine: `make test-fast`

LOG = np.log


def test_zeta_estimate_and_jackknife_by_hand():
    # alpha = 2, so each rollout contributes p(s)^1. p(c) = 0.5, 0.25: base weights p^2 = 0.25, 0.0625.
    log_base = 2 * LOG([0.5, 0.25])
    rollouts = LOG([[0.5, 0.1], [0.8, 0.4]])
    # zeta_hat = 0.3, 0.6: weights 0.075, 0.0375, so p_hat = 2/3, 1/3.
    plain = candidate_probabilities(log_base, rollouts, jackknife=False)
    assert plain == pytest.approx([2 / 3, 1 / 3])
    # Leave rollout 1 out: zeta = 0.1, 0.4 -> (1/2, 1/2). Leave rollout 2 out: zeta = 0.5, 0.8 ->
    # weights 0.125, 0.05 -> (5/7, 2/7). p_JK = 2 p_hat - (1/2) (sum of the two).
    expected = [4 / 3 - (1 / 2 + 5 / 7) / 2, 2 / 3 - (1 / 2 + 2 / 7) / 2]  # 61/84, 23/84
    assert expected == pytest.approx([61 / 84, 23 / 84])
    assert candidate_probabilities(log_base, rollouts, jackknife=True) == pytest.approx(expected)


def test_negative_jackknife_estimates_are_clipped_and_renormalised():
    # Equal base weights, alpha = 2. p_hat(c1) = 0.011 / 1.012; leaving rollout 1 out gives c1
    # 0.01 / 0.011, leaving rollout 2 out 0.001 / 1.001; 2 p_hat - (1/2) (their sum) = -0.433 < 0.
    rollouts = LOG([[1.0, 0.001], [0.001, 0.01]])
    raw_c1 = 2 * 0.011 / 1.012 - (0.01 / 0.011 + 0.001 / 1.001) / 2
    assert raw_c1 == pytest.approx(-0.4333, abs=1e-4)
    assert candidate_probabilities(np.zeros(2), rollouts, jackknife=True) == pytest.approx([1.0, 0.0])


def test_nothing_left_to_roll_out_is_temperature_one_over_alpha():
    p = np.array([0.6, 0.3, 0.1])
    alpha = 4.0
    low_temperature = p**alpha / (p**alpha).sum()
    for jackknife in (False, True):
        probabilities = candidate_probabilities(alpha * LOG(p), np.zeros((3, 5)), jackknife)
        assert probabilities == pytest.approx(low_temperature)


def test_zeta_is_the_mean_of_p_to_the_alpha_minus_one():
    # When a candidate's rollouts all have the same p(s), zeta_hat is exactly p(s)^(alpha-1), and
    # the jackknife changes nothing.
    alpha = 3.0
    log_base = LOG([0.2, 0.8])
    rollouts = np.repeat(LOG([[0.5], [0.25]]), 4, axis=1)
    weights = np.array([0.2 * 0.5**2, 0.8 * 0.25**2])
    for jackknife in (False, True):
        assert candidate_probabilities(log_base, (alpha - 1) * rollouts, jackknife) == pytest.approx(
            weights / weights.sum())


def test_alpha_one_ignores_the_rollouts():
    rollouts = LOG([[0.9, 0.01], [0.02, 0.3]])
    assert candidate_probabilities(LOG([0.7, 0.3]), 0.0 * rollouts, jackknife=True) == pytest.approx([0.7, 0.3])


def test_batches_agree_with_one_at_a_time():
    rng = np.random.default_rng(0)
    log_base = rng.normal(size=(5, 3))
    rollouts = -rng.exponential(size=(5, 3, 4))
    batched = candidate_probabilities(log_base, 3 * rollouts, jackknife=True)
    for i in range(5):
        assert batched[i] == pytest.approx(candidate_probabilities(log_base[i], 3 * rollouts[i], True))
    assert batched.sum(axis=-1) == pytest.approx(np.ones(5))


def test_tiny_probabilities_do_not_underflow():
    # Rollouts of 200 tokens at log p -3 each: p(s)^(alpha-1) = e^-1800, far below float range.
    rollouts = np.array([[-600.0, -610.0], [-601.0, -605.0]])
    probabilities = candidate_probabilities(np.zeros(2), 3 * rollouts, jackknife=True)
    assert np.isfinite(probabilities).all() and probabilities.sum() == pytest.approx(1.0)
    assert probabilities[0] > probabilities[1]


def test_zeta_concentration_by_hand():
    # Terms in proportion 1:1:1:1 (every rollout counts), 3:1 (ESS 16/10 = 1.6, share 0.75) and
    # 97:1:1:1 (ESS 10000/9412, share 0.97: one rollout is the estimate).
    terms = LOG([[1, 1, 1, 1], [3, 1, 0.0 + 1e-300, 1e-300], [97, 1, 1, 1]])
    ess, largest = zeta_concentration(terms)
    assert ess == pytest.approx([4.0, 1.6, 10000 / 9412])
    assert largest == pytest.approx([0.25, 0.75, 0.97])
