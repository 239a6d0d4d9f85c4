"""Soak: minutes of mixed samplers at moderate concurrency against the session's server. Every
request succeeds, memory levels off, and `/metrics` counts exactly the requests that were sent."""

import asyncio
import logging
import os
import random
import statistics
import subprocess
import time
from collections import Counter

import openai

from tests.conftest import API_KEY, MODEL
from tests.test_metrics_and_cancel import scrape

logger = logging.getLogger(__name__)

SOAK_S = float(os.environ.get("TEST_SOAK_S", "120"))
CONCURRENCY = 4
SAMPLE_EVERY_S = 5.0
# Allowed growth of resident memory from the end of the first third of the run to its end. The
# server and engine hold about 1.5 GiB; a leak of one small object per token (tens of thousands of
# tokens here) would add well over this, while allocator noise stays within a few MiB.
MEMORY_GROWTH_LIMIT = 64 << 20


async def chat(client, sampler: str, fields: dict, stream: bool):
    messages = [{"role": "user", "content": "Name a colour."}]
    body = {"sampler": sampler, **fields}
    if stream:
        async for _ in await client.chat.completions.create(
                model=MODEL, messages=messages, max_completion_tokens=8, stream=True, extra_body=body):
            pass
    else:
        await client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8,
                                             extra_body=body)


async def completion(client, sampler: str, fields: dict, stream: bool):
    body = {"sampler": sampler, **fields}
    if stream:
        async for _ in await client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=12,
                                                       stream=True, extra_body=body):
            pass
    else:
        await client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=12, n=2,
                                        extra_body=body)


MIX = [
    (completion, "direct", {}, False),
    (completion, "direct", {}, True),
    (chat, "direct", {}, True),
    (chat, "direct", {"logprobs": True}, False),
    (completion, "power_mcmc", {"mcmc_steps": 2}, False),
    (chat, "power_mcmc", {"mcmc_steps": 2}, True),
    (completion, "power_scalable", {"block_size": 4, "candidates": 2, "rollouts": 2, "rollout_horizon": 4},
     True),
    (chat, "power_scalable", {"block_size": 1, "candidates": 2, "rollouts": 2, "rollout_horizon": 2}, False),
]


def resident_bytes(pid: int) -> int:
    """Resident memory of the server process and its children (vLLM's engine core)."""
    out = subprocess.run(["ps", "-o", "rss=", "--pid", str(pid), "--ppid", str(pid)],
                         capture_output=True, text=True).stdout
    return sum(int(kb) for kb in out.split()) * 1024


def totals(http) -> Counter:
    counts = Counter()
    for (name, labels), v in scrape(http).items():
        labels = dict(labels)
        if name == "powerserve_requests_total" and labels.get("model") == MODEL:
            counts[labels["sampler"], labels["outcome"]] += v
    return counts


def test_soak_mixed_samplers(live_server, http):
    client = openai.AsyncOpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0,
                                timeout=live_server.pace.timeout(120))
    sent = Counter()
    memory: list[int] = []
    before = totals(http)

    async def worker(seed: int, stop_at: float):
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            call, sampler, fields, stream = rng.choice(MIX)
            await call(client, sampler, fields, stream)
            sent[sampler, "success"] += 1

    async def watch_memory(stop_at: float):
        while time.monotonic() < stop_at:
            memory.append(resident_bytes(live_server.pid))
            await asyncio.sleep(SAMPLE_EVERY_S)

    async def soak():
        stop_at = time.monotonic() + SOAK_S
        await asyncio.gather(watch_memory(stop_at), *(worker(i, stop_at) for i in range(CONCURRENCY)))

    asyncio.run(soak())
    after = totals(http)
    grown = {key: after[key] - before[key] for key in after if after[key] != before[key]}
    assert grown == dict(sent)
    # The mix was really served, not stalled: a request per 10 s at least, on the reference machine.
    assert sum(sent.values()) >= SOAK_S / (10 * live_server.pace.slowdown)
    steady = statistics.median(memory[len(memory) // 3 - 1:len(memory) // 3 + 2])
    end = statistics.median(memory[-3:])
    logger.info("soak: %s in %g s; resident memory %.0f MiB after the first third, %.0f MiB at the end",
                dict(sent), SOAK_S, steady / 2**20, end / 2**20)
    assert end - steady < MEMORY_GROWTH_LIMIT
    samples = scrape(http)
    for sampler in ("direct", "power_mcmc", "power_scalable"):
        labels = frozenset({"model": MODEL, "sampler": sampler}.items())
        assert samples[("powerserve_requests_in_flight", labels)] == 0
        assert samples[("powerserve_requests_queued", labels)] == 0
