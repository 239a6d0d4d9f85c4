"""SIGTERM drains the server: readiness (/health) and new requests answer 503 "draining" while
liveness (/health/live) stays 200; a power request in flight finishes; one still running when the
drain timeout passes is aborted; and the process exits 0."""

import json
import signal
import threading
import time

import httpx

from tests.conftest import API_KEY, MODEL, running_server
from tests.test_metrics_and_cancel import running

DRAIN_TIMEOUT_S = 20
# A short power request: a second or two on the reference machine (tests/pace.py).
SHORT_POWER = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True,
               "sampler": "power_mcmc", "mcmc_steps": 1, "block_size": 8}


def test_sigterm_lets_requests_in_flight_finish_then_aborts_the_rest_and_exits_0(model_dir, tmp_path):
    log = tmp_path / "server.log"
    with running_server(model_dir, log, "--max-model-len", "1024", "--drain-timeout", str(DRAIN_TIMEOUT_S)) as (
            server, process), server.http() as http:
        started = time.monotonic()
        assert http.post("/v1/completions", json=SHORT_POWER).status_code == 200
        short_s = time.monotonic() - started
        assert 3 * short_s < DRAIN_TIMEOUT_S, f"the short request took {short_s:.1f} s: too slow a machine"
        # Never finishes within the drain timeout on any machine (its tokens alone last longer).
        holder = {"model": MODEL, "prompt": "Hello", "ignore_eos": True, "stream": True,
                  "max_tokens": min(900, server.pace.tokens_for(10 * DRAIN_TIMEOUT_S))}
        outcomes = {}

        def send(name: str, body: dict) -> None:
            try:
                with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                  timeout=server.pace.timeout(120)) as client:
                    response = client.post("/v1/completions", json=body)
                    outcomes[name] = response.status_code, response.text
            except httpx.HTTPError as exc:  # the connection closed under it
                outcomes[name] = None, repr(exc)

        threads = [threading.Thread(target=send, args=("holder", holder)),
                   threading.Thread(target=send, args=("power", SHORT_POWER))]
        threads[0].start()
        deadline = time.monotonic() + server.pace.timeout(30)
        while running(http) < 1:
            assert time.monotonic() < deadline, "the holder never started"
            time.sleep(0.05)
        threads[1].start()
        time.sleep(0.3)  # the power request is admitted and under way
        process.send_signal(signal.SIGTERM)  # the server only, as an orchestrator stops a container
        signalled = time.monotonic()
        time.sleep(0.5)
        refused = http.get("/health")
        assert refused.status_code == 503 and "draining" in refused.json()["error"]["message"]
        assert http.get("/health/live").status_code == 200
        new = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert new.status_code == 503 and "draining" in new.json()["error"]["message"]
        threads[1].join()
        status, text = outcomes["power"]
        assert status == 200, text
        assert json.loads(text)["usage"]["completion_tokens"] == SHORT_POWER["max_tokens"]
        # The holder is aborted once the drain timeout passes; the server then exits 0.
        assert process.wait(timeout=DRAIN_TIMEOUT_S + server.pace.timeout(60)) == 0, log.read_text()[-3000:]
        threads[0].join()
        status, text = outcomes["holder"]
        assert status is None or '"finish_reason":"length"' not in text, "the holder was not aborted"
        assert time.monotonic() - signalled >= DRAIN_TIMEOUT_S
        text = log.read_text()
        assert "SIGTERM: draining 2 request(s) in flight" in text
        assert "The drain timeout has passed: aborting 1 request(s)" in text
