"""What admission control buys: plain requests' latency while power requests flood the server.

`python -m benchmarks.overload` starts our server on the embedded model twice, with the power
samplers' default gates and with them opened wide, and in each measures a sequence of plain
`direct` requests alone and then while `--flood` clients send `power_scalable` requests back to
back. The figures are ratios to the plain requests alone, taken side by side in one run, plus the
power work done meanwhile and any 429s. Results go to benchmarks/results/overload.json.
"""

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time

import openai

from harness.results import RESULTS, header
from harness.servers import UNGATED, embedded_server

logger = logging.getLogger("benchmarks.overload")

SERVED = "smollm2"
PORT = 8106
POWER = {"sampler": "power_scalable", "candidates": 4, "rollouts": 4, "rollout_horizon": 16}
SETTINGS = {"default gates": (), "gates opened": UNGATED}


async def plain_latencies(client: openai.AsyncOpenAI, count: int, max_tokens: int) -> list[float]:
    """Seconds per plain request, one after another."""
    latencies = []
    for i in range(count):
        start = time.perf_counter()
        await client.completions.create(model=SERVED, prompt=f"Story {i}: Once upon a time", max_tokens=max_tokens,
                                        extra_body={"ignore_eos": True})
        latencies.append(time.perf_counter() - start)
    return latencies


async def flood(client: openai.AsyncOpenAI, stop: asyncio.Event, tally: dict, max_tokens: int) -> None:
    """Send power requests back to back until told to stop; count what came back."""
    while not stop.is_set():
        try:
            r = await client.completions.create(model=SERVED, prompt="Once upon a time", max_tokens=max_tokens,
                                                extra_body={**POWER, "ignore_eos": True})
            tally["completed"] += 1
            tally["tokens"] += r.usage.completion_tokens
        except openai.RateLimitError:
            tally["refused"] += 1
            await asyncio.sleep(1)


async def measure(base_url: str, args: argparse.Namespace) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=3600)
    await plain_latencies(client, 2, args.max_tokens)  # warm-up
    alone = await plain_latencies(client, args.requests, args.max_tokens)
    stop, tally = asyncio.Event(), {"completed": 0, "tokens": 0, "refused": 0}
    flooders = [asyncio.create_task(flood(client, stop, tally, args.power_max_tokens)) for _ in range(args.flood)]
    await asyncio.sleep(args.ramp_s)  # let the flood fill the engine
    start = time.perf_counter()
    loaded = await plain_latencies(client, args.requests, args.max_tokens)
    elapsed = time.perf_counter() - start
    stop.set()
    for task in flooders:
        task.cancel()
    await asyncio.gather(*flooders, return_exceptions=True)
    return {
        "plain_latency_alone_median_s": statistics.median(alone),
        "plain_latency_flooded_median_s": statistics.median(loaded),
        "plain_latency_ratio": statistics.median(loaded) / statistics.median(alone),
        "power_completed_during_ramp_and_measure": tally["completed"],
        "power_tokens_per_s": tally["tokens"] / (elapsed + args.ramp_s),
        "power_refused_429": tally["refused"],
        "measure_s": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__)
    parser.add_argument("--flood", type=int, default=16, help="Concurrent power_scalable clients.")
    parser.add_argument("--requests", type=int, default=10, help="Plain requests measured per condition.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens per plain request.")
    parser.add_argument("--power-max-tokens", type=int, default=32, help="Tokens per power request.")
    parser.add_argument("--ramp-s", type=float, default=20.0, help="Seconds of flood before measuring.")
    parser.add_argument("--output", default=str(RESULTS / "overload.json"))
    args = parser.parse_args(argv)
    report = {**header("benchmarks.overload", sys.argv[1:] if argv is None else argv),
              "power_request": {**POWER, "max_tokens": args.power_max_tokens}, "flood_clients": args.flood,
              "plain_requests": args.requests, "plain_max_tokens": args.max_tokens, "settings": {}}
    for name, flags in SETTINGS.items():
        logger.info("Measuring with %s", name)
        with embedded_server(SERVED, PORT, flags) as base_url:
            report["settings"][name] = {"flags": list(flags), **asyncio.run(measure(base_url, args))}
        logger.info("%s: %s", name, report["settings"][name])
    with open(args.output, "w") as out:
        json.dump(report, out, indent=2)
    logger.info("Wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
