"""`python -m benchmarks.frontier`: every sampler's quality against its cost, measured in one run.

On the first N GSM8K test questions (seed = question index), each sampler setting answers every
question through the server. Questions go in rounds of `--concurrency`: in each round every
setting answers the round's questions, all of them at once, one setting after another, in an order
that rotates from round to round, so that a machine that slows down or speeds up during the run
favours no setting. Before the first round the reference setting answers that round once, untimed,
so that no setting pays for the engine's warm-up.

Per completion it records the wall-clock, the length, whether the last number is the reference
answer, and the engine tokens spent (decoded, prefilled and scored, from `sampler_usage`); once
every answer is in, the base model's log p of each completion (float32 Hugging Face forward pass,
as benchmarks/quality.py does it). Records are appended as they arrive to a JSONL file beside the
output and a rerun with the same settings skips them, so an interrupted run loses no finished answer.

Per setting, over the questions every setting answered:
- self-reward per token: total log p over total completion tokens;
- latency ratio: its total wall-clock over the reference's (direct at temperature 1) on the same
  questions, at the same concurrency;
- engine tokens per output token;
- 95% intervals by a paired bootstrap over questions (the same resampled questions for every
  setting), accuracy with a Wilson interval;
- the Pareto front: settings that no other setting beats on both self-reward and cost.
Writes JSON (schema: benchmarks/schemas/frontier.schema.json), a plot (.png) and a Markdown table (.md).
"""

import argparse
import json
import logging
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import quality
from harness import datasets
from harness.cli import UsageError, parse_sampler, positive
from harness.results import RESULTS, header, read_records

logger = logging.getLogger("benchmarks.frontier")

ALPHA = 4.0
DEFAULT_QUESTIONS = 32
REFERENCE = "direct"
SETTINGS = {
    REFERENCE: {},
    "temperature 1/alpha": {"temperature": 1 / ALPHA},
    "power_mcmc (defaults: 16 blocks, 10 steps)": {"sampler": "power_mcmc", "power_alpha": ALPHA},
    "power_mcmc (3 steps)": {"sampler": "power_mcmc", "power_alpha": ALPHA, "mcmc_steps": 3},
    "power_scalable (defaults: tempered, blocks of 16, K=M=8, H=32)": {"sampler": "power_scalable",
                                                                       "power_alpha": ALPHA},
    "power_scalable (tempered, K=M=4, H=16)": {
        "sampler": "power_scalable", "power_alpha": ALPHA, "candidates": 4, "rollouts": 4, "rollout_horizon": 16},
    "power_scalable (base proposal, blocks of 16, K=M=8, H=32)": {
        "sampler": "power_scalable", "power_alpha": ALPHA, "proposal": "base"},
    "power_smc (defaults: 16 particles)": {"sampler": "power_smc", "power_alpha": ALPHA},
    "power_smc (4 particles)": {"sampler": "power_smc", "power_alpha": ALPHA, "particles": 4},
}


def wilson(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% at the default z)."""
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The labels whose (cost, quality) no other point matches or beats on both, one strictly."""
    def dominated(cost: float, value: float) -> bool:
        return any(c <= cost and v >= value and (c, v) != (cost, value) for c, v in points.values())
    return [label for label, (cost, value) in points.items() if not dominated(cost, value)]


def interval(samples) -> list[float]:
    import numpy as np

    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def summarise(by_label: dict[str, dict[int, dict]], reference: str, resamples: int) -> dict[str, dict]:
    """Each label's figures with paired-bootstrap 95% intervals, over the questions every label answered."""
    import numpy as np

    questions = sorted(set.intersection(*(set(rows) for rows in by_label.values())))
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(questions), size=(resamples, len(questions)))

    def column(label: str, value) -> np.ndarray:
        return np.array([value(by_label[label][q]) for q in questions], dtype=float)

    if any(by_label[label][q]["sampler_usage"] is None for label in by_label for q in questions):
        raise UsageError("the server reported no `sampler_usage`: the frontier needs this project's server")
    reference_latency = column(reference, lambda r: r["latency_s"])
    summary = {}
    for label in by_label:
        logp, tokens = column(label, lambda r: r["logp"]), column(label, lambda r: len(r["token_ids"]))
        latency, correct = column(label, lambda r: r["latency_s"]), column(label, lambda r: r["correct"])
        engine = column(label, lambda r: sum(r["sampler_usage"][f"engine_tokens_{kind}"]
                                             for kind in ("generated", "prefilled", "scored")))
        hits = int(correct.sum())
        summary[label] = {
            "questions": len(questions),
            "self_reward_per_token": logp.sum() / tokens.sum(),
            "self_reward_per_token_ci": interval(logp[picks].sum(1) / tokens[picks].sum(1)),
            "self_reward_per_completion": logp.mean(),
            "latency_ratio": latency.sum() / reference_latency.sum(),
            "latency_ratio_ci": interval(latency[picks].sum(1) / reference_latency[picks].sum(1)),
            "median_latency_s": float(np.median(latency)),
            "engine_tokens_per_output_token": engine.sum() / tokens.sum(),
            "engine_tokens_per_output_token_ci": interval(engine[picks].sum(1) / tokens[picks].sum(1)),
            "mean_length": tokens.mean(),
            "accuracy": hits / len(questions),
            "accuracy_ci": list(wilson(hits, len(questions))),
        }
    for axis in ("latency_ratio", "engine_tokens_per_output_token"):
        front = pareto_front({label: (s[axis], s["self_reward_per_token"]) for label, s in summary.items()})
        for label, s in summary.items():
            s[f"on_front_{axis}"] = label in front
    return {label: {k: float(v) if isinstance(v, np.floating) else v for k, v in s.items()}
            for label, s in summary.items()}


def answer_rounds(client, model: str, problems: list[dict], settings: dict[str, dict], reference: str,
                  max_tokens: int, concurrency: int, budget_s: float | None, records_path: Path,
                  run_settings: dict) -> dict[str, dict[int, dict]]:
    """Every setting on every question, round by round (resuming from records_path); records by
    label and question. With a budget, no round starts that the mean round so far says would overrun it."""
    records = [r for r in read_records(records_path)
               if r["settings"] == run_settings | {"fields": settings.get(r["sampler"])}]
    by_label: dict[str, dict[int, dict]] = {label: {} for label in settings}
    for r in records:
        by_label[r["sampler"]][r["index"]] = r
    labels = list(settings)
    rounds = math.ceil(len(problems) / concurrency)
    started, timed_rounds, timed_s = time.monotonic(), 0, 0.0
    with ThreadPoolExecutor(concurrency) as pool, open(records_path, "a") as log:
        for number in range(rounds):
            indices = range(number * concurrency, min((number + 1) * concurrency, len(problems)))
            todo = {label: [i for i in indices if i not in by_label[label]] for label in labels}
            if not any(todo.values()):
                continue
            elapsed = time.monotonic() - started
            if budget_s is not None and timed_rounds and elapsed + timed_s / timed_rounds > budget_s:
                logger.info("Stopping before round %d of %d: the budget would not hold another", number + 1, rounds)
                break
            if not timed_rounds:
                list(pool.map(lambda i: quality.ask(client, model, problems[i], i, settings[reference], max_tokens),
                              indices))
            round_start = time.monotonic()
            for label in labels[number % len(labels):] + labels[:number % len(labels)]:
                answers = pool.map(lambda i: quality.ask(client, model, problems[i], i, settings[label], max_tokens),
                                   todo[label])
                for record in answers:
                    record |= {"sampler": label, "settings": run_settings | {"fields": settings[label]}}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    by_label[label][record["index"]] = record
            timed_rounds, timed_s = timed_rounds + 1, timed_s + time.monotonic() - round_start
            mean_round_s, elapsed = timed_s / timed_rounds, time.monotonic() - started
            left = rounds - number - 1
            if budget_s is not None:
                left = min(left, max(0, int((budget_s - elapsed) // mean_round_s)))
            logger.info("Round %d of %d done in %.0f s; %.1f min so far, about %d more rounds, %.1f min", number + 1,
                        rounds, time.monotonic() - round_start, elapsed / 60, left, left * mean_round_s / 60)
    return by_label


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    axis_names = {"latency_ratio": f"wall-clock / {report['reference']}'s (log scale)",
                  "engine_tokens_per_output_token": "engine tokens per output token, prefills included (log scale)"}
    for ax, (axis, name) in zip(axes, axis_names.items()):
        summary = report["summary"]
        for label, s in summary.items():
            x, y = s[axis], s["self_reward_per_token"]
            ax.errorbar(x, y, xerr=[[x - s[f"{axis}_ci"][0]], [s[f"{axis}_ci"][1] - x]],
                        yerr=[[y - s["self_reward_per_token_ci"][0]], [s["self_reward_per_token_ci"][1] - y]],
                        fmt="o", capsize=3, label=label, mfc="none" if not s[f"on_front_{axis}"] else None)
        front = sorted((s[axis], s["self_reward_per_token"]) for s in summary.values() if s[f"on_front_{axis}"])
        ax.step(*zip(*front), where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("base model log p per token (self-reward)")
    axes[1].legend(fontsize=7, loc="lower right")
    questions = next(iter(report["summary"].values()))["questions"]
    fig.suptitle(f"{report['dataset']}: {questions} questions, {report['max_tokens']} tokens at most, "
                 f"{report['concurrency']} requests at a time; 95% bootstrap intervals, filled: on the front")
    fig.text(0.01, 0.005, f"{report['command']}\n{report['date']}, {report['machine']['cpus']} CPUs, "
             f"{report['machine']['platform']}", fontsize=6, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(report: dict) -> str:
    """The table in docs/benchmarks.md: one row per setting, best self-reward first."""
    def ci(pair: list[float], digits: int) -> str:
        return f"{pair[0]:.{digits}f} to {pair[1]:.{digits}f}"

    lines = ["| setting | log p per token | wall-clock / direct | engine tokens / output token | accuracy | front |",
             "| --- | ---: | ---: | ---: | ---: | :---: |"]
    rows = sorted(report["summary"].items(), key=lambda item: -item[1]["self_reward_per_token"])
    for label, s in rows:
        lines.append(
            f"| {label} | {s['self_reward_per_token']:.3f} ({ci(s['self_reward_per_token_ci'], 3)}) "
            f"| {s['latency_ratio']:.1f}x ({ci(s['latency_ratio_ci'], 1)}) "
            f"| {s['engine_tokens_per_output_token']:.1f} | {s['accuracy']:.2f} ({ci(s['accuracy_ci'], 2)}) "
            f"| {'yes' if s['on_front_latency_ratio'] else ''} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, settings: dict[str, dict]) -> dict:
    from server import embedded_model

    # With a budget and no --questions, as many as the budget holds: all of GSM8K's 1319 test questions.
    problems = datasets.DATASETS[args.dataset](args.questions or (2000 if args.budget_minutes else DEFAULT_QUESTIONS))
    run_settings = {"dataset": args.dataset, "max_tokens": args.max_tokens, "model": args.model,
                    "concurrency": args.concurrency}
    with quality.asking(args.base_url, args.model, args.api_key, 8105) as (client, base_url):
        by_label = answer_rounds(client, args.model, problems, settings, args.reference, args.max_tokens,
                                 args.concurrency, args.budget_minutes and args.budget_minutes * 60,
                                 args.output.with_suffix(".jsonl"), run_settings)
    quality.score([r for rows in by_label.values() for r in rows.values()],
                  args.base_model or embedded_model.prepare())
    if not set.intersection(*(set(rows) for rows in by_label.values())):
        raise UsageError("no question was answered by every setting")
    return {
        "server": {"base_url": base_url, "model": args.model}, "dataset": args.dataset,
        "max_tokens": args.max_tokens, "concurrency": args.concurrency, "reference": args.reference,
        "answer_extraction": datasets.ANSWER_EXTRACTION, "bootstrap_resamples": args.bootstrap,
        "settings": settings, "summary": summarise(by_label, args.reference, args.bootstrap),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    quality.add_server_arguments(parser)
    parser.add_argument("--dataset", choices=sorted(datasets.DATASETS), default="gsm8k")
    parser.add_argument("--sampler", dest="samplers", type=parse_sampler, action="append",
                        help="NAME or NAME:{json request fields}, repeatable; a `model` field names a distilled "
                             "model (default: the settings in docs/benchmarks.md)")
    parser.add_argument("--reference", help="the setting whose wall-clock the others are divided by "
                                            f"(default: the first; `{REFERENCE}` with the default settings)")
    parser.add_argument("--questions", type=positive,
                        help=f"the first N questions (default: {DEFAULT_QUESTIONS}, or all with --budget-minutes)")
    parser.add_argument("--budget-minutes", type=float,
                        help="start no round of questions that would end after this many minutes of answering")
    parser.add_argument("--max-tokens", type=positive, default=128)
    parser.add_argument("--concurrency", type=positive, default=8, help="questions per round, sent at once")
    parser.add_argument("--bootstrap", type=positive, default=2000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=RESULTS / "frontier.json")
    args = parser.parse_args(argv)
    settings = dict(args.samplers) if args.samplers else SETTINGS
    args.reference = args.reference or next(iter(settings))
    try:
        if args.reference not in settings:
            raise UsageError(f"--reference {args.reference!r} is none of the settings: {', '.join(settings)}")
        if args.budget_minutes is not None and args.budget_minutes <= 0:
            raise UsageError("--budget-minutes must be positive")
        quality.check_base_model(args.base_model)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        report = header("benchmarks.frontier", argv) | run(args, settings)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(table(report))
    plot(report, args.output.with_suffix(".png"))
    logger.info("Wrote %s and its .md and .png", args.output)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
