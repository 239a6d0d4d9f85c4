"""The admission gate in-process: slots, the queue's order, and the edge cases of leaving it."""

import asyncio

import pytest
from prometheus_client import REGISTRY

from server.admission import Gate
from server.errors import APIError

pytestmark = pytest.mark.fast  # needs no engine: `make test-fast`


def gate(concurrent: int = 1, queued: int = 2) -> Gate:
    return Gate("model", "power_mcmc", concurrent, queued)


def queued() -> float:
    return REGISTRY.get_sample_value("powerserve_requests_queued", {"model": "model", "sampler": "power_mcmc"})


def test_slots_then_queue_in_order_then_429():
    async def scenario():
        g = gate()
        first = g.admit()
        waiting = [g.admit(), g.admit()]
        with pytest.raises(APIError) as refused:
            g.admit()
        assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
        order = []

        async def run(name, ticket):
            await ticket.wait()
            order.append(name)
            await asyncio.sleep(0)
            ticket.release()

        await first.wait()
        tasks = [asyncio.create_task(run(i, t)) for i, t in enumerate(waiting)]
        await asyncio.sleep(0)
        assert order == [] and queued() == 2
        first.release()
        await asyncio.gather(*tasks)
        return order, g

    order, g = asyncio.run(scenario())
    assert order == [0, 1]
    assert g.running == 0 and not g.waiting and queued() == 0


def test_leaving_the_queue_frees_its_place_and_a_handed_over_slot_passes_on():
    async def scenario():
        g = gate(queued=3)
        holder = g.admit()
        left, handed, last = g.admit(), g.admit(), g.admit()
        waiter = asyncio.create_task(left.wait())
        await asyncio.sleep(0)
        waiter.cancel()  # a client that goes away while queued
        await asyncio.gather(waiter, return_exceptions=True)
        left.release()
        assert len(g.waiting) == 2
        holder.release()  # hands the slot to `handed`, whose client has gone before using it
        handed.release()
        await asyncio.wait_for(last.wait(), 1)  # so the slot passes on to the next in line
        assert g.running == 1 and not g.waiting
        last.release()
        last.release()  # only the first release counts
        return g

    g = asyncio.run(scenario())
    assert g.running == 0 and not g.waiting
