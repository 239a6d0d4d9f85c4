"""The Metropolis-Hastings acceptance ratio of power_mcmc on hand-computed cases."""

import math

import pytest

from samplers.power_mcmc import Segment, log_acceptance

pytestmark = pytest.mark.fast  # needs no engine: `make test-fast`

EOS = 2


def segment(logp, logq, ended=False):
    return Segment(list(range(len(logp))), list(logp), list(logq), ended)


def test_equal_lengths():
    current = segment([-1.0, -2.0, -0.5], [-0.7, -1.0, -0.2])
    proposal = segment([-0.1, -0.3], [-0.4, -0.6])  # replaces tokens 1 and 2
    # alpha (log p(z) - log p(y>=1)) + (log q(y>=1) - log q(z)) + log(3 / 3)
    expected = 4 * ((-0.4) - (-2.5)) + ((-1.2) - (-1.0)) + 0.0
    assert log_acceptance(4.0, current, proposal, m=1) == pytest.approx(expected)


def test_eos_shortens_the_proposal():
    current = segment([-0.2, -0.3, -0.4, -0.5], [-0.1, -0.2, -0.3, -0.4])
    proposal = segment([-1.5], [-0.9], ended=True)  # an EOS right after y_<2: L' = 3
    expected = 2 * ((-1.5) - (-0.9)) + ((-0.7) - (-0.9)) + math.log(4 / 3)
    assert log_acceptance(2.0, current, proposal, m=2) == pytest.approx(expected)


def test_eos_ended_state_grows_back():
    current = segment([-0.5, -2.0], [-0.4, -1.0], ended=True)  # "x EOS", L = 2
    proposal = segment([-0.2, -0.2, -0.3], [-0.3, -0.1, -0.2])  # from m = 1: L' = 4
    expected = 4 * ((-0.7) - (-2.0)) + ((-1.0) - (-0.6)) + math.log(2 / 4)
    assert log_acceptance(4.0, current, proposal, m=1) == pytest.approx(expected)


@pytest.mark.parametrize("alpha", [1.0, 4.0])
def test_detailed_balance_between_unequal_lengths(alpha):
    """pi(y) (1/L) q(z) min(1, A) = pi(y') (1/L') q(y_>=m) min(1, A'), pi = p^alpha: the chain is
    reversible with respect to p^alpha only with the log(L / L') term."""
    m = 1
    y = segment([-0.5, -2.0], [-0.4, -1.0], ended=True)
    z = segment([-0.2, -0.2, -0.3], [-0.3, -0.1, -0.2])
    y_new = Segment(y.tokens[:m], y.logp[:m], y.logq[:m], False).then(z)
    back = y.suffix(m)

    def flux(state, suffix):
        forward = log_acceptance(alpha, state, suffix, m)
        return alpha * sum(state.logp) - math.log(len(state.tokens)) + sum(suffix.logq) + min(0.0, forward)

    assert flux(y, z) == pytest.approx(flux(y_new, back))
