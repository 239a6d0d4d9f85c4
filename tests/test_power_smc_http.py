"""power_smc on the embedded model over HTTP: spend reporting, base logprobs, real streaming, errors."""

import pytest

from tests.conftest import MODEL, assert_base_logprobs
from tests.test_errors import assert_error, complete
from tests.test_metrics_and_cancel import leave_mid_request, scrape, value

PROMPT = "The capital of France is"
POWER = {"sampler": "power_smc", "particles": 4, "ess_threshold": 1.0}


def test_spend_and_base_logprobs(live_server, client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, logprobs=0, seed=7,
                                  extra_body={**POWER, "return_token_ids": True, "ignore_eos": True})
    usage = r.sampler_usage
    assert usage["engine_tokens_generated"] >= r.usage.completion_tokens == 16
    assert usage["engine_tokens_scored"] == 0  # every weight comes from the decoding passes
    # Two runs of 4 particles, and a new particle for every copy a resampling made.
    resamplings = usage["events"].get("resamplings", 0)
    assert usage["events"]["particles"] >= 2 * 4
    assert len(usage["details"].get("ess_at_resampling", [])) == resamplings
    assert all(0 < ess < 1 for ess in usage["details"].get("ess_at_resampling", []))
    assert_base_logprobs(live_server.model_dir, r.choices)  # the base model's, not the proposal's


def test_stream_sends_the_settled_prefix_early_and_the_same_completion_as_non_stream(client):
    kwargs = dict(model=MODEL, max_tokens=24, seed=11, extra_body={**POWER, "ignore_eos": True},
                  messages=[{"role": "user", "content": "What is the capital of France?"}])
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(stream=True, **kwargs)
              if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == full
    # At temperature 1/4 four particles agree on most tokens, and what all of them share is sent as
    # soon as it is checked: more than one piece, not the whole completion at the end.
    assert len(pieces) > 1


def test_metrics_count_particles(http, client):
    def events(samples, event):
        return value(samples, "powerserve_sampler_events_total", sampler="power_smc", event=event)

    before = scrape(http)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, extra_body=POWER)
    after = scrape(http)
    assert events(after, "particles") - events(before, "particles") == r.sampler_usage["events"]["particles"]


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 0.5}, "temperature"),
    ({"top_p": 0.5}, "top_p"),
    ({"stop": ["x"]}, "stop"),
    ({"logprobs": 2}, "logprobs"),
    ({"power_alpha": 0.5}, "power_alpha"),
    ({"particles": 0}, "particles"),
    ({"particles": 257}, "particles"),
    ({"ess_threshold": 1.5}, "ess_threshold"),
    ({"resample_every": 0}, "resample_every"),
    ({"resampling": "stratified"}, "resampling"),
    # Untruncated, or cut beyond what one pass reports: log Z_t is out of reach.
    ({"proposal_top_k": 0}, "proposal_top_k"),
    ({"proposal_top_k": 64}, "proposal_top_k"),
])
def test_invalid_power_requests_are_400(http, fields, param):
    assert_error(complete(http, sampler="power_smc", **fields), 400, param)


def test_a_request_over_the_cost_cap_is_400(http):
    # 256 particles of 2000 tokens: 512,000 decoded, plus what 255 dropped particles a resampling
    # may have drawn past each of 1999 checks: far over the default cap of a million.
    assert_error(complete(http, sampler="power_smc", particles=256, max_tokens=2000), 400,
                 says="over this server's cap")


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_aborts_every_particle(live_server, http, stream):
    long_run = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "n": 2, "ignore_eos": True,
                "sampler": "power_smc", "particles": 16}
    leave_mid_request(live_server, http, long_run, after_s=3, stream=stream)
