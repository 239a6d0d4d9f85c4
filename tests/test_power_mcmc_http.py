"""power_mcmc on the embedded model over HTTP: spend reporting, base logprobs, streaming, errors."""

import pytest

from tests.conftest import MODEL, assert_base_logprobs
from tests.test_errors import assert_error, complete
from tests.test_metrics_and_cancel import leave_mid_request, scrape, value

PROMPT = "The capital of France is"
POWER = {"sampler": "power_mcmc", "mcmc_steps": 2, "block_size": 4}


def test_spend_and_base_logprobs(live_server, client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, logprobs=0, seed=7,
                                  extra_body={**POWER, "return_token_ids": True, "ignore_eos": True})
    usage = r.sampler_usage
    stages = 2  # 8 tokens in blocks of 4
    assert usage["events"]["proposals"] == 2 * stages * POWER["mcmc_steps"]
    assert usage["details"]["acceptance_rate"] == pytest.approx(
        usage["events"]["accepted"] / usage["events"]["proposals"])
    assert usage["engine_tokens_generated"] >= r.usage.completion_tokens == 16
    # The default proposal (temperature 1/4, top 16) takes log p and log q from its own pass.
    assert usage["proposal"] == "one_pass" and usage["engine_tokens_scored"] == 0
    # Every draw (those used, those drawn ahead and discarded, and the 2 x 2 stage extensions)
    # prefills at most its prompt and prefix.
    draws = usage["events"]["proposals"] + usage["events"].get("discarded", 0) + 4
    assert 0 < usage["engine_tokens_prefilled"] <= (r.usage.prompt_tokens + 8) * draws
    assert_base_logprobs(live_server.model_dir, r.choices)  # the base model's, not the proposal's


def test_stream_delivers_the_same_completion_as_non_stream(client):
    kwargs = dict(model=MODEL, max_tokens=12, seed=11, extra_body={**POWER, "ignore_eos": True},
                  messages=[{"role": "user", "content": "Name a colour."}])
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full


def test_metrics_count_proposals(http, client):
    def events(samples, event):
        return value(samples, "powerserve_sampler_events_total", sampler="power_mcmc", event=event)

    before = scrape(http)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body=POWER)
    after = scrape(http)
    assert events(after, "proposals") - events(before, "proposals") == r.sampler_usage["events"]["proposals"]
    assert events(after, "accepted") - events(before, "accepted") == r.sampler_usage["events"]["accepted"]


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 0.5}, "temperature"),
    ({"stop": ["x"]}, "stop"),
    ({"logprobs": 2}, "logprobs"),
    ({"min_tokens": 2}, "min_tokens"),
    ({"power_alpha": 0.5}, "power_alpha"),
    ({"mcmc_steps": -1}, "mcmc_steps"),
    ({"block_size": 0}, "block_size"),
    ({"proposal_temperature": 0}, "proposal_temperature"),
    ({"top_k": 5}, "top_k"),
    ({"top_p": 0.5}, "top_p"),
    ({"proposal_top_k": -1}, "proposal_top_k"),
    ({"lookahead": 0}, "lookahead"),
    ({"lookahead": 65}, "lookahead"),
    # Untruncated at temperature 1/4, or cut beyond what one pass reports: log q is out of reach.
    ({"proposal_top_k": 0}, "proposal_top_k"),
    ({"proposal_top_k": 64}, "proposal_top_k"),
])
def test_invalid_power_requests_are_400(http, fields, param):
    assert_error(complete(http, sampler="power_mcmc", **fields), 400, param)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_aborts_every_chain(live_server, http, stream):
    long_run = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "n": 4, "ignore_eos": True,
                "sampler": "power_mcmc", "mcmc_steps": 10}
    leave_mid_request(live_server, http, long_run, after_s=3, stream=stream)
