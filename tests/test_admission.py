"""Admission control and deadlines on a server with tight limits: one power_mcmc request at a time
with one waiting, a cost cap, and a short maximum deadline."""

import asyncio
import time

import httpx
import openai
import pytest

from samplers import REGISTRY, DecodeParams
from tests.conftest import API_KEY, MODEL, running_server
from tests.test_errors import assert_error
from tests.test_metrics_and_cancel import scrape, wait_until_idle

COST_CAP = 20000
# A power_mcmc request that keeps the engine busy for several seconds on two CPU cores.
SLOW_MCMC = {"sampler": "power_mcmc", "mcmc_steps": 2, "ignore_eos": True}


@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("guarded") / "server.log"
    flags = ("--max-model-len", "512", "--max-concurrent", "power_mcmc=1", "--max-queued", "power_mcmc=1",
             "--max-request-cost", str(COST_CAP), "--max-request-timeout", "120")
    with running_server(model_dir, log, *flags) as (server, _):
        yield server


def queued(http) -> float:
    return scrape(http)[("powerserve_requests_queued", frozenset({"model": MODEL, "sampler": "power_mcmc"}.items()))]


def test_overload_queues_then_refuses_while_direct_keeps_serving(guarded):
    client = openai.AsyncOpenAI(base_url=f"{guarded.url}/v1", api_key=API_KEY, max_retries=0)
    finished = {}

    async def power(i: int):
        try:
            await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=32,
                                            extra_body=SLOW_MCMC)
            outcome = "ok"
        except openai.RateLimitError as exc:
            outcome = exc
        finished[i] = time.monotonic()
        return outcome

    async def scenario():
        started = time.monotonic()
        powers = [asyncio.create_task(power(i)) for i in range(4)]
        await asyncio.sleep(1.0)
        with guarded.http() as http:
            queue_while_busy = queued(http)
        direct = await client.completions.create(model=MODEL, prompt="Hi", max_tokens=8)
        finished["direct"] = time.monotonic()
        return started, queue_while_busy, direct, await asyncio.gather(*powers)

    started, queue_while_busy, direct, outcomes = asyncio.run(scenario())
    refused = [(i, o) for i, o in enumerate(outcomes) if o != "ok"]
    # One runs, one waits for it, and the two beyond the queue are refused at once.
    assert len(refused) == 2, outcomes
    for i, exc in refused:
        assert finished[i] - started < 2
        assert int(exc.response.headers["retry-after"]) >= 1
        assert exc.body["type"] == "rate_limit_error" and "power_mcmc" in exc.body["message"]
    assert queue_while_busy == 1
    # The plain request was served while the power requests still held their slot and queue.
    assert direct.choices[0].text
    served = [finished[i] for i, o in enumerate(outcomes) if o == "ok"]
    assert finished["direct"] < min(served)
    with guarded.http() as http:
        assert queued(http) == 0
        counted = scrape(http)
    labels = {"model": MODEL, "sampler": "power_mcmc"}
    assert counted[("powerserve_requests_total", frozenset({**labels, "outcome": "rejected"}.items()))] == 2


def test_cost_cap_refuses_with_the_reason_and_bounds_the_real_spend(guarded):
    client = guarded.client()
    with guarded.http() as http:
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 400, "n": 64})
        assert_error(response, 400, says=f"cap of {COST_CAP}")
        assert "25600 engine tokens" in response.json()["error"]["message"]
    # The estimate is an upper bound of what a run really spends, scoring included (q != p).
    cases = [
        ({"sampler": "power_mcmc", "mcmc_steps": 3, "block_size": 4, "proposal_temperature": 0.5}, 12),
        ({"sampler": "power_scalable", "block_size": 3, "candidates": 2, "rollouts": 2,
          "rollout_horizon": 4, "jackknife": False}, 10),
        ({"sampler": "power_scalable", "block_size": 1, "candidates": 3, "rollouts": 2, "rollout_horizon": 3}, 5),
    ]
    for fields, max_tokens in cases:
        r = client.completions.create(model=MODEL, prompt="Count: 1 2 3", max_tokens=max_tokens, n=2,
                                      extra_body={**fields, "ignore_eos": True})
        sampler = REGISTRY[fields["sampler"]]
        params = sampler.Params.model_validate({k: v for k, v in fields.items() if k != "sampler"})
        bound = sampler.max_engine_tokens(r.usage.prompt_tokens, DecodeParams(max_tokens, n=2), params)
        spent = r.sampler_usage["engine_tokens_generated"] + r.sampler_usage["engine_tokens_scored"]
        assert 0 < spent <= bound, fields


def test_deadline_gives_504_and_stops_the_engine_work(guarded):
    client = guarded.client()
    start = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:  # not retried: x-should-retry false
        client.with_options(max_retries=2).completions.create(
            model=MODEL, prompt="Hi", max_tokens=64, extra_body={**SLOW_MCMC, "request_timeout": 1.5})
    assert caught.value.status_code == 504 and caught.value.body["param"] == "request_timeout"
    assert time.monotonic() - start < 3
    with guarded.http() as http:
        left = time.monotonic()
        assert wait_until_idle(http) - left < 2
        events = []
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 64, "stream": True, "request_timeout": 1.5,
                **SLOW_MCMC}
        with http.stream("POST", "/v1/completions", json=body) as response:
            events = [line for line in response.iter_lines() if line]
        left = time.monotonic()
        assert wait_until_idle(http) - left < 2
        assert events[-1] == "data: [DONE]"
        assert '"code": 504' in events[-2]
        assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                         "request_timeout": 121}), 400, "request_timeout")


def test_a_queued_request_times_out_in_the_queue(guarded):
    async def scenario():
        async with httpx.AsyncClient(base_url=guarded.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=60) as http:
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 32, **SLOW_MCMC}
            holder = asyncio.create_task(http.post("/v1/completions", json=body))
            await asyncio.sleep(0.5)
            start = time.monotonic()
            waiter = await http.post("/v1/completions", json={**body, "request_timeout": 1})
            waited = time.monotonic() - start
            return waiter, waited, await holder

    waiter, waited, holder = asyncio.run(scenario())
    assert_error(waiter, 504, "request_timeout")
    assert waited < 2.5
    assert holder.status_code == 200
