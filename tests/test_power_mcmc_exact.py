"""power_mcmc against the exact p^alpha of a tiny random Llama, through the real vLLM engine.

The model (harness/tiny_models.py) has 3 tokens and completions of at most 3 tokens: 15 outcomes
whose probabilities are computed exactly, as is the law of the chain after a given number of
steps (its 15 x 15 transition kernel). EOS carries about half of p^alpha's mass, so completions
of different lengths compete and the length term matters.

Each proposal path of samplers/power_mcmc.py is checked: q = p ("base"), the tempered proposal
whose log q comes from the decoding pass's own top-k log p ("one_pass", untruncated and cut to
the top 2), with ties forced at the cut, and the processed-logprobs engine that scores its
proposals ("scored").
"""

import math
import uuid
from collections import Counter

import pytest

from harness import tiny_models as tm
from samplers import DecodeParams, Spend
from samplers.one_pass import truncated_log_q
from samplers.power_mcmc import PowerMCMCParams, PowerMCMCSampler

ALPHA = 4.0
MAX_TOKENS = tm.MAX_TOKENS
# Steps per chain: a chain's exact law after its steps enters the bound as its bias (assert_matches),
# so fewer steps cost only margin. Each test takes the fewest at which every wrong law stays more
# than 2.2 times its bound away (exact laws: base 15 steps, bias 0.004; one pass 20, bias 0.026;
# the cut and tied models 10, bias 0.05 and 0.08 against wrong laws at 0.76 and 1).
BASE_STEPS, ONE_PASS_STEPS, FAR_STEPS = 15, 20, 10
CHAINS = 1024
FAILURE_PROBABILITY = 1e-4


def run_chains(engine, table: dict, steps: int, chains: int = CHAINS, **fields) -> tuple[dict, Spend]:
    """`chains` chains of `steps` steps on one block with the given sampler fields: the empirical law of their
    completions, and one request's spend. Each final state's stored log p, which came from the
    proposal that drew it, is checked against the model's: a suffix used after a prefix other than
    the one it was drawn after would show there."""
    params = PowerMCMCParams(power_alpha=ALPHA, mcmc_steps=steps, block_size=MAX_TOKENS, **fields)
    results = engine.draw(PowerMCMCSampler(), chains, DecodeParams(max_tokens=MAX_TOKENS, logprobs=0), params)
    for deltas, _ in results:
        for delta in deltas:
            for t, entry in enumerate(delta.logprobs):
                assert entry.logprob == pytest.approx(table[tuple(delta.token_ids[:t])][entry.token_id], abs=1e-4)
    counts = Counter(tuple(d.token_ids) for deltas, _ in results for d in deltas)
    assert sum(counts.values()) == chains
    return {y: c / chains for y, c in counts.items()}, results[0][1]


def assert_matches(empirical: dict, target: dict, chain_law: dict, wrong_laws: list[dict],
                   chains: int = CHAINS) -> None:
    """TV(empirical, target) within what the chain's steps leave of the start plus sampling noise, and
    every wrong law more than twice that far from the target (the test could tell them apart)."""
    bias = tm.total_variation(chain_law, target)
    bound = bias + tm.noise_bound(target, chains, FAILURE_PROBABILITY)
    assert tm.total_variation(empirical, target) < bound
    for wrong in wrong_laws:
        assert tm.total_variation(wrong, target) > 2 * bound
        assert tm.total_variation(empirical, wrong) > bound


def test_chain_matches_exact_power_distribution(tiny_engine, tiny):
    _, table = tiny
    target = tm.power_distribution(table, MAX_TOKENS, ALPHA)
    empirical, spend = run_chains(tiny_engine, table, BASE_STEPS, proposal_temperature=1.0, proposal_top_k=0)
    assert_matches(empirical, target, tm.mcmc_distribution(table, MAX_TOKENS, ALPHA, BASE_STEPS), [
        tm.mcmc_distribution(table, MAX_TOKENS, ALPHA, BASE_STEPS, length_term=False),
        tm.tempered_distribution(table, MAX_TOKENS, 1.0),
        tm.tempered_distribution(table, MAX_TOKENS, 1 / ALPHA)])
    assert spend.proposal == "base" and spend.scored == 0  # q = p: nothing to score
    assert spend.events["proposals"] == 64 * BASE_STEPS
    assert 0 < spend.events["accepted"] < spend.events["proposals"]


# The one-pass tests draw at proposal temperature 1/2: at 1/alpha this chain needs far more than
# 30 steps to forget its start (TV 0.21 left after 30, against 0.008 at 1/2 and 0.026 after its 20).
PROPOSAL_TEMPERATURE = 0.5
# A second model, for the cut to the top 2: there p^alpha cut to each position's top 2 is far
# from p^alpha (TV 0.76), so the test can tell the two targets apart.
CUT_SEED, CUT_SHARPNESS, CUT = 1, 4.0, 2
CUT_CHAINS = 512  # the two targets are far apart: half the chains tell them apart (bound 0.12)


@pytest.fixture(scope="module")
def cut_model(tmp_path_factory):
    directory = tm.build(tmp_path_factory.mktemp("cut"), CUT_SEED, CUT_SHARPNESS, tm.EOS_TILT)
    return directory, tm.next_token_logprobs(directory, tm.PROMPT, MAX_TOKENS)


def test_one_pass_proposal_matches_power_distribution(tiny_engine, tiny):
    """A tempered, untruncated proposal (K = 0: every token is among the alternatives the pass
    reports) targets p^alpha with log q from the pass itself: nothing is scored."""
    _, table = tiny
    target = tm.power_distribution(table, MAX_TOKENS, ALPHA)
    chain_law = tm.mcmc_distribution(table, MAX_TOKENS, ALPHA, ONE_PASS_STEPS, PROPOSAL_TEMPERATURE)
    empirical, spend = run_chains(tiny_engine, table, ONE_PASS_STEPS, proposal_top_k=0,
                                  proposal_temperature=PROPOSAL_TEMPERATURE)
    assert_matches(empirical, target, chain_law, [tm.tempered_distribution(table, MAX_TOKENS, PROPOSAL_TEMPERATURE)])
    assert spend.proposal == "one_pass" and spend.scored == 0
    assert 0 < spend.events["accepted"] < spend.events["proposals"]


LOOKAHEAD = 4


def test_look_ahead_keeps_the_chain_exact(tiny_engine, tiny):
    """Proposals drawn LOOKAHEAD steps ahead, used only where the chain's length and the prefix at
    their index are unchanged (and drawn again where not), leave each step's law as it was: the
    chain's law after its steps is the one-step-at-a-time chain's. Here accepted moves change the
    prefix or the length often (EOS holds half the mass), so both kinds of redraw happen."""
    _, table = tiny
    target = tm.power_distribution(table, MAX_TOKENS, ALPHA)
    chain_law = tm.mcmc_distribution(table, MAX_TOKENS, ALPHA, ONE_PASS_STEPS, PROPOSAL_TEMPERATURE)
    empirical, spend = run_chains(tiny_engine, table, ONE_PASS_STEPS, proposal_top_k=0,
                                  proposal_temperature=PROPOSAL_TEMPERATURE, lookahead=LOOKAHEAD)
    assert_matches(empirical, target, chain_law, [tm.tempered_distribution(table, MAX_TOKENS, PROPOSAL_TEMPERATURE)])
    used, discarded = spend.events["proposals"], spend.events["discarded"]
    assert used == 64 * ONE_PASS_STEPS and 0 < discarded <= used  # a budget of two draws per step


def test_one_pass_proposal_cut_to_the_top_k_matches_its_target(cut_model):
    """Cut to the top 2, the target is p^alpha over the completions made of each position's top 2."""
    directory, table = cut_model
    engine = tm.TinyEngine(directory)
    try:
        empirical, spend = run_chains(engine, table, FAR_STEPS, CUT_CHAINS, proposal_top_k=CUT,
                                      proposal_temperature=PROPOSAL_TEMPERATURE)
    finally:
        engine.close()
    target = tm.power_distribution(table, MAX_TOKENS, ALPHA, CUT)
    chain_law = tm.mcmc_distribution(table, MAX_TOKENS, ALPHA, FAR_STEPS, PROPOSAL_TEMPERATURE, top_k=CUT)
    assert_matches(empirical, target, chain_law, [tm.power_distribution(table, MAX_TOKENS, ALPHA)], CUT_CHAINS)
    assert spend.proposal == "one_pass" and spend.scored == 0


def test_raw_logprobs_and_computed_log_q_are_exact(tiny_engine, tiny):
    """The engine's raw log p of the drawn token and of its alternatives, and the log q computed
    from them for a draw at temperature 1/4 cut to the top 2, equal a float64 forward pass."""
    _, table = tiny

    async def draws() -> list:
        decode = DecodeParams(max_tokens=MAX_TOKENS, temperature=0.25, top_k=2, logprobs=3, n=16)
        by_choice: dict[int, list] = {}
        async for batch in tiny_engine.model.decode(tm.PROMPT, decode, uuid.uuid4().hex, Spend()):
            for delta in batch:
                by_choice.setdefault(delta.index, []).extend(delta.logprobs)
        return list(by_choice.values())

    for entries in tiny_engine.run(draws()):
        prefix = ()
        for entry in entries:
            row = table[prefix]
            assert entry.logprob == pytest.approx(row[entry.token_id], abs=1e-4)
            assert [a.logprob for a in entry.top] == pytest.approx(sorted(row, reverse=True), abs=1e-4)
            log_q = truncated_log_q(entry.logprob, [a.logprob for a in entry.top], 2, 4.0, len(row))
            expected = tm.sequence_logprob(table, prefix + (entry.token_id,), 0.25, 2) - \
                tm.sequence_logprob(table, prefix, 0.25, 2)
            assert log_q == pytest.approx(expected, abs=1e-4)
            prefix += (entry.token_id,)


# A third model, whose "b" and EOS tie exactly everywhere and lead at 4 of its 7 positions.
TIED_SEED, TIED_SHARPNESS, TIED_TILT = 6, 3.0, 0.0
TIED_CHAINS = 256  # against a wrong law at TV about 1, a bound of 0.14 is plenty


def test_a_tie_at_the_cut_stays_exact(tmp_path):
    """With K = 1 the engine keeps both tied tokens wherever they lead, more than K. There the
    two alternatives the pass reports (2K) tie, the cut's end is unseen, and the proposal is
    scored for more alternatives. The chain still targets p^alpha over what the cut keeps (3
    completions), not the single completion a strict top 1 would keep."""
    directory = tm.build(tmp_path, TIED_SEED, TIED_SHARPNESS, TIED_TILT, eos_ties_b=True)
    table = tm.next_token_logprobs(directory, tm.PROMPT, MAX_TOKENS)
    tied = [prefix for prefix, row in table.items() if tm.kept(row, 1).sum() > 1]
    engine = tm.TinyEngine(directory)
    try:
        async def alternatives_at(prefix: tuple) -> list[float]:
            entries = []
            async for batch in engine.model.decode(tm.PROMPT + list(prefix), DecodeParams(max_tokens=1, logprobs=3),
                                                   uuid.uuid4().hex, Spend()):
                entries += batch[0].logprobs
            return [a.logprob for a in entries[0].top]

        alternatives = engine.run(alternatives_at(tied[0]))
        empirical, spend = run_chains(engine, table, FAR_STEPS, TIED_CHAINS, proposal_top_k=1,
                                      proposal_temperature=PROPOSAL_TEMPERATURE)
    finally:
        engine.close()
    assert alternatives[0] == alternatives[1]  # exactly: the engine's logits tie too
    target = tm.power_distribution(table, MAX_TOKENS, ALPHA, 1)
    chain_law = tm.mcmc_distribution(table, MAX_TOKENS, ALPHA, FAR_STEPS, PROPOSAL_TEMPERATURE, top_k=1)
    greedy = ()
    while len(greedy) < MAX_TOKENS and (not greedy or greedy[-1] != tm.EOS):
        greedy += (int(table[greedy].argmax()),)
    assert len(target) == 3
    assert_matches(empirical, target, chain_law, [{greedy: 1.0}], TIED_CHAINS)
    assert spend.proposal == "one_pass" and spend.events["ties_rescored"] > 0 and spend.scored > 0


def test_scoring_path_on_a_processed_logprobs_engine(cut_model):
    """Served with --logprobs-mode processed_logprobs, the engine reports log q itself and every
    proposal is scored for its log p: the chains' reported log p equal the float64 reference.
    (The chain's law is the one-pass tests' business: the acceptance test is the same code.)"""
    directory, table = cut_model
    engine = tm.TinyEngine(directory, logprobs_mode="processed_logprobs")
    try:
        [(deltas, spend)] = engine.draw(PowerMCMCSampler(), 64, DecodeParams(max_tokens=MAX_TOKENS, logprobs=0),
                                        PowerMCMCParams(power_alpha=ALPHA, mcmc_steps=2, block_size=1,
                                                        proposal_top_k=CUT))
    finally:
        engine.close()
    for delta in deltas:
        assert tm.sequence_logprob(table, tuple(delta.token_ids), top_k=CUT) > -math.inf  # within the cut
        for t, entry in enumerate(delta.logprobs):
            assert entry.logprob == pytest.approx(table[tuple(delta.token_ids[:t])][entry.token_id], abs=1e-4)
    assert spend.proposal == "scored" and spend.scored > 0
