"""Prometheus metrics move with traffic, and a client that goes away aborts its engine request."""

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL
from tests.pace import Pace

LABELS = {"model": MODEL, "sampler": "direct"}


def scrape(http) -> dict[tuple[str, frozenset], float]:
    text = http.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(http, name: str) -> float:
    """A metric's samples summed over all their labels."""
    return sum(v for (sample, _), v in scrape(http).items() if sample == name)


def value(samples, name, **labels) -> float:
    return samples.get((name, frozenset({**LABELS, **labels}.items())), 0.0)


def test_metrics_follow_requests(http, client):
    before = scrape(http)
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, n=2,
                                  extra_body={"ignore_eos": True})
    for _ in client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, stream=True,
                                       extra_body={"ignore_eos": True}):
        pass
    http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "temperature": -1})
    after = scrape(http)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert r.usage.completion_tokens == 10
    assert delta("powerserve_requests_total", outcome="success") == 2
    assert delta("powerserve_output_tokens_total") == 13
    assert delta("powerserve_engine_tokens_total", kind="generated") == 13
    assert delta("powerserve_engine_tokens_total", kind="scored") == 0
    assert delta("powerserve_request_latency_seconds_count") == 2
    assert delta("powerserve_time_to_first_token_seconds_count") == 2
    assert value(after, "powerserve_requests_in_flight") == 0
    # vLLM's own engine metrics are on the same page, under the served model name.
    engine = frozenset({"model_name": MODEL, "engine": "0"}.items())
    generated = after[("vllm:generation_tokens_total", engine)] - before[("vllm:generation_tokens_total", engine)]
    assert generated >= 13


def running(http) -> float:
    return total(http, "vllm:num_requests_running")


# The bound: vLLM's running requests are back to zero "within a second or two" of a client
# leaving or a deadline firing, on the reference machine (tests/pace.py). Aborting is immediate; the rest
# is the engine step in flight, which is not cut short and lasts longer on a slower machine.
IDLE_WITHIN_S = 2.0


# A power sampler's engine requests come in rounds with instants of nothing running between them;
# idle means nothing running for this long.
STABLY_IDLE_S = 1.0


def wait_until_idle(http, pace: Pace) -> float:
    """When vLLM's running requests dropped to zero for good (for STABLY_IDLE_S)."""
    seconds = pace.timeout(5.0)
    deadline = time.monotonic() + seconds + STABLY_IDLE_S
    idle_since = None
    while time.monotonic() < deadline:
        if running(http) > 0:
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= STABLY_IDLE_S:
            return idle_since
        time.sleep(0.1)
    raise AssertionError(f"vLLM still runs {running(http)} request(s) {seconds:.0f} s after the client left")


def assert_idle_soon(http, pace: Pace, since: float) -> None:
    """vLLM runs nothing within IDLE_WITHIN_S (stretched to this machine) of `since`."""
    assert wait_until_idle(http, pace) - since < pace.timeout(IDLE_WITHIN_S)


def busy_for(http, seconds: float) -> bool:
    """Whether vLLM runs anything at some moment of the next `seconds`."""
    deadline, seen = time.monotonic() + seconds, False
    while time.monotonic() < deadline:
        seen = seen or running(http) > 0
        time.sleep(0.1)
    return seen


LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}


def test_stream_disconnect_aborts_the_engine_request(live_server, http):
    with httpx.Client(base_url=live_server.url, headers=http.headers, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            assert running(http) == 1
    assert_idle_soon(http, live_server.pace, time.monotonic())


def leave_mid_request(live_server, http, body: dict, after_s: float, stream: bool = False) -> None:
    """Post `body`, give up on the answer after `after_s`, and expect vLLM idle soon after."""
    with httpx.Client(base_url=live_server.url, headers=http.headers, timeout=after_s) as c:
        if stream:
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}):
                assert busy_for(http, after_s)
        else:
            try:
                c.post("/v1/completions", json=body)
            except httpx.ReadTimeout:
                pass
    assert_idle_soon(http, live_server.pace, time.monotonic())


def test_non_stream_disconnect_aborts_the_engine_request(live_server, http):
    leave_mid_request(live_server, http, LONG, after_s=2)
    counted = scrape(http)
    assert value(counted, "powerserve_requests_total", outcome="aborted") >= 1
