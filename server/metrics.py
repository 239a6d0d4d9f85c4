"""Prometheus metrics of the server, labelled by model and sampler; updated in `RequestMetrics` only.

vLLM's engine registers its own `vllm:*` metrics in the same default registry, so `/metrics`
shows both.
"""

import logging
import time

from prometheus_client import Counter, Gauge, Histogram

from samplers import Spend

logger = logging.getLogger(__name__)

# From a 20 ms plain request to a 20-minute MCMC run.
LATENCY_BUCKETS = (
    0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0,
)

LABELS = ("model", "sampler")

REQUEST_LATENCY = Histogram(
    "powerserve_request_latency_seconds",
    "End-to-end latency of a request, from parsing to its last byte.",
    LABELS,
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "powerserve_time_to_first_token_seconds",
    "Time from the request's arrival to its first output token leaving the sampler.",
    LABELS,
    buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter(
    "powerserve_requests",
    "Finished requests by outcome: success, invalid (4xx), rejected (429: at capacity), timeout "
    "(504: past its deadline), aborted (client went away), error (5xx).",
    (*LABELS, "outcome"),
)
OUTPUT_TOKENS = Counter("powerserve_output_tokens", "Tokens returned to clients.", LABELS)
IN_FLIGHT = Gauge("powerserve_requests_in_flight", "Requests being served now, queued ones included.",
                  LABELS)
QUEUED = Gauge("powerserve_requests_queued", "Requests waiting for a slot of their sampler.", LABELS)
ENGINE_TOKENS = Counter(
    "powerserve_engine_tokens",
    "Engine tokens spent by samplers: kind=generated (decoded), prefilled (prompt tokens of the "
    "sampler's decoding requests not found in the prefix cache) or scored (run through the model "
    "for their log-probabilities). Divided by output tokens: the compute multiplier of a sampler.",
    (*LABELS, "kind"),
)

SAMPLER_EVENTS = Counter(
    "powerserve_sampler_events",
    "Sampler-specific events, e.g. power_mcmc's event=proposals and event=accepted (their ratio "
    "is the acceptance rate).",
    (*LABELS, "event"),
)


class RequestMetrics:
    """Observes one request; metric failures are logged, never raised into the request."""

    def __init__(self, model: str, sampler: str):
        self.labels = {"model": model, "sampler": sampler}
        self.start = time.perf_counter()
        self.first_token_seen = False
        IN_FLIGHT.labels(**self.labels).inc()

    def output_tokens(self, count: int) -> None:
        if count and not self.first_token_seen:
            self.first_token_seen = True
            TIME_TO_FIRST_TOKEN.labels(**self.labels).observe(time.perf_counter() - self.start)
        OUTPUT_TOKENS.labels(**self.labels).inc(count)

    def finish(self, outcome: str, spend: Spend) -> None:
        try:
            IN_FLIGHT.labels(**self.labels).dec()
            REQUESTS.labels(**self.labels, outcome=outcome).inc()
            REQUEST_LATENCY.labels(**self.labels).observe(time.perf_counter() - self.start)
            ENGINE_TOKENS.labels(**self.labels, kind="generated").inc(spend.generated)
            ENGINE_TOKENS.labels(**self.labels, kind="prefilled").inc(spend.prefilled)
            ENGINE_TOKENS.labels(**self.labels, kind="scored").inc(spend.scored)
            for event, count in spend.events.items():
                SAMPLER_EVENTS.labels(**self.labels, event=event).inc(count)
        except Exception:  # a metric must never break a request
            logger.exception("Failed to record request metrics")
