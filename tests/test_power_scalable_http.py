"""power_scalable on the embedded model over HTTP: spend, base logprobs, real streaming, metrics, errors."""

import time

import pytest

from tests.conftest import MODEL, assert_base_logprobs
from tests.test_errors import assert_error, complete
from tests.test_metrics_and_cancel import leave_mid_request, scrape

PROMPT = "The capital of France is"
SCALABLE = {"sampler": "power_scalable", "block_size": 4, "candidates": 3, "rollouts": 2,
            "rollout_horizon": 4, "ignore_eos": True}


@pytest.mark.parametrize("block_size", [1, 4])
def test_spend_and_base_logprobs(live_server, client, block_size):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, logprobs=0, seed=7,
                                  extra_body={**SCALABLE, "block_size": block_size, "return_token_ids": True})
    usage = r.sampler_usage
    decisions = 2 * 8 // block_size
    assert usage["events"]["decisions"] == decisions
    # Every decision but the last rolls out after each of its candidates (2 rollouts each): the 3
    # most likely tokens, or the distinct ones among 3 blocks from the sharp tempered proposal.
    most = 2 * (decisions - 2) * 3
    rollouts = usage["events"]["rollouts"]
    assert rollouts == most if block_size == 1 else 0 < rollouts <= most and rollouts % 2 == 0
    assert usage["events"]["zeta_estimates"] == rollouts // 2 >= usage["events"].get("zeta_degenerate", 0)
    assert len(usage["details"]["rollout_ess"]) == decisions - 2
    assert all(1 <= ess <= 2 for ess in usage["details"]["rollout_ess"])
    assert usage["engine_tokens_generated"] > r.usage.completion_tokens == 16
    assert usage["engine_tokens_scored"] == 0
    assert all(c.finish_reason == "length" for c in r.choices)
    assert_base_logprobs(live_server.model_dir, r.choices)


def test_stream_sends_each_decision_as_it_is_made(client):
    started = time.monotonic()
    arrivals, text, final = [], "", None
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, stream=True,
                                           stream_options={"include_usage": True}, extra_body=SCALABLE):
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.monotonic() - started)
            text += chunk.choices[0].text
        final = chunk
    assert final.sampler_usage["events"]["decisions"] == 4 == len(arrivals)  # one chunk per block
    assert final.usage.completion_tokens == 16 and text
    # The first block reaches the client while the other three are still being decided.
    assert arrivals[0] < 0.75 * arrivals[-1]


def test_chat_with_defaults_stops_at_end_of_turn(client):
    r = client.chat.completions.create(model=MODEL, max_completion_tokens=24, extra_body={"sampler": "power_scalable"},
                                       messages=[{"role": "user", "content": "Say hello."}])
    choice = r.choices[0]
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.sampler_usage["events"]["rollouts"] > 0


def test_metrics_count_rollouts_and_engine_tokens(http, client):
    def counter(samples, name, **labels):
        key = frozenset({"model": MODEL, "sampler": "power_scalable", **labels}.items())
        return samples.get((name, key), 0.0)

    before = scrape(http)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, extra_body=SCALABLE)
    after = scrape(http)
    for event in ("rollouts", "decisions"):
        assert (counter(after, "powerserve_sampler_events_total", event=event)
                - counter(before, "powerserve_sampler_events_total", event=event)) == r.sampler_usage["events"][event]
    assert (counter(after, "powerserve_engine_tokens_total", kind="generated")
            - counter(before, "powerserve_engine_tokens_total", kind="generated")) == r.sampler_usage["engine_tokens_generated"]


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 0.5}, "temperature"),
    ({"top_k": 5}, "top_k"),
    ({"stop": ["x"]}, "stop"),
    ({"logprobs": 2}, "logprobs"),
    ({"power_alpha": 0.5}, "power_alpha"),
    ({"candidates": 21}, "candidates"),
    ({"rollouts": 0}, "rollouts"),
    ({"rollouts": 1}, "rollouts"),  # the jackknife needs two
    ({"rollout_horizon": 0}, "rollout_horizon"),
    ({"block_size": 1, "candidate_blocks": 4}, "candidate_blocks"),
    ({"candidates": 8, "candidate_blocks": 4}, "candidates"),
    ({"block_weighting": "uniform"}, "block_weighting"),
    ({"jackknife": "maybe"}, "jackknife"),
    ({"proposal": "greedy"}, "proposal"),
    ({"proposal": "base", "proposal_top_k": 4}, "proposal_top_k"),  # the base proposal is untruncated
    ({"block_weighting": "power"}, "block_weighting"),  # the paper's weight is for the base proposal
    ({"proposal_top_k": 64}, "proposal_top_k"),  # reads more alternatives than --max-logprobs 64
    ({"proposal_top_k": -1}, "proposal_top_k"),
])
def test_invalid_requests_are_400(http, fields, param):
    assert_error(complete(http, sampler="power_scalable", **fields), 400, param)


def test_disconnect_aborts_every_rollout(live_server, http):
    # K = M = 4, not the defaults of 8: a decision's rollouts are prefilled in one engine step, which an
    # abort does not cut short, and the 128 rollouts of the defaults at n = 2 make that step last seconds.
    long_run = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "n": 2, "ignore_eos": True,
                "sampler": "power_scalable", "candidates": 4, "rollouts": 4, "rollout_horizon": 64}
    leave_mid_request(live_server, http, long_run, after_s=3)
