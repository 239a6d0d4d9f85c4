"""Engine affinity with data parallelism (--data-parallel-size 2): every engine request of one
power request runs on one engine, where they share its prefix cache, and requests at once are
spread over the engines by how many each has pinned."""

import concurrent.futures
import contextlib
import os

import pytest

from tests.conftest import MODEL, running_server
from tests.test_metrics_and_cancel import scrape

# Token level: each decision runs K candidates' rollouts as engine requests at once, which vLLM
# alone would balance over both engines.
POWER = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "ignore_eos": True,
         "sampler": "power_scalable", "block_size": 1, "candidates": 3, "rollouts": 2, "rollout_horizon": 3}


@pytest.fixture(scope="module")
def two_engines(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("data_parallel") / "server.log"
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:
            if bind not in (None, "auto", "nobind"):
                # vLLM takes a CPU list per engine ("|"-separated): both on this worker's (tests/conftest.py).
                patch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{bind}|{bind}")
            server, _ = stack.enter_context(running_server(
                model_dir, log, "--max-model-len", "512", "--data-parallel-size", "2"))
        yield server


def finished_by_engine(http) -> dict[str, float]:
    """vLLM's finished engine requests so far, by engine rank."""
    counts: dict[str, float] = {}
    for (name, labels), value in scrape(http).items():
        if name == "vllm:request_success_total":
            engine = dict(labels)["engine"]
            counts[engine] = counts.get(engine, 0.0) + value
    return counts


def engine_requests_of(http, send) -> dict[str, float]:
    before = finished_by_engine(http)
    send()
    after = finished_by_engine(http)
    return {engine: after[engine] - before.get(engine, 0.0) for engine in after}


def test_one_power_request_stays_on_one_engine_and_two_use_both(two_engines):
    with two_engines.http() as http:
        def one():
            response = http.post("/v1/completions", json=POWER)
            assert response.status_code == 200, response.text
            return response

        for _ in range(2):  # both times on one engine (the same one: none is pinned in between)
            spread = engine_requests_of(http, one)
            assert sorted(spread.values())[0] == 0 and sum(spread.values()) > 3, spread

        def two():
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                [f.result() for f in [pool.submit(one) for _ in range(2)]]

        spread = engine_requests_of(http, two)
        # Pinned to different engines: both do the work of one request each.
        assert len(spread) == 2 and min(spread.values()) > 3, spread
