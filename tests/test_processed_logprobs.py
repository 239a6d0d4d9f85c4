"""A server in vLLM's `processed_logprobs` mode (`--logprobs-mode processed_logprobs`): reported
log-probabilities are those of the distribution each token was drawn from, and power_mcmc
scores its tempered proposals for their log p instead of reading it from the decoding pass."""

from collections.abc import Iterator

import openai
import pytest

from tests.conftest import MODEL, LiveServer, assert_base_logprobs, running_server


@pytest.fixture(scope="module")
def processed(model_dir, tmp_path_factory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("processed") / "server.log"
    with running_server(model_dir, log, "--logprobs-mode", "processed_logprobs", "--dtype", "float32",
                        "--max-model-len", "512") as (server, _):
        yield server


def test_logprobs_are_those_of_the_distribution_sampled_from(processed):
    r = processed.client().completions.create(model=MODEL, prompt="The capital of France is", max_tokens=10,
                                              logprobs=3, temperature=0.7, extra_body={"return_token_ids": True})
    assert_base_logprobs(processed.model_dir, r.choices, temperature=0.7)


@pytest.mark.parametrize("stream", [False, True])
def test_tokens_that_cannot_be_drawn_get_the_floor_logprob(processed, stream):
    """After top_k 1 every alternative has log q = -inf, which JSON cannot carry (found by the fuzz:
    a 500 unstreamed, nulls streamed); they are reported at -9999, as vLLM's server does."""
    chat = processed.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=2, logprobs=True,
        top_logprobs=2, stream=stream, extra_body={"top_k": 1})
    chunks = list(chat) if stream else [chat]
    content = [t for c in chunks for choice in c.choices if choice.logprobs for t in choice.logprobs.content]
    assert content and all(t.logprob == 0.0 for t in content)
    assert all([alt.logprob for alt in t.top_logprobs][1:] == [-9999.0] for t in content)


def test_power_mcmc_scores_its_proposals(processed):
    r = processed.client().completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, logprobs=0, seed=3,
        extra_body={"sampler": "power_mcmc", "mcmc_steps": 2, "block_size": 4, "ignore_eos": True,
                    "return_token_ids": True})
    usage = r.sampler_usage
    assert usage["proposal"] == "scored" and usage["engine_tokens_scored"] > 0
    assert_base_logprobs(processed.model_dir, r.choices)  # the base model's log p, not the proposal's


def test_power_scalable_needs_raw_logprobs_for_its_tempered_proposal(processed):
    """Its tempered weights need log p of the most likely tokens, which this mode does not report: a 400
    naming `proposal`; the base proposal draws at temperature 1, where both modes report log p."""
    client = processed.client()
    scalable = {"sampler": "power_scalable", "block_size": 4, "candidates": 2, "rollouts": 2, "rollout_horizon": 4}
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, extra_body=scalable)
    assert refused.value.body["param"] == "proposal"
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, logprobs=0,
                                  extra_body={**scalable, "proposal": "base", "return_token_ids": True})
    assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
    assert_base_logprobs(processed.model_dir, r.choices)
