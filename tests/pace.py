"""How fast a test server decodes, measured on it once, so that tests size the work that must keep
the engine busy, and their deadlines and client timeouts, from this machine's speed instead of from
fixed seconds. Machines of this project's kind differ several times in speed (docs/testing.md,
"Tests on a slower CPU")."""

import math
import statistics
import time
from dataclasses import dataclass

import httpx

# A lone 32-token direct decode of the embedded model takes about this long per token on the AVX-512
# machines on which the suite's fixed seconds were first chosen (19-24 tokens/s, float32 or bf16).
REFERENCE_S_PER_TOKEN = 0.05
PROBE_TOKENS = 32


@dataclass(frozen=True)
class Pace:
    s_per_token: float  # wall-clock per generated token of one request alone, request overhead included

    @property
    def slowdown(self) -> float:
        """How many times slower than the reference machine; never below 1, so that a faster
        machine keeps the margins the suite was written with."""
        return max(1.0, self.s_per_token / REFERENCE_S_PER_TOKEN)

    def timeout(self, reference_s: float) -> float:
        """A timeout of `reference_s` on the reference machine, stretched to this one."""
        return reference_s * self.slowdown

    def tokens_for(self, seconds: float) -> int:
        """How many tokens one request alone decodes in at least `seconds`."""
        return math.ceil(seconds / self.s_per_token)


def measure_pace(http: httpx.Client, model: str) -> Pace:
    """The median of three timed lone decodes, after one untimed one that warms the engine up."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": PROBE_TOKENS, "ignore_eos": True}
    times = []
    for _ in range(4):
        start = time.monotonic()
        http.post("/v1/completions", json=body, timeout=600).raise_for_status()
        times.append(time.monotonic() - start)
    return Pace(statistics.median(times[1:]) / PROBE_TOKENS)
