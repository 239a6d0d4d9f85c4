"""Admission control and deadlines on a server with tight limits: one power_mcmc request at a time
with one waiting, a cost cap, and a short maximum deadline.

The scenarios need power_mcmc requests that hold their slot while the test looks on. A holder is made
long enough, from the server's measured pace, that it cannot finish within the scenario on any
machine, and the test ends it by leaving, so that its length costs nothing.
"""

import asyncio
import contextlib
import time

import httpx
import openai
import pytest

from samplers import REGISTRY, DecodeParams
from tests.conftest import API_KEY, MODEL, running_server
from tests.test_errors import assert_error
from tests.test_metrics_and_cancel import assert_idle_soon, running, scrape, wait_until_idle

COST_CAP = 20000
MAX_REQUEST_TIMEOUT_S = 120
# q = p (proposal temperature 1, untruncated), so a holder is never scored, and one step at a time
# (lookahead 1), so that its bound counts one draw per step: 960 tokens cost at most 17,280 of the cap.
HOLD = {"sampler": "power_mcmc", "mcmc_steps": 2, "proposal_temperature": 1.0, "proposal_top_k": 0,
        "lookahead": 1, "ignore_eos": True}
HOLD_PROMPT = "Once upon a time"
# Its first pass alone decodes max_tokens tokens one after another; the scenarios last a few seconds.
HOLD_S = 20
MAX_HOLD_TOKENS = 960  # within the server's context of 1024 and the cost cap


@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("guarded") / "server.log"
    flags = ("--max-model-len", "1024", "--max-concurrent", "power_mcmc=1", "--max-queued", "power_mcmc=1",
             "--max-request-cost", str(COST_CAP), "--max-request-timeout", str(MAX_REQUEST_TIMEOUT_S))
    with running_server(model_dir, log, *flags) as (server, _):
        yield server


@pytest.fixture(scope="module")
def holder(guarded) -> dict:
    """The body of a power_mcmc request that keeps its slot for at least HOLD_S on this machine."""
    max_tokens = min(MAX_HOLD_TOKENS, guarded.pace.tokens_for(HOLD_S))
    assert max_tokens * guarded.pace.s_per_token >= HOLD_S / 2, "this machine decodes too fast for the holder"
    return {"model": MODEL, "prompt": HOLD_PROMPT, "max_tokens": max_tokens, **HOLD}


def test_the_engine_dtype_follows_the_cpu(guarded):
    """This server is started without --dtype: it logs the dtype chosen for this CPU and why
    (tests/test_engine_dtype.py checks the rule itself)."""
    from samplers.vllm_engine import cpu_dtype

    dtype, reason = cpu_dtype()
    log = guarded.log.read_text()
    assert reason in log
    assert f"dtype=torch.{'bfloat16' if dtype == 'auto' else dtype}," in log  # vLLM's engine config line


def async_http(server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                             timeout=server.pace.timeout(60))


async def leave(*tasks: asyncio.Task) -> None:
    """Give up on requests still in flight: the client closes their connections."""
    for task in tasks:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks)


def queued(http) -> float:
    return scrape(http)[("powerserve_requests_queued", frozenset({"model": MODEL, "sampler": "power_mcmc"}.items()))]


def test_overload_queues_then_refuses_while_direct_keeps_serving(guarded, holder):
    async def scenario():
        async with async_http(guarded) as http:
            started = time.monotonic()
            powers = [asyncio.create_task(http.post("/v1/completions", json=holder)) for _ in range(4)]
            # Two of the four are refused at once; the others hold the slot and the queue.
            while sum(task.done() for task in powers) < 2 and time.monotonic() - started < 5:
                await asyncio.sleep(0.05)
            refused_s = time.monotonic() - started
            refused = [task for task in powers if task.done()]
            with guarded.http() as metrics:
                queue_while_busy = queued(metrics)
            direct = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 8})
            still_held = sum(not task.done() for task in powers)
            await leave(*(task for task in powers if not task.done()))
            return refused_s, [task.result() for task in refused], queue_while_busy, direct, still_held

    refused_s, refused, queue_while_busy, direct, still_held = asyncio.run(scenario())
    # One runs, one waits for it, and the two beyond the queue are refused at once.
    assert len(refused) == 2 and refused_s < 2
    for response in refused:
        assert_error(response, 429, says="power_mcmc")
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert int(response.headers["retry-after"]) >= 1
    assert queue_while_busy == 1
    # The plain request was served while the power requests still held their slot and queue.
    assert direct.status_code == 200 and direct.json()["choices"][0]["text"]
    assert still_held == 2
    with guarded.http() as http:
        wait_until_idle(http, guarded.pace)
        assert queued(http) == 0
        counted = scrape(http)
    labels = {"model": MODEL, "sampler": "power_mcmc"}
    assert counted[("powerserve_requests_total", frozenset({**labels, "outcome": "rejected"}.items()))] == 2
    assert counted[("powerserve_requests_total", frozenset({**labels, "outcome": "aborted"}.items()))] >= 2


def test_cost_cap_refuses_with_the_reason_and_bounds_the_real_spend(guarded):
    client = guarded.client()
    with guarded.http() as http:
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 400, "n": 64})
        assert_error(response, 400, says=f"cap of {COST_CAP}")
        assert "25600 engine tokens" in response.json()["error"]["message"]
        # An echo's logprobs score the prompts: 21 prompts of 1000 tokens are over the cap with nothing generated.
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": [[42] * 1000] * 21, "max_tokens": 0,
                                                      "echo": True, "logprobs": 0})
        assert_error(response, 400, says="21000 engine tokens")
    # The estimate is an upper bound of what a run really spends, scoring included (q != p).
    cases = [
        ({"sampler": "power_mcmc", "mcmc_steps": 3, "block_size": 4, "proposal_temperature": 0.5}, 12),
        ({"sampler": "power_scalable", "block_size": 3, "candidates": 2, "rollouts": 2,
          "rollout_horizon": 4, "jackknife": False}, 10),
        ({"sampler": "power_scalable", "block_size": 1, "candidates": 3, "rollouts": 2, "rollout_horizon": 3}, 5),
        ({"sampler": "power_smc", "particles": 4, "ess_threshold": 1.0}, 12),
    ]
    for fields, max_tokens in cases:
        r = client.completions.create(model=MODEL, prompt="Count: 1 2 3", max_tokens=max_tokens, n=2,
                                      extra_body={**fields, "ignore_eos": True})
        sampler = REGISTRY[fields["sampler"]]
        params = sampler.Params.model_validate({k: v for k, v in fields.items() if k != "sampler"})
        bound = sampler.max_engine_tokens(r.usage.prompt_tokens, DecodeParams(max_tokens, n=2), params)
        spent = r.sampler_usage["engine_tokens_generated"] + r.sampler_usage["engine_tokens_scored"]
        assert 0 < spent <= bound, fields


def test_deadline_gives_504_and_stops_the_engine_work(guarded, holder):
    client = guarded.client()
    start = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:  # not retried: x-should-retry false
        client.with_options(max_retries=2).completions.create(
            model=MODEL, prompt=HOLD_PROMPT, max_tokens=holder["max_tokens"],
            extra_body={**HOLD, "request_timeout": 1.5})
    assert caught.value.status_code == 504 and caught.value.body["param"] == "request_timeout"
    assert time.monotonic() - start < 3
    with guarded.http() as http:
        assert_idle_soon(http, guarded.pace, time.monotonic())
        events = []
        with http.stream("POST", "/v1/completions", json={**holder, "stream": True, "request_timeout": 1.5}) as response:
            events = [line for line in response.iter_lines() if line]
        assert_idle_soon(http, guarded.pace, time.monotonic())
        assert events[-1] == "data: [DONE]"
        assert '"code": 504' in events[-2]
        assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                         "request_timeout": MAX_REQUEST_TIMEOUT_S + 1}),
                     400, "request_timeout")


def test_a_queued_request_times_out_in_the_queue(guarded, holder):
    async def scenario():
        async with async_http(guarded) as http:
            holding = asyncio.create_task(http.post("/v1/completions", json=holder))
            while not holding_its_slot(guarded):
                await asyncio.sleep(0.05)
            start = time.monotonic()
            waiter = await http.post("/v1/completions", json={**holder, "request_timeout": 1})
            waited = time.monotonic() - start
            held = not holding.done()
            await leave(holding)
            return waiter, waited, held

    waiter, waited, held = asyncio.run(scenario())
    assert_error(waiter, 504, "request_timeout")
    assert waited < 2.5
    assert held  # the slot was taken all along: the waiter timed out in the queue, not running
    with guarded.http() as http:
        wait_until_idle(http, guarded.pace)


def holding_its_slot(server) -> bool:
    """Whether the holder has its slot: its engine requests run."""
    with server.http() as http:
        return running(http) > 0
