"""The report stage: base model against power sampler against every distilled model, on held-out prompts.

Runs the quality harness (benchmarks/quality.py) on the first GSM8K test questions against our
server: the base model decoding directly and through the power sampler (--sampler); then every
trained run in WORKDIR (one per method, distill/train.py) decoding directly, as LoRA adapters served
beside the base model (`--distilled`, all on one server) and each merged into the weights (`--model
RUN/merged`). Each answer is kept in WORKDIR/eval.jsonl as it arrives, keyed to the adapter it came
from, so an interrupted report resumes. Writes the figures, with the teacher's statistics and each
run's training log, as JSON and as a Markdown table.
"""

import hashlib
import json
import logging
from pathlib import Path

from benchmarks import quality
from distill import teacher, train
from harness import datasets
from harness.cli import UsageError
from harness.results import read_records
from harness.servers import UNGATED, embedded_server, free_port
from server.adapters import check_fits

logger = logging.getLogger("distill.report")

SERVED = "base"


def trained_runs(workdir: Path) -> list[str]:
    """The runs in WORKDIR with a finished adapter, in the order of train.METHODS, then by name."""
    runs = [d.name for d in workdir.iterdir() if (d / train.SUMMARY).is_file() and (d / train.ADAPTER).is_dir()]
    order = {name: i for i, name in enumerate(train.METHODS)}
    return sorted(runs, key=lambda run: (order.get(run, len(order)), run))


def report(workdir: Path, base_model: Path, sampler: dict, max_tokens: int, prompts: int, concurrency: int) -> dict:
    """Evaluate at `max_tokens`; the figures for report.json."""
    from openai import OpenAI

    runs = trained_runs(workdir)
    if not runs:
        raise UsageError(f"{workdir} has no trained adapter: run the train stage first")
    weights = {}
    for run in runs:
        if not (workdir / run / train.MERGED / "config.json").is_file():
            raise UsageError(f"{workdir / run} has an adapter but no merged model: rerun its train stage")
        try:
            check_fits(base_model, workdir / run / train.ADAPTER)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        weights[run] = hashlib.sha256((workdir / run / train.ADAPTER / "adapter_model.safetensors").read_bytes()
                                      ).hexdigest()[:16]
    settings = {"dataset": "gsm8k", "max_tokens": max_tokens}
    # Servers one after the other. vLLM's CPU engine cannot score prompts (power_mcmc's proposals)
    # while it serves LoRA adapters, so the base model's rows run without them, as a base model
    # would be served; then all adapters on one server; then each merged model as a model of its own.
    # A row's answers are kept only for the adapter they came from.
    phases = [("base", base_model, (), {"base model, direct": ({}, settings),
                                        f"base model, {sampler['sampler']}": (sampler, settings)}),
              ("adapters", base_model,
               tuple(flag for run in runs for flag in ("--distilled", f"{run}={workdir / run / train.ADAPTER}")),
               {f"{run} (LoRA adapter), direct": ({"model": run}, settings | {"adapter_sha256": weights[run]})
                for run in runs})]
    phases += [(f"merged-{run}", workdir / run / train.MERGED, (),
                {f"{run} (merged), direct": ({}, settings | {"adapter_sha256": weights[run]})}) for run in runs]
    problems, samplers, summary = datasets.gsm8k(prompts), {}, {}
    for name, model, flags, rows in phases:
        with embedded_server(SERVED, free_port(), (*UNGATED, *flags), model,
                             workdir / f"server-{name}.log") as base_url:
            client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=7200)
            for row, (fields, row_settings) in rows.items():
                summary |= quality.evaluate(client, SERVED, base_model, problems, {row: fields}, max_tokens,
                                            concurrency, workdir / "eval.jsonl", row_settings)
                samplers[row] = fields
    direct = summary["base model, direct"]["median_latency_s"]
    for row in summary.values():
        row["latency_ratio_to_base_direct"] = row["median_latency_s"] / direct
    samples = read_records(workdir / teacher.FILE)
    return {"teacher": teacher.statistics(samples) if samples else None,
            "training": {run: json.loads((workdir / run / train.SUMMARY).read_text()) for run in runs},
            "evaluation": {"dataset": "GSM8K test, first questions", "prompts": prompts, "max_tokens": max_tokens,
                           "concurrency": concurrency, "answer_extraction": datasets.ANSWER_EXTRACTION,
                           "samplers": samplers, "summary": summary}}


def table(result: dict) -> str:
    """The evaluation as a Markdown table, with each distilled model's training time."""
    trained = {row: summary["train_runtime_s"] for run, summary in result["training"].items()
               for row in (f"{run} (LoRA adapter), direct", f"{run} (merged), direct")}
    lines = ["| model, sampler | training (s) | log p per token | log p per completion | accuracy | mean length | "
             "median latency (s) | latency / base direct |", "|---|---|---|---|---|---|---|---|"]
    for name, row in result["evaluation"]["summary"].items():
        training = f"{trained[name]:.0f}" if name in trained else "-"
        lines.append(f"| {name} | {training} | {row['mean_logp_per_token']:.3f} | "
                     f"{row['mean_logp_per_completion']:.1f} | {row['accuracy']:.3f} | {row['mean_length']:.1f} | "
                     f"{row['median_latency_s']:.2f} | {row['latency_ratio_to_base_direct']:.1f} |")
    if result["teacher"]:
        t = result["teacher"]
        lines.append(f"\nsft also needed the teacher's {t['samples']} power samples "
                     f"({t['mean_latency_s']:.1f} s each, several at a time).")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Self-reward per token against decode latency, a point per row: what each road buys for its cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in result["evaluation"]["summary"].items():
        ax.plot(row["latency_ratio_to_base_direct"], row["mean_logp_per_token"], "o",
                color="tab:red" if name.startswith("base") else "tab:blue")
        ax.annotate(name, (row["latency_ratio_to_base_direct"], row["mean_logp_per_token"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("median decode latency / the base model's (direct)")
    ax.set_ylabel("self-reward: base-model log p per token")
    ax.set_title(f"GSM8K test, first {result['evaluation']['prompts']} questions: "
                 "distilled models (blue) against the base model (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
