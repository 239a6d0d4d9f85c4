"""Admission control: how many requests of each sampler run at once, how many may wait, and how
much one request may cost and how long it may take.

Samplers' costs differ by orders of magnitude, so each has its own gate: up to `max_concurrent`
requests run, up to `max_queued` more wait their turn in arrival order, and past that a request
is refused at once with 429 and a `Retry-After`.
"""

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

from server.errors import APIError
from server.metrics import QUEUED


@dataclass(frozen=True)
class Limits:
    """The server's admission settings (see `python -m server --help`)."""

    max_concurrent: dict[str, int] = field(default_factory=dict)  # by sampler; else its default
    max_queued: dict[str, int] = field(default_factory=dict)  # by sampler; else QUEUE_FACTOR x
    max_request_cost: int = 1_000_000  # engine tokens, by the sampler's own upper bound
    request_timeout: float = 1200.0  # seconds, from arrival to the last byte, queueing included
    max_request_timeout: float = 3600.0  # the most a request's `request_timeout` may ask for


QUEUE_FACTOR = 4


class Gate:
    """The running and waiting requests of one sampler."""

    def __init__(self, model: str, sampler: str, max_concurrent: int, max_queued: int):
        self.sampler = sampler
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.running = 0
        self.waiting: deque[asyncio.Future] = deque()
        self.queued_gauge = QUEUED.labels(model=model, sampler=sampler)
        self.queued_gauge.set(0)
        self.mean_run_s = 1.0  # a moving average of how long a request holds its slot

    def admit(self) -> "Ticket":
        """A place for one request, running or waiting; 429 when the queue is full."""
        if self.running < self.max_concurrent and not self.waiting:
            self.running += 1
            return Ticket(self, None)
        if len(self.waiting) >= self.max_queued:
            retry_after = max(1, math.ceil(self.mean_run_s / self.max_concurrent))
            raise APIError(
                429, f"The server is at capacity for sampler '{self.sampler}' ({self.running} running, "
                f"{len(self.waiting)} waiting); retry after {retry_after} s.",
                headers={"Retry-After": str(retry_after)})
        turn = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        self.queued_gauge.set(len(self.waiting))
        return Ticket(self, turn)

    def _leave(self, held_s: float | None, turn: asyncio.Future | None) -> None:
        if held_s is None:  # it never ran: just leave the queue
            self.waiting.remove(turn)
        else:
            self.running -= 1
            self.mean_run_s = 0.8 * self.mean_run_s + 0.2 * held_s
        while self.running < self.max_concurrent and self.waiting:
            self.waiting.popleft().set_result(None)
            self.running += 1
        self.queued_gauge.set(len(self.waiting))


class Ticket:
    """One request's place at a gate: `wait` for its turn, `release` exactly once when done."""

    def __init__(self, gate: Gate, turn: asyncio.Future | None):
        self.gate = gate
        self.turn = turn  # None: admitted at once
        self.started = time.monotonic() if turn is None else None
        self.released = False

    async def wait(self) -> None:
        if self.turn is not None and self.started is None:
            # Not cancelled by a client that leaves: the slot may have been handed over already.
            await asyncio.shield(self.turn)
            self.started = time.monotonic()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.started is None and self.turn is not None and self.turn.done():
            self.started = time.monotonic()  # given the slot, but gone before it used it
        held_s = None if self.started is None else time.monotonic() - self.started
        self.gate._leave(held_s, self.turn)


def parse_per_sampler(values: list[str] | None, flag: str, samplers, minimum: int) -> dict[str, int]:
    """`SAMPLER=N` flag values as a dict; exits with a usage message on a malformed one."""
    limits = {}
    for value in values or ():
        name, _, number = value.partition("=")
        if name not in samplers or not number.isdigit() or int(number) < minimum:
            raise SystemExit(f"{flag} takes SAMPLER=N with N >= {minimum} and SAMPLER one of "
                             f"{', '.join(sorted(samplers))}; got '{value}'.")
        limits[name] = int(number)
    return limits
