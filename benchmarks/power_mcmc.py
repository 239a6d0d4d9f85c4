"""`python -m benchmarks.power_mcmc {fidelity,latency}`: how exact and how fast power_mcmc is.

fidelity: on the tiny enumerable Llama of the tests, total variation between the completions of
  independent chains and the exact p^alpha, against MCMC steps, for proposal temperature 1/alpha
  (the paper's) and 1, beside the exact law of the chain after that many steps; and the paper's
  block defaults. Writes power_mcmc_fidelity.json and .png.
latency: on the embedded SmolLM2 through our server, wall-clock of power_mcmc against direct at
  the same max_tokens, 1 and 8 concurrent requests, beside the engine-token multiplier. Writes
  power_mcmc_latency.json.
selfreward: on GSM8K test prompts (the chat template, the embedded SmolLM2), the mean base-model
  log p per token and per completion, and answer accuracy, of direct sampling, temperature
  1/alpha and power_mcmc. Each completion is appended to power_mcmc_selfreward.jsonl as it
  finishes; a rerun skips what is there. Writes power_mcmc_selfreward.json.
"""

import argparse
import datetime
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from benchmarks.vs_vllm import start_server, stop_server, wait_healthy

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"

logger = logging.getLogger("benchmarks.power_mcmc")
RESULTS = Path(__file__).parent / "results"
ALPHA = 4.0


def _header(argv: list[str]) -> dict:
    return {
        "command": " ".join(["python", "-m", "benchmarks.power_mcmc", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
    }


def fidelity(args: argparse.Namespace) -> dict:
    from samplers import DecodeParams
    from samplers.power_mcmc import PowerMCMCParams, PowerMCMCSampler
    from tests import tiny_models as tm

    max_tokens = 3
    directory = tm.build(Path(tempfile.mkdtemp()), seed=0, sharpness=12.0, eos_bias=1.0)
    table = tm.next_token_logprobs(directory, tm.PROMPT, max_tokens)
    target = tm.power_distribution(table, max_tokens, ALPHA)
    drawer = tm.TinyEngine(directory)

    def empirical(steps: int, temperature: float, block_size: int) -> tuple[float, float]:
        """TV of `args.chains` chains' completions to p^alpha, and engine tokens per completion."""
        params = PowerMCMCParams(power_alpha=ALPHA, mcmc_steps=steps, block_size=block_size,
                                 proposal_temperature=temperature)
        results = drawer.draw(PowerMCMCSampler(), args.chains, DecodeParams(max_tokens=max_tokens), params)
        counts = Counter(tuple(d.token_ids) for deltas, _ in results for d in deltas)
        total = sum(counts.values())
        tokens = sum(s.generated + s.scored for _, s in results) / total
        return tm.total_variation({y: c / total for y, c in counts.items()}, target), tokens

    curves = {}
    try:
        for label, temperature in (("proposal temperature 1/alpha", 1 / ALPHA), ("proposal temperature 1", 1.0)):
            points = []
            for steps in args.steps:
                tv, tokens = empirical(steps, temperature, block_size=max_tokens)
                exact = tm.total_variation(tm.mcmc_distribution(table, max_tokens, ALPHA, steps, temperature), target)
                points.append({"steps": steps, "tv": tv, "exact_chain_tv": exact, "engine_tokens_per_completion": tokens})
                logger.info("%s, %d steps: TV %.3f (exact chain %.3f), %.1f engine tokens", label, steps, tv, exact, tokens)
            curves[label] = points
        paper_tv, paper_tokens = empirical(10, 1 / ALPHA, block_size=math.ceil(max_tokens / 16))
    finally:
        drawer.close()
    reference = {
        "plain sampling": tm.total_variation(tm.tempered_distribution(table, max_tokens, 1.0), target),
        "temperature 1/alpha": tm.total_variation(tm.tempered_distribution(table, max_tokens, 1 / ALPHA), target),
        "chain without the length term, 32 steps": tm.total_variation(
            tm.mcmc_distribution(table, max_tokens, ALPHA, 32, 1.0, length_term=False), target),
    }
    noise = 0.5 * sum(math.sqrt(p * (1 - p) / args.chains) for p in target.values())
    report = {"alpha": ALPHA, "max_tokens": max_tokens, "chains_per_point": args.chains,
              "expected_tv_from_sampling_noise_at_most": noise, "curves": curves,
              "paper_defaults": {"block_size": 1, "mcmc_steps": 10, "proposal_temperature": 1 / ALPHA,
                                 "tv": paper_tv, "engine_tokens_per_completion": paper_tokens},
              "references": reference}
    _plot(report, RESULTS / "power_mcmc_fidelity.png")
    return report


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, points), colour in zip(report["curves"].items(), ("tab:orange", "tab:blue")):
        steps = [p["steps"] for p in points]
        ax.plot(steps, [p["tv"] for p in points], "o-", color=colour, label=f"{label} (vLLM, measured)")
        ax.plot(steps, [p["exact_chain_tv"] for p in points], "--", color=colour, label=f"{label} (exact chain law)")
    for (label, tv), colour in zip(report["references"].items(), ("tab:green", "tab:red", "tab:purple")):
        ax.axhline(tv, color=colour, linestyle=":", label=label)
    ax.axhline(report["expected_tv_from_sampling_noise_at_most"], color="black", linewidth=0.5,
               label="sampling-noise level")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_xlabel("MCMC steps (one block)")
    ax.set_ylabel("total variation to exact p^alpha")
    ax.set_title(f"power_mcmc on a tiny random Llama, alpha = {report['alpha']:g}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def latency(args: argparse.Namespace) -> dict:
    from openai import OpenAI

    from server import embedded_model

    port = 8103
    process = start_server("ours", str(embedded_model.prepare()), "smollm2", port)
    try:
        wait_healthy("ours", process, port, 600)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
        power = {"sampler": "power_mcmc", "power_alpha": ALPHA, "mcmc_steps": args.mcmc_steps,
                 "block_size": math.ceil(args.max_tokens / args.blocks)}

        def one(extra: dict) -> tuple[float, dict]:
            start = time.perf_counter()
            r = client.completions.create(model="smollm2", prompt=args.prompt, max_tokens=args.max_tokens,
                                          extra_body={"ignore_eos": True, **extra})
            spend, output = r.sampler_usage, r.usage.completion_tokens
            generated = spend["engine_tokens_generated"] / output
            return time.perf_counter() - start, {
                "multiplier": generated + spend["engine_tokens_scored"] / output,
                "generated_multiplier": generated, **spend}

        def batch(extra: dict, concurrency: int) -> dict:
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(one, [extra] * concurrency))
            return {"wall_s": time.perf_counter() - start,
                    "median_request_s": statistics.median(r[0] for r in results),
                    "token_multiplier": statistics.median(r[1]["multiplier"] for r in results),
                    "generated_token_multiplier": statistics.median(r[1]["generated_multiplier"] for r in results),
                    "acceptance_rate": results[0][1]["details"].get("acceptance_rate")}

        one({})  # warm-up
        rows = {}
        for concurrency in (1, 8):
            rows[f"direct x{concurrency}"] = batch({}, concurrency)
            rows[f"power_mcmc x{concurrency}"] = batch(power, concurrency)
            direct, mcmc = rows[f"direct x{concurrency}"], rows[f"power_mcmc x{concurrency}"]
            mcmc["wall_clock_ratio_to_direct"] = mcmc["wall_s"] / direct["wall_s"]
            logger.info("x%d: direct %.1f s, power_mcmc %.1f s (ratio %.1f, token multiplier %.1f)", concurrency,
                        direct["wall_s"], mcmc["wall_s"], mcmc["wall_clock_ratio_to_direct"], mcmc["token_multiplier"])
    finally:
        stop_server("ours", process)
    return {"max_tokens": args.max_tokens, "power": power, "prompt": args.prompt, "rows": rows}


def last_number(text: str) -> str | None:
    """The answer a completion gives: its last number, commas dropped (GSM8K's "#### N" for refs)."""
    import re

    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def selfreward(args: argparse.Namespace) -> dict:
    import torch
    from openai import OpenAI
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from server import embedded_model

    model_dir = embedded_model.prepare()
    problems = [json.loads(line) for line in GSM8K.read_text().splitlines()[: args.prompts]]
    samplers = {
        "direct": {},
        "temperature 1/alpha": {"temperature": 1 / ALPHA},
        "power_mcmc": {"sampler": "power_mcmc", "power_alpha": ALPHA, "mcmc_steps": args.mcmc_steps},
    }
    log_path = RESULTS / "power_mcmc_selfreward.jsonl"
    done = {(r["sampler"], r["index"]) for r in map(json.loads, log_path.read_text().splitlines())} \
        if log_path.exists() else set()
    todo = [(name, i) for name in samplers for i in range(len(problems)) if (name, i) not in done]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    port = 8104
    process = start_server("ours", str(model_dir), "smollm2", port)
    try:
        wait_healthy("ours", process, port, 600)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=7200)

        def complete(job: tuple[str, int]) -> dict:
            name, i = job
            start = time.perf_counter()
            r = client.chat.completions.create(
                model="smollm2", max_tokens=args.max_tokens, seed=i,
                messages=[{"role": "user", "content": problems[i]["question"]}],
                extra_body={**samplers[name], "return_token_ids": True})
            return {"sampler": name, "index": i, "latency_s": time.perf_counter() - start,
                    "prompt_token_ids": r.prompt_token_ids, "token_ids": r.choices[0].token_ids,
                    "text": r.choices[0].message.content, "sampler_usage": r.sampler_usage}

        with ThreadPoolExecutor(args.concurrency) as pool, open(log_path, "a") as log:
            futures = [pool.submit(complete, job) for job in todo]
            for future in tqdm(as_completed(futures), total=len(todo), desc="completions"):
                record = future.result()
                ids = record["prompt_token_ids"] + record["token_ids"]
                with torch.no_grad():  # the base model's log p of the completion, temperature 1
                    logprobs = torch.log_softmax(base(torch.tensor([ids])).logits[0].double(), dim=-1)
                start = len(record["prompt_token_ids"])
                record["logp"] = sum(logprobs[start + t - 1, tok].item() for t, tok in enumerate(record["token_ids"]))
                record["correct"] = last_number(record["text"]) == problems[record["index"]]["answer"].split("####")[-1].strip().replace(",", "")
                log.write(json.dumps(record) + "\n")
                log.flush()
    finally:
        stop_server("ours", process)
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    summary = {}
    for name in samplers:
        rows = [r for r in records if r["sampler"] == name and r["index"] < len(problems)]
        tokens = sum(len(r["token_ids"]) for r in rows)
        summary[name] = {
            "completions": len(rows),
            "mean_logp_per_token": sum(r["logp"] for r in rows) / max(tokens, 1),
            "mean_logp_per_completion": statistics.mean(r["logp"] for r in rows),
            "mean_length": tokens / len(rows),
            "accuracy": statistics.mean(r["correct"] for r in rows),
            "median_latency_s": statistics.median(r["latency_s"] for r in rows),
        }
    return {"prompts": len(problems), "max_tokens": args.max_tokens, "concurrency": args.concurrency,
            "samplers": samplers, "answer_extraction": "last number in the completion == GSM8K's #### answer",
            "summary": summary}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.power_mcmc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fid = commands.add_parser("fidelity")
    fid.add_argument("--chains", type=int, default=1024, help="independent chains per point (multiple of 64)")
    fid.add_argument("--steps", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32])
    lat = commands.add_parser("latency")
    lat.add_argument("--max-tokens", type=int, default=64)
    lat.add_argument("--blocks", type=int, default=16)
    lat.add_argument("--mcmc-steps", type=int, default=10)
    lat.add_argument("--prompt", default="Question: what is 12 times 7? Answer step by step.")
    reward = commands.add_parser("selfreward")
    reward.add_argument("--prompts", type=int, default=16, help="the first N GSM8K test questions")
    reward.add_argument("--max-tokens", type=int, default=128)
    reward.add_argument("--mcmc-steps", type=int, default=10)
    reward.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    run = {"fidelity": fidelity, "latency": latency, "selfreward": selfreward}[args.command]
    report = {**_header(sys.argv[1:]), **run(args)}
    path = RESULTS / f"power_mcmc_{args.command}.json"
    path.write_text(json.dumps(report, indent=2))
    logger.info("Wrote %s", path)


if __name__ == "__main__":
    main()
