"""A server whose engine process dies under load answers 503 to everything in flight and on
/health, never a hang or a 500, and then exits non-zero so that an orchestrator restarts it."""

import asyncio
import os
import signal
import subprocess
import time

import httpx

from tests.conftest import API_KEY, MODEL, running_server

LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}


def engine_core_pids(server_pid: int) -> list[int]:
    """vLLM's engine core is a child process of the server named EngineCore."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(server_pid)],
                         capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "EngineCore" in line]


async def plain(http: httpx.AsyncClient) -> int:
    return (await http.post("/v1/completions", json=LONG)).status_code


async def streamed(http: httpx.AsyncClient) -> str:
    async with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
        events = [line async for line in response.aiter_lines() if line]
    assert events[-1] == "data: [DONE]"
    return events[-2]


async def power(http: httpx.AsyncClient) -> int:
    body = {**LONG, "max_tokens": 64, "sampler": "power_mcmc"}
    return (await http.post("/v1/completions", json=body)).status_code


def test_dead_engine_under_load_gives_503_then_exits_non_zero(model_dir, tmp_path):
    with running_server(model_dir, tmp_path / "server.log", "--max-model-len", "512") as (server, process):
        pids = engine_core_pids(process.pid)
        assert pids, "no EngineCore child process found"

        async def scenario():
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http:
                in_flight = [asyncio.create_task(call(http)) for call in (plain, plain, streamed, power)]
                await asyncio.sleep(2)
                assert not any(task.done() for task in in_flight)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                answers = await asyncio.gather(*in_flight)
                answered_s = time.monotonic() - killed
                health = (await http.get("/health")).status_code
                refused = (await http.post("/v1/completions", json={**LONG, "max_tokens": 2})).status_code
                return answers, answered_s, health, refused

        answers, answered_s, health, refused = asyncio.run(scenario())
        assert answers[0] == answers[1] == answers[3] == 503
        assert '"code": 503' in answers[2]
        assert answered_s < 5
        assert health == 503 and refused == 503
        assert process.wait(timeout=30) == 1
        assert "The engine has died" in server.log.read_text()
