"""`python -m server.replicas`: two real server replicas behind the real vllm-router on loopback,
used over HTTP with the OpenAI client."""

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from server.replicas import ROUTER
from tests.conftest import API_KEY, MODEL, STARTUP_TIMEOUT_S, free_port
from tests.test_errors import assert_error
from tests.test_metrics_and_cancel import total


# The router's health checks take a dead replica out after three failures 5 s apart: at most about
# 20 s, whatever the machine's speed; twice that and more for a loaded machine's scheduling.
TAKEN_OUT_WITHIN_S = 60


class Replicas:
    def __init__(self, port: int, process: subprocess.Popen, log):
        self.url = f"http://127.0.0.1:{port}"
        self.replicas = [f"http://127.0.0.1:{port + i}" for i in (1, 2)]
        self.process = process
        self.log = log

    def http(self, url: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=url or self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)

    def served(self) -> list[float]:
        """Requests each replica has answered so far (any sampler, any outcome)."""
        counts = []
        for url in self.replicas:
            with self.http(url) as http:
                counts.append(total(http, "powerserve_requests_total"))
        return counts

    def served_by(self, send) -> list[float]:
        before = self.served()
        send()
        return [after - b for after, b in zip(self.served(), before)]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    port = free_port()  # the router's; the replicas take the next two
    log = tmp_path_factory.mktemp("replicas") / "replicas.log"
    command = [sys.executable, "-m", "server.replicas", "--replicas", "2", "--port", str(port), "--policy",
               "cache_aware", "--", "--max-model-len", "512"]
    environment = {**os.environ, "POWERSERVE_API_KEY": API_KEY, "POWERSERVE_ENFORCE_EAGER": "true"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment,
                                   start_new_session=True)
    deadline = time.monotonic() + 2 * STARTUP_TIMEOUT_S
    while "Router ready" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    try:
        yield Replicas(port, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        assert status == 0, log.read_text()[-3000:]


def test_the_router_is_installed():
    assert ROUTER.exists(), "make router installs vllm-router"


def test_both_replicas_serve_and_a_shared_prefix_stays_on_one(replicas):
    client = openai.OpenAI(base_url=replicas.url + "/v1", api_key=API_KEY)

    def concurrent_power_requests():
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: client.completions.create(
                model=MODEL, prompt=f"{i} unrelated {7 * i} words", max_tokens=2,
                extra_body={"sampler": "power_mcmc", "mcmc_steps": 1}), range(4)))

    # cache_aware spreads requests by load when no prefix is shared.
    assert min(replicas.served_by(concurrent_power_requests)) > 0
    prefix = "The history of the city " * 40  # 200 tokens, far past the router's match threshold

    def shared_prefix():
        for i in range(6):
            client.completions.create(model=MODEL, prompt=f"{prefix} part {i}", max_tokens=2)

    assert sorted(replicas.served_by(shared_prefix)) == [0, 6]


def test_a_power_request_streams_through_the_router(replicas):
    client = openai.OpenAI(base_url=replicas.url + "/v1", api_key=API_KEY)
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True,
                                       extra_body={"sampler": "power_mcmc", "mcmc_steps": 2, "ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) and chunks[-1].choices[0].finish_reason == "length"


def test_an_error_comes_back_as_the_replica_sent_it_and_runs_once(replicas):
    with replicas.http() as http:
        spread = replicas.served_by(lambda: assert_error(
            http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 10 ** 6}),
            400, "max_tokens"))
    assert sorted(spread) == [0, 1]


def test_a_killed_replica_is_taken_out_and_requests_go_on(replicas):
    """Last: it leaves one replica. Until the router's health checks see the dead replica (three
    failed checks 5 s apart, vllm-router's threshold), a request sent there fails; then every
    request goes to the live one."""
    pids = [int(pid) for pid in re.findall(r"Started replica \d \(pid (\d+)\)", replicas.log.read_text())]
    os.killpg(pids[1], signal.SIGKILL)
    client = openai.OpenAI(base_url=replicas.url + "/v1", api_key=API_KEY, max_retries=0)
    deadline, in_a_row, i = time.monotonic() + TAKEN_OUT_WITHIN_S, 0, 0
    while in_a_row < 6:
        assert time.monotonic() < deadline, "the router kept sending requests to the dead replica"
        i += 1
        try:
            assert client.completions.create(model=MODEL, prompt=f"After the loss {i}", max_tokens=2).choices[0].text
            in_a_row += 1
        except openai.APIError:
            in_a_row = 0
            time.sleep(0.5)
