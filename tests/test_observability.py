"""A real Prometheus, configured by the repo's own deploy/prometheus/prometheus.yml, scrapes the
live server while traffic goes through several samplers; then every query of every Grafana
dashboard panel must parse and return data through Prometheus's HTTP API."""

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.servers import free_port
from server.metrics import LATENCY_BUCKETS
from tests.conftest import MODEL, LiveServer

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = Path(sys.prefix) / "prometheus/usr/bin/prometheus"  # unpacked by `make prometheus`
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
COMPOSE_TARGET = "server:8000"  # the server as docker-compose.yml names it
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
# The power samplers made cheap: power_mcmc one block of 8 tokens and two Metropolis-Hastings
# steps, power_scalable two blocks of 4 with two candidates and two short rollouts each, power_smc
# two particles.
SAMPLERS = {"direct": {}, "power_mcmc": {"mcmc_steps": 2, "block_size": 8},
            "power_scalable": {"block_size": 4, "candidates": 2, "rollouts": 2, "rollout_horizon": 4},
            "power_smc": {"particles": 2}}
# Panels on one sampler's own events show only that sampler.
EVENT_OWNERS = {"accepted": "power_mcmc", "proposals": "power_mcmc", "rollouts": "power_scalable",
                "decisions": "power_scalable", "zeta_degenerate": "power_scalable", "zeta_estimates": "power_scalable",
                "resamplings": "power_smc", "particles": "power_smc"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expression) for every target of every panel of every dashboard."""
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] == "row":
                continue
            assert panel.get("targets"), f"{path.name}: panel '{panel['title']}' has no query"
            queries += [(f"{path.name}: {panel['title']} ({t['refId']})", t["expr"]) for t in panel["targets"]]
    return queries


@pytest.fixture(scope="module")
def prometheus(live_server: LiveServer, tmp_path_factory) -> Iterator[httpx.Client]:
    assert PROMETHEUS.exists(), "run `make prometheus` (make test does) to unpack Debian's Prometheus"
    work = tmp_path_factory.mktemp("prometheus")
    config = PROMETHEUS_CONFIG.read_text()
    assert COMPOSE_TARGET in config
    (work / "prometheus.yml").write_text(config.replace(COMPOSE_TARGET, live_server.url.removeprefix("http://")))
    port = free_port()
    with open(work / "prometheus.log", "w") as log:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            wait_for(lambda: api.get("/-/ready").status_code == 200, "Prometheus to be ready", process, work)
            wait_for(lambda: scrape_time(api) > 0, "a first scrape", process, work)
            yield api
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for(condition, what: str, process: subprocess.Popen, work: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, (work / "prometheus.log").read_text()[-4000:]
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {seconds} s:\n{(work / 'prometheus.log').read_text()[-4000:]}")


def query(api: httpx.Client, expr: str) -> dict:
    return api.get("/api/v1/query", params={"query": expr}).json()


def scrape_time(api: httpx.Client) -> float:
    """Unix time of the last successful scrape of the server, 0 before the first."""
    # A range selector returns the raw samples of `up` with the times they were scraped.
    result = query(api, 'up{job="power-sampling-server"}[1m]')["data"]["result"]
    successes = [float(t) for series in result for t, up in series["values"] if up == "1"]
    return max(successes, default=0.0)


def send_traffic(server: LiveServer) -> None:
    """Per sampler: one request, one streamed request, and one refused with 400."""
    with server.http() as http:
        for sampler, params in SAMPLERS.items():
            body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8,
                    "sampler": sampler, **params}
            assert http.post("/v1/completions", json=body).status_code == 200
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
                assert stream.status_code == 200
                stream.read()
            assert http.post("/v1/completions", json={**body, "max_tokens": 100_000}).status_code == 400


def test_every_dashboard_query_returns_data(live_server: LiveServer, prometheus: httpx.Client):
    # Two rounds with a scrape after each, so that every series (including those that the first
    # request of a sampler creates) grows between two samples inside the rate window.
    start = time.time()
    for _ in range(2):
        send_traffic(live_server)
        sent = time.time()
        deadline = time.monotonic() + 30
        while scrape_time(prometheus) <= sent:
            assert time.monotonic() < deadline, "Prometheus stopped scraping the server"
            time.sleep(0.5)
    # Grafana would put a window of a few scrape intervals for $__rate_interval; this one spans
    # all of the test's traffic.
    rate_interval = f"{math.ceil(time.time() - start) + 10}s"

    queries = dashboard_queries()
    assert len(queries) >= 10
    failures = []
    for where, expr in queries:
        answer = query(prometheus, expr.replace("$__rate_interval", rate_interval))
        if answer["status"] != "success":
            failures.append(f"{where}: {expr}\n  {answer['error']}")
            continue
        values = {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in answer["data"]["result"]}
        finite = {labels: v for labels, v in values.items() if math.isfinite(v)}
        if not finite:
            failures.append(f"{where}: {expr}\n  no data: {values}")
        elif any(dict(labels).get("sampler") for labels in values):
            # By-sampler panels must show each sampler that was driven, or the one whose events they plot.
            owners = {sampler for event, sampler in EVENT_OWNERS.items() if f'event="{event}"' in expr}
            expected = owners or set(SAMPLERS)
            shown = {dict(labels).get("sampler") for labels in finite}
            if not expected <= shown:
                failures.append(f"{where}: {expr}\n  shows samplers {shown}, not {expected}")
    assert not failures, "\n".join(failures)


def test_latency_buckets_resolve_a_plain_request_and_a_long_mcmc_run():
    # 50 ms (a plain request) and 10 minutes (a power_mcmc run) each fall in a bucket no wider
    # than a factor 2.5, and the longest run still has finite buckets above it.
    for seconds in (0.05, 600):
        upper = min(b for b in LATENCY_BUCKETS if b >= seconds)
        lower = max(b for b in LATENCY_BUCKETS if b < seconds)
        assert upper / lower <= 2.5, (seconds, lower, upper)
    assert LATENCY_BUCKETS[-1] >= 2 * 600
