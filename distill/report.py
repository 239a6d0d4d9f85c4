"""The report stage: base model against power sampler against distilled model, on held-out prompts.

Runs the quality harness (benchmarks/quality.py) on the first GSM8K test questions against our
server: the base model decoding directly and through the teacher's power sampler; then the
distilled model decoding directly, once as a LoRA adapter served beside the base model
(`--distilled`) and once merged into the weights (`--model WORKDIR/merged`). Each
answer is kept in WORKDIR/eval.jsonl as it arrives, so an interrupted report resumes. Writes the
figures, with the teacher's statistics and the training losses, as JSON and as a Markdown table.
"""

import hashlib
import json
import logging
from pathlib import Path

from benchmarks import quality
from benchmarks.load import UsageError
from benchmarks.vs_vllm import UNGATED, embedded_server, free_port
from distill import teacher, train
from server.adapters import check_fits

logger = logging.getLogger("distill.report")

SERVED, DISTILLED = "base", "distilled"


def report(workdir: Path, base_model: Path, prompts: int, concurrency: int) -> dict:
    """Evaluate at the teacher's max_tokens; the figures for report.json."""
    from openai import OpenAI

    samples = quality.read_records(workdir / teacher.FILE)
    adapter = workdir / train.ADAPTER
    if not samples or not (workdir / train.SUMMARY).is_file():
        raise UsageError(f"{workdir} has no trained adapter: run the teacher and train stages first")
    try:
        check_fits(base_model, adapter)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    sampler = samples[0]["settings"]["sampler"]
    max_tokens = samples[0]["settings"]["max_tokens"]
    weights = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
    # Records of an earlier adapter or other settings are not reused.
    settings = {"dataset": "gsm8k", "max_tokens": max_tokens, "adapter_sha256": weights}
    # Three servers, one after the other. vLLM's CPU engine cannot score prompts (power_mcmc's
    # proposals) while it serves LoRA adapters, so the base model's rows run without the adapter,
    # as a base model would be served; the merged model is base plus adapter as a model of its own.
    phases = [("base", base_model, (), {"base model, direct": {}, f"base model, {sampler['sampler']}": sampler}),
              ("distilled", base_model, ("--distilled", f"{DISTILLED}={adapter}"),
               {"distilled model (LoRA adapter), direct": {"model": DISTILLED}}),
              ("merged", workdir / train.MERGED, (), {"distilled model (merged), direct": {}})]
    problems, samplers, summary = quality.gsm8k(prompts), {}, {}
    for name, model, flags, rows in phases:
        with embedded_server(SERVED, free_port(), (*UNGATED, *flags), model,
                             workdir / f"server-{name}.log") as base_url:
            client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=7200)
            summary |= quality.evaluate(client, SERVED, base_model, problems, rows, max_tokens,
                                        concurrency, workdir / "eval.jsonl", settings)
        samplers |= rows
    direct = summary["base model, direct"]["median_latency_s"]
    for row in summary.values():
        row["latency_ratio_to_base_direct"] = row["median_latency_s"] / direct
    return {"teacher": teacher.statistics(samples), "training": json.loads((workdir / train.SUMMARY).read_text()),
            "evaluation": {"dataset": "GSM8K test, first questions", "prompts": prompts, "max_tokens": max_tokens,
                           "concurrency": concurrency, "answer_extraction": quality.ANSWER_EXTRACTION,
                           "samplers": samplers, "summary": summary}}


def table(result: dict) -> str:
    """The evaluation as a Markdown table."""
    lines = ["| model, sampler | log p per token | log p per completion | accuracy | mean length | "
             "median latency (s) | latency / base direct |", "|---|---|---|---|---|---|---|"]
    for name, row in result["evaluation"]["summary"].items():
        lines.append(f"| {name} | {row['mean_logp_per_token']:.3f} | {row['mean_logp_per_completion']:.1f} | "
                     f"{row['accuracy']:.3f} | {row['mean_length']:.1f} | {row['median_latency_s']:.2f} | "
                     f"{row['latency_ratio_to_base_direct']:.1f} |")
    return "\n".join(lines) + "\n"
