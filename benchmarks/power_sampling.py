"""`python -m benchmarks.power_sampling {fidelity,latency,proposal,lookahead,smc}`: how exact and how
fast the power samplers are, each measured side by side in one run (how good they are on real
questions: benchmarks/frontier.py).

fidelity: on the tiny enumerable Llama of the tests, total variation between independent
  completions and the exact p^alpha. power_mcmc against MCMC steps, for proposal temperature
  1/alpha (the paper's) and 1, beside the exact law of the chain after that many steps;
  power_scalable (token level, every token a candidate) against rollouts M with and without the
  jackknife, for both proposals, beside the algorithm's own law at that M; power_smc against
  particles N, beside its simulated law at that N. All against engine tokens per completion. Writes
  power_sampling_fidelity.json and .png.
latency: on the embedded SmolLM2 through our server, wall-clock of each power configuration
  against direct at the same max_tokens, 1 and 8 concurrent requests, beside the engine-token
  multiplier. Writes power_sampling_latency.json.
proposal: power_mcmc's proposal paths on the embedded SmolLM2 at T = 128, 16 blocks, 10 steps:
  one pass (raw_logprobs engine) and scoring (processed_logprobs engine), and KV blocks of 128
  tokens (vLLM's CPU default) against 32, each on a server of its own beside direct on it, one
  request alone and 8 at once: wall-clock and engine tokens (prefills included) per output token.
  Writes power_sampling_proposal.json.
lookahead: power_mcmc's one-pass proposal at look-ahead depths 1 (none), 4 and 10 (a whole
  stage's steps) beside direct, on one server, in alternating rounds: wall-clock ratio, acceptance
  rate, discarded draws per proposal used, engine tokens per output token. Writes
  power_sampling_lookahead.json.
smc: power_smc at 4 and 16 particles beside direct, on one server, in alternating rounds, at 64
  and 128 tokens, 1 and 8 requests at once: wall-clock ratio, engine tokens per output token,
  resamplings. Writes power_sampling_smc.json.
"""

import argparse
import itertools
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.results import RESULTS, header
from harness.servers import embedded_server

logger = logging.getLogger("benchmarks.power_sampling")
ALPHA = 4.0

# Request bodies of the configurations the latency and self-reward runs compare.
MCMC = {"sampler": "power_mcmc", "power_alpha": ALPHA, "mcmc_steps": 10}
SCALABLE = {
    "power_scalable (defaults: tempered, blocks of 16, K=M=8, H=32)": {"sampler": "power_scalable",
                                                                       "power_alpha": ALPHA},
    "power_scalable (base proposal, blocks of 16, K=M=8, H=32)": {
        "sampler": "power_scalable", "power_alpha": ALPHA, "proposal": "base"},
    "power_scalable (tempered, blocks of 16, K=M=4, H=16)": {
        "sampler": "power_scalable", "power_alpha": ALPHA, "candidates": 4, "rollouts": 4, "rollout_horizon": 16},
    "power_scalable (token level, K=4, M=2, H=8)": {
        "sampler": "power_scalable", "power_alpha": ALPHA, "block_size": 1, "candidates": 4, "rollouts": 2,
        "rollout_horizon": 8},
}


def fidelity(args: argparse.Namespace) -> dict:
    from harness import tiny_models as tm
    from samplers import DecodeParams
    from samplers.power_mcmc import PowerMCMCParams, PowerMCMCSampler
    from samplers.power_scalable import PowerScalableParams, PowerScalableSampler
    from samplers.power_smc import PowerSMCParams, PowerSMCSampler

    max_tokens = tm.MAX_TOKENS
    directory = tm.build(Path(tempfile.mkdtemp()), tm.SEED, tm.SHARPNESS, tm.EOS_TILT)  # the tests' model
    table = tm.next_token_logprobs(directory, tm.PROMPT, max_tokens)
    target = tm.power_distribution(table, max_tokens, ALPHA)
    engine = tm.TinyEngine(directory)

    def empirical(sampler, params) -> tuple[float, float]:
        """TV of `args.samples` completions to p^alpha, and engine tokens per completion."""
        results = engine.draw(sampler, args.samples, DecodeParams(max_tokens=max_tokens), params)
        counts = Counter(tuple(d.token_ids) for deltas, _ in results for d in deltas)
        total = sum(counts.values())
        tokens = sum(s.generated + s.scored for _, s in results) / total
        return tm.total_variation({y: c / total for y, c in counts.items()}, target), tokens

    curves = {}
    try:
        for label, temperature in (("proposal temperature 1/alpha", 1 / ALPHA), ("proposal temperature 1", 1.0)):
            points = []
            for steps in args.steps:
                params = PowerMCMCParams(power_alpha=ALPHA, mcmc_steps=steps, block_size=max_tokens,
                                         proposal_temperature=temperature)
                tv, tokens = empirical(PowerMCMCSampler(), params)
                exact = tm.total_variation(tm.mcmc_distribution(table, max_tokens, ALPHA, steps, temperature), target)
                points.append({"steps": steps, "tv": tv, "exact_law_tv": exact, "engine_tokens_per_completion": tokens})
                logger.info("power_mcmc %s, %d steps: TV %.3f (exact chain %.3f), %.1f engine tokens",
                            label, steps, tv, exact, tokens)
            curves[f"power_mcmc, {label}"] = points
        for proposal, jackknife in itertools.product(("base", "tempered"), (False, True)):
            points = []
            for rollouts in args.rollouts:
                if jackknife and rollouts < 2:
                    continue
                params = PowerScalableParams(power_alpha=ALPHA, block_size=1, candidates=len(tm.VOCAB),
                                             rollouts=rollouts, rollout_horizon=max_tokens, jackknife=jackknife,
                                             proposal=proposal)
                tv, tokens = empirical(PowerScalableSampler(), params)
                law, _ = tm.scalable_distribution(table, max_tokens, ALPHA, rollouts, jackknife, args.reference_reps,
                                                  proposal=proposal)
                exact = tm.total_variation(law, target)
                points.append({"rollouts": rollouts, "tv": tv, "exact_law_tv": exact,
                               "engine_tokens_per_completion": tokens})
                logger.info("power_scalable %s M=%d jackknife=%s: TV %.3f (its law %.3f), %.1f engine tokens",
                            proposal, rollouts, jackknife, tv, exact, tokens)
            curves[f"power_scalable, token level, {proposal}, {'with' if jackknife else 'no'} jackknife"] = points
        points = []
        for particles in args.particles:
            tv, tokens = empirical(PowerSMCSampler(), PowerSMCParams(power_alpha=ALPHA, particles=particles,
                                                                     proposal_top_k=0))
            law, _ = tm.smc_distribution(table, max_tokens, ALPHA, particles, 0.5, args.reference_reps)
            points.append({"particles": particles, "tv": tv, "exact_law_tv": tm.total_variation(law, target),
                           "engine_tokens_per_completion": tokens})
            logger.info("power_smc N=%d: TV %.3f (its law %.3f), %.1f engine tokens", particles, tv,
                        points[-1]["exact_law_tv"], tokens)
        curves["power_smc, untruncated"] = points
    finally:
        engine.close()
    reference = {
        "plain sampling": tm.total_variation(tm.tempered_distribution(table, max_tokens, 1.0), target),
        "temperature 1/alpha": tm.total_variation(tm.tempered_distribution(table, max_tokens, 1 / ALPHA), target),
        "chain without the length term, 32 steps": tm.total_variation(
            tm.mcmc_distribution(table, max_tokens, ALPHA, 32, 1.0, length_term=False), target),
    }
    noise = 0.5 * sum(math.sqrt(p * (1 - p) / args.samples) for p in target.values())
    report = {"alpha": ALPHA, "max_tokens": max_tokens, "samples_per_point": args.samples,
              "expected_tv_from_sampling_noise_at_most": noise, "curves": curves, "references": reference}
    _plot(report, RESULTS / "power_sampling_fidelity.png")
    return report


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = ("tab:orange", "tab:blue", "tab:olive", "tab:cyan", "tab:brown", "tab:pink", "tab:gray", "black")
    for (label, points), colour in zip(report["curves"].items(), colours):
        tokens = [p["engine_tokens_per_completion"] for p in points]
        ax.plot(tokens, [p["tv"] for p in points], "o-", color=colour, label=f"{label} (vLLM, measured)")
        ax.plot(tokens, [p["exact_law_tv"] for p in points], "--", color=colour, label=f"{label} (its exact law)")
    for (label, tv), colour in zip(report["references"].items(), ("tab:green", "tab:red", "tab:purple")):
        ax.axhline(tv, color=colour, linestyle=":", label=label)
    ax.axhline(report["expected_tv_from_sampling_noise_at_most"], color="black", linewidth=0.5,
               label="sampling-noise level")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("engine tokens per completion (generated + scored)")
    ax.set_ylabel("total variation to exact p^alpha")
    ax.set_title(f"Power samplers on a tiny random Llama, alpha = {report['alpha']:g}: fidelity against compute")
    ax.legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def timed_batch(client, prompt: str, max_tokens: int, extra: dict, concurrency: int) -> dict:
    """`concurrency` requests at once, each with a seed of its own (so that they do not share their
    draws): the wall-clock and the medians of their time and engine-token multipliers."""

    def one(seed: int) -> tuple[float, dict]:
        start = time.perf_counter()
        r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens, seed=seed,
                                      extra_body={"ignore_eos": True, **extra})
        spend, output = r.sampler_usage, r.usage.completion_tokens
        return time.perf_counter() - start, {
            "multiplier": (spend["engine_tokens_generated"] + spend["engine_tokens_scored"]) / output,
            "generated_multiplier": spend["engine_tokens_generated"] / output,
            "with_prefills_multiplier": (spend["engine_tokens_generated"] + spend["engine_tokens_prefilled"]
                                         + spend["engine_tokens_scored"]) / output, **spend}

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(concurrency)))
    return {"wall_s": time.perf_counter() - start,
            "median_request_s": statistics.median(r[0] for r in results),
            "token_multiplier": statistics.median(r[1]["multiplier"] for r in results),
            "generated_token_multiplier": statistics.median(r[1]["generated_multiplier"] for r in results),
            "engine_token_multiplier_with_prefills": statistics.median(
                r[1]["with_prefills_multiplier"] for r in results),
            "events": results[0][1]["events"], "details": results[0][1]["details"],
            "proposal": results[0][1].get("proposal")}


def latency(args: argparse.Namespace) -> dict:
    from openai import OpenAI

    configs = {"power_mcmc (16 blocks, 10 steps)": {**MCMC, "block_size": math.ceil(args.max_tokens / 16)},
               **SCALABLE}
    with embedded_server("smollm2", 8103) as base_url:
        client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=3600)
        timed_batch(client, args.prompt, args.max_tokens, {}, 1)  # warm-up
        rows = {}
        for concurrency in (1, 8):
            direct = rows[f"direct x{concurrency}"] = timed_batch(client, args.prompt, args.max_tokens, {}, concurrency)
            for label, extra in configs.items():
                row = rows[f"{label} x{concurrency}"] = timed_batch(client, args.prompt, args.max_tokens, extra,
                                                                    concurrency)
                row["wall_clock_ratio_to_direct"] = row["wall_s"] / direct["wall_s"]
                logger.info("x%d %s: %.1f s against direct's %.1f s (ratio %.1f, token multiplier %.1f)",
                            concurrency, label, row["wall_s"], direct["wall_s"], row["wall_clock_ratio_to_direct"],
                            row["token_multiplier"])
    return {"max_tokens": args.max_tokens, "prompt": args.prompt, "configs": configs, "rows": rows}


def proposal(args: argparse.Namespace) -> dict:
    """power_mcmc's proposal paths, each on a server of its own, beside direct on the same server;
    one step at a time (the `lookahead` command measures drawing ahead)."""
    from openai import OpenAI

    from harness.servers import UNGATED, free_port

    mcmc = {**MCMC, "block_size": math.ceil(args.max_tokens / 16), "lookahead": 1}
    servers = {f"{mode}, KV blocks of {size}": (mode, size) for mode, size in args.servers}
    rows = {}
    for name, (mode, size) in servers.items():
        flags = (*UNGATED, "--logprobs-mode", mode, "--block-size", str(size))
        with embedded_server("smollm2", free_port(), flags, log=RESULTS / "proposal-server.log") as base_url:
            client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=7200)
            timed_batch(client, args.prompt, args.max_tokens, {}, 1)  # warm-up
            for concurrency in args.concurrency:
                direct = rows[f"direct ({name}) x{concurrency}"] = timed_batch(
                    client, args.prompt, args.max_tokens, {}, concurrency)
                row = rows[f"power_mcmc ({name}) x{concurrency}"] = timed_batch(
                    client, args.prompt, args.max_tokens, mcmc, concurrency)
                row["wall_clock_ratio_to_direct"] = row["wall_s"] / direct["wall_s"]
                row["engine_token_ratio_to_direct"] = (row["engine_token_multiplier_with_prefills"]
                                                       / direct["engine_token_multiplier_with_prefills"])
                logger.info("%s x%d: power_mcmc (%s) %.1f s against direct's %.1f s (%.1fx); engine tokens "
                            "per output token %.1f against %.2f", name, concurrency, row["proposal"], row["wall_s"],
                            direct["wall_s"], row["wall_clock_ratio_to_direct"],
                            row["engine_token_multiplier_with_prefills"],
                            direct["engine_token_multiplier_with_prefills"])
    return {"max_tokens": args.max_tokens, "prompt": args.prompt, "power_mcmc": mcmc, "servers": servers,
            "rows": rows}


def alternating_rounds(client, prompt: str, max_tokens: int, concurrency: int, rounds: int,
                       configs: dict[str, dict]) -> dict:
    """Direct, then each configuration, `rounds` times over on one server, so that drift favours
    none: every run with its ratio to the direct run of its round, and the medians over rounds."""
    runs: dict[str, list[dict]] = {}
    for round_number in range(rounds):
        direct = timed_batch(client, prompt, max_tokens, {}, concurrency)
        runs.setdefault("direct", []).append(direct)
        for label, body in configs.items():
            row = timed_batch(client, prompt, max_tokens, body, concurrency)
            row["wall_clock_ratio_to_direct"] = row["wall_s"] / direct["wall_s"]
            if "proposals" in row["events"]:  # power_mcmc
                row["acceptance_rate"] = row["details"]["acceptance_rate"]
                row["discarded_per_proposal"] = row["events"].get("discarded", 0) / row["events"]["proposals"]
            if "particles" in row["events"]:  # power_smc
                row["resamplings_per_output_token"] = row["events"].get("resamplings", 0) / max_tokens
            runs.setdefault(label, []).append(row)
            logger.info("%d tokens x%d, round %d, %s: %.1f s, %.1fx direct (%.1f s), engine tokens per output "
                        "token %.1f", max_tokens, concurrency, round_number + 1, label, row["wall_s"],
                        row["wall_clock_ratio_to_direct"], direct["wall_s"], row["engine_token_multiplier_with_prefills"])
    summary = {name: {key: statistics.median(r[key] for r in rows) for key, value in rows[0].items()
                      if isinstance(value, (int, float))} for name, rows in runs.items()}
    return {"summary": summary, "runs": runs}


def lookahead(args: argparse.Namespace) -> dict:
    """power_mcmc's one-pass proposal at each look-ahead depth beside direct, on one server."""
    from openai import OpenAI

    from harness.servers import UNGATED, free_port

    mcmc = {**MCMC, "block_size": math.ceil(args.max_tokens / 16)}
    configs = {f"lookahead {depth}": {**mcmc, "lookahead": depth} for depth in args.depths}
    with embedded_server("smollm2", free_port(), UNGATED, log=RESULTS / "lookahead-server.log") as base_url:
        client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=7200)
        timed_batch(client, args.prompt, args.max_tokens, {}, 1)  # warm-up
        rounds = alternating_rounds(client, args.prompt, args.max_tokens, args.concurrency, args.rounds, configs)
    return {"max_tokens": args.max_tokens, "prompt": args.prompt, "concurrency": args.concurrency,
            "power_mcmc": mcmc, **rounds}


def smc(args: argparse.Namespace) -> dict:
    """power_smc at each particle count beside direct, on one server, at each length and concurrency."""
    from openai import OpenAI

    from harness.servers import UNGATED, free_port

    configs = {f"power_smc ({n} particles)": {"sampler": "power_smc", "power_alpha": ALPHA, "particles": n}
               for n in args.particles}
    points = {}
    with embedded_server("smollm2", free_port(), UNGATED, log=RESULTS / "smc-server.log") as base_url:
        client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=7200)
        timed_batch(client, args.prompt, max(args.max_tokens), {}, 1)  # warm-up
        for max_tokens in args.max_tokens:
            for concurrency in args.concurrency:
                points[f"{max_tokens} tokens x{concurrency}"] = alternating_rounds(
                    client, args.prompt, max_tokens, concurrency, args.rounds, configs)
    return {"prompt": args.prompt, "configs": configs, "points": points}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.power_sampling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="the JSON to write (default: results/power_sampling_COMMAND.json)")
    commands = parser.add_subparsers(dest="command", required=True)
    fid = commands.add_parser("fidelity")
    fid.add_argument("--samples", type=int, default=1024, help="independent completions per point (multiple of 64)")
    fid.add_argument("--steps", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32], help="power_mcmc steps")
    fid.add_argument("--rollouts", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="power_scalable M")
    fid.add_argument("--particles", type=int, nargs="+", default=[1, 4, 16, 64], help="power_smc N")
    fid.add_argument("--reference-reps", type=int, default=100_000,
                     help="Monte Carlo repetitions behind power_scalable's and power_smc's laws")
    lat = commands.add_parser("latency")
    lat.add_argument("--max-tokens", type=int, default=64)
    lat.add_argument("--prompt", default="Question: what is 12 times 7? Answer step by step.")
    prop = commands.add_parser("proposal")
    prop.add_argument("--max-tokens", type=int, default=128)
    prop.add_argument("--prompt", default="Question: what is 12 times 7? Answer step by step.")
    prop.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    prop.add_argument("--servers", type=lambda spec: (spec.split(":")[0], int(spec.split(":")[1])), nargs="+",
                      default=[("raw_logprobs", 128), ("raw_logprobs", 32), ("processed_logprobs", 128)],
                      metavar="MODE:BLOCK_SIZE", help="logprobs mode and KV block size of each server")
    ahead = commands.add_parser("lookahead")
    ahead.add_argument("--max-tokens", type=int, default=128)
    ahead.add_argument("--prompt", default="Question: what is 12 times 7? Answer step by step.")
    ahead.add_argument("--concurrency", type=int, default=1, help="requests at once")
    ahead.add_argument("--depths", type=int, nargs="+", default=[1, 4, 10], help="power_mcmc lookahead values")
    ahead.add_argument("--rounds", type=int, default=2)
    particles = commands.add_parser("smc")
    particles.add_argument("--max-tokens", type=int, nargs="+", default=[64, 128])
    particles.add_argument("--prompt", default="Question: what is 12 times 7? Answer step by step.")
    particles.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="requests at once")
    particles.add_argument("--particles", type=int, nargs="+", default=[4, 16], help="power_smc particle counts")
    particles.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    run = {"fidelity": fidelity, "latency": latency, "proposal": proposal, "lookahead": lookahead,
           "smc": smc}[args.command]
    report = {**header("benchmarks.power_sampling", sys.argv[1:]), **run(args)}
    path = args.output or RESULTS / f"power_sampling_{args.command}.json"
    path.write_text(json.dumps(report, indent=2))
    logger.info("Wrote %s", path)


if __name__ == "__main__":
    main()
