"""`priority` on a server whose engine schedules by priority (vLLM's --scheduling-policy priority),
one request at a time: a queued request with a lower value runs before one queued earlier.

A holder keeps the engine's one running slot while two requests queue behind it; the test then
leaves the holder, and the order in which the two finish is the order the engine chose.
"""

import asyncio
import time

import httpx
import pytest

from tests.conftest import API_KEY, MODEL, running_server
from tests.test_admission import leave
from tests.test_metrics_and_cancel import total

HOLD_S = 30  # the holder cannot finish within the scenario on any machine; the test leaves it


@pytest.fixture(scope="module")
def prioritized(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("prioritized") / "server.log"
    flags = ("--max-model-len", "1024", "--scheduling-policy", "priority", "--max-num-seqs", "1")
    with running_server(model_dir, log, *flags) as (server, _):
        yield server


def waiting(http: httpx.Client) -> float:
    return total(http, "vllm:num_requests_waiting")


def finish_order(server, first: tuple[dict, dict], second: tuple[dict, dict]) -> list[str]:
    """Which of two requests, each (body fields, headers), finishes first when `first` queues in the
    engine before `second`, both behind a holder that is then left."""
    holder = {"model": MODEL, "prompt": "Once upon a time", "ignore_eos": True, "stream": True,
              "max_tokens": min(900, server.pace.tokens_for(HOLD_S))}
    short = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=server.pace.timeout(60)) as http:
            opened = asyncio.Event()

            async def hold():
                async with http.stream("POST", "/v1/completions", json=holder) as response:
                    async for _ in response.aiter_lines():
                        opened.set()

            async def queue(name: str, fields: dict, headers: dict) -> str:
                response = await http.post("/v1/completions", json={**short, **fields}, headers=headers)
                assert response.status_code == 200, response.text
                return name

            holding = asyncio.create_task(hold())
            await asyncio.wait_for(opened.wait(), server.pace.timeout(30))
            finished, tasks = [], []
            for queued, (name, (fields, headers)) in enumerate((("first", first), ("second", second)), start=1):
                tasks.append(asyncio.create_task(queue(name, fields, headers)))
                deadline = time.monotonic() + server.pace.timeout(10)
                while waiting(metrics) < queued:  # in the engine's queue before the next one comes
                    assert time.monotonic() < deadline, "the request never queued in the engine"
                    await asyncio.sleep(0.02)
            assert not holding.done()
            await leave(holding)
            for task in asyncio.as_completed(tasks):
                finished.append(await task)
            return finished

    with server.http() as metrics:  # scraped between the scenario's steps, briefly blocking its loop
        return asyncio.run(scenario())


def test_a_lower_priority_value_runs_first(prioritized):
    """By the body's priority, then by vLLM's X-Vllm-Priority header, which overrides the body's;
    and a power sampler's request takes a priority too."""
    assert finish_order(prioritized, ({"priority": 5}, {}), ({"priority": -5}, {})) == ["second", "first"]
    # Without the header the second (10) would come after the first (5).
    assert finish_order(prioritized, ({"priority": 5}, {}),
                        ({"priority": 10}, {"X-Vllm-Priority": "-5"})) == ["second", "first"]
    with prioritized.http() as http:
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4,
                                                      "sampler": "power_mcmc", "mcmc_steps": 1, "priority": -3})
        assert response.status_code == 200, response.text
