"""`python -m benchmarks.quality`: answer accuracy, self-reward, length and latency per sampler.

For a prompt set (GSM8K test questions from ../shared/data/gsm8k/test.jsonl, or generated
arithmetic questions that the embedded 135M model can partly solve), each sampler answers every
question as a chat message, one sampler after another (so each one's latency is measured under its
own load only), `--concurrency` requests at a time, seed = question index.

- Answer: the completion's last number (commas dropped, a trailing period too), compared as a
  number with the reference (GSM8K's `#### N`).
- Self-reward: the base model's log p of the completion given the prompt, temperature 1, from a
  float32 Hugging Face forward pass over the token ids the server returns (`return_token_ids`),
  run after all answers are in; reported per token and per completion.
- Spend: engine tokens per output token, where the server reports `sampler_usage`.

Each answer is appended to a JSONL file beside the output as it arrives, with the settings it was
made under; a rerun with the same settings skips what is there, so an interrupted run resumes.
Writes JSON (schema: benchmarks/schemas/quality.schema.json).
"""

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.cli import UsageError, parse_sampler, positive
from harness.datasets import ANSWER_EXTRACTION, DATASETS, is_correct
from harness.results import RESULTS, header, read_records
from harness.scoring import completion_logp

logger = logging.getLogger("benchmarks.quality")



def ask(client, model: str, problem: dict, index: int, fields: dict, max_tokens: int) -> dict:
    """One chat answer to `problem` with the request fields `fields` (seed = index), timed, with the
    served model's own log p of each token; its `model` field, if any, names another served model
    (a distilled one) than `model`."""
    fields = dict(fields)
    start = time.perf_counter()
    r = client.chat.completions.create(
        model=fields.pop("model", model), max_tokens=max_tokens, seed=index,
        messages=[{"role": "user", "content": problem["question"]}],
        logprobs=True, extra_body={**fields, "return_token_ids": True})
    choice = r.choices[0]
    if choice.token_ids is None or choice.logprobs is None:
        raise UsageError("the server returned no token ids or no logprobs: it must support `return_token_ids`")
    text = choice.message.content
    return {"index": index, "latency_s": time.perf_counter() - start, "prompt_token_ids": r.prompt_token_ids,
            "token_ids": choice.token_ids, "served_logprobs": [t.logprob for t in choice.logprobs.content or ()],
            "text": text, "correct": is_correct(text or "", problem["answer"]),
            "sampler_usage": getattr(r, "sampler_usage", None)}


def score(records: list[dict], base_model: Path) -> None:
    """Give every record without one its self-reward `logp`. Run once the server is idle: a forward
    pass beside a busy engine on a small CPU machine contends for its cores, slows both, and would
    skew the latencies measured meanwhile."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    todo = [r for r in records if "logp" not in r]
    if not todo:
        return
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    for record in tqdm(todo, desc="self-reward"):
        record["logp"] = completion_logp(base, record["prompt_token_ids"], record["token_ids"])


def evaluate(client, model: str, base_model: Path, problems: list[dict], samplers: dict[str, dict],
             max_tokens: int, concurrency: int, records_path: Path, settings: dict) -> dict[str, dict]:
    """Run every sampler on every problem (resuming from records_path); a summary per sampler."""
    from tqdm import tqdm

    records = [r for r in read_records(records_path) if r["settings"] == settings]
    done = {(r["sampler"], r["index"]) for r in records}
    with ThreadPoolExecutor(concurrency) as pool, open(records_path, "a") as log:
        for name in samplers:
            todo = [i for i in range(len(problems)) if (name, i) not in done]
            answers = pool.map(lambda i: ask(client, model, problems[i], i, samplers[name], max_tokens), todo)
            for record in tqdm(answers, total=len(todo), desc=name):
                record |= {"sampler": name, "settings": settings}
                log.write(json.dumps(record) + "\n")
                log.flush()
                records.append(record)
    score([r for r in records if r["sampler"] in samplers], base_model)
    return {name: summarise([r for r in records if r["sampler"] == name and r["index"] < len(problems)])
            for name in samplers}


def summarise(rows: list[dict]) -> dict:
    tokens = sum(len(r["token_ids"]) for r in rows)
    spend = [r["sampler_usage"] for r in rows if r["sampler_usage"]]
    latencies = sorted(r["latency_s"] for r in rows)
    return {
        "completions": len(rows),
        "accuracy": statistics.mean(r["correct"] for r in rows),
        "mean_logp_per_token": sum(r["logp"] for r in rows) / max(tokens, 1),
        "mean_logp_per_completion": statistics.mean(r["logp"] for r in rows),
        "mean_length": tokens / len(rows),
        "mean_latency_s": statistics.mean(latencies),
        "median_latency_s": statistics.median(latencies),
        "p90_latency_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
        "engine_tokens_per_output_token": sum(
            s["engine_tokens_generated"] + s["engine_tokens_scored"] for s in spend) / max(tokens, 1)
        if len(spend) == len(rows) else None,
    }


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the harnesses that ask a server questions: which server and model, and whose
    log p is the self-reward."""
    parser.add_argument("--base-url", help="an OpenAI-compatible server (default: start ours on the embedded model)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="served model name (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    parser.add_argument("--base-model", type=Path,
                        help="Hugging Face directory of the model whose log p is the self-reward (default: the embedded model)")


def check_base_model(base_model: Path | None) -> None:
    if base_model and not (base_model / "config.json").exists():
        raise UsageError(f"--base-model {base_model} is not a Hugging Face model directory")


@contextlib.contextmanager
def asking(base_url: str | None, model: str, api_key: str | None, port: int) -> Iterator[tuple]:
    """An OpenAI client of base_url, or of our own server on the embedded model started on `port`
    for the run, with its base URL; a request the server refuses or cannot take is a UsageError."""
    from openai import APIConnectionError, APIStatusError, OpenAI

    from harness.servers import embedded_server

    with contextlib.ExitStack() as stack:
        if base_url is None:
            base_url = stack.enter_context(embedded_server(model, port))
        try:
            yield OpenAI(base_url=base_url + "/v1", api_key=api_key or "none", max_retries=0, timeout=7200), base_url
        except APIStatusError as exc:
            raise UsageError(f"the server refused a request (HTTP {exc.status_code}): {exc.message}") from None
        except APIConnectionError as exc:
            raise UsageError(f"cannot reach {base_url}: {exc}") from None


def run(base_url: str | None, model: str, api_key: str | None, base_model: Path | None,
        dataset: str, prompts: int, samplers: dict[str, dict], max_tokens: int, concurrency: int,
        output: Path) -> dict:
    """Evaluate against base_url, or against our own server on the embedded model started for the run;
    self-reward by base_model (default: the embedded model)."""
    from server import embedded_model

    problems = DATASETS[dataset](prompts)
    settings = {"dataset": dataset, "max_tokens": max_tokens, "model": model}
    with asking(base_url, model, api_key, 8104) as (client, base_url):
        summary = evaluate(client, model, base_model or embedded_model.prepare(), problems, samplers,
                           max_tokens, concurrency, output.with_suffix(".jsonl"), settings)
    return {
        "server": {"base_url": base_url, "model": model}, "dataset": dataset, "prompts": len(problems),
        "max_tokens": max_tokens, "concurrency": concurrency, "answer_extraction": ANSWER_EXTRACTION,
        "samplers": samplers, "summary": summary,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="arithmetic")
    parser.add_argument("--prompts", type=positive, default=16, help="the first N questions (default: %(default)s)")
    parser.add_argument("--sampler", dest="samplers", type=parse_sampler, action="append",
                        help="NAME or NAME:{json request fields}, repeatable (default: direct)")
    parser.add_argument("--max-tokens", type=positive, default=128)
    parser.add_argument("--concurrency", type=positive, default=8)
    parser.add_argument("--output", type=Path, help="result JSON (default: results/quality_DATASET.json)")
    args = parser.parse_args(argv)
    output = args.output or RESULTS / f"quality_{args.dataset}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        check_base_model(args.base_model)
        report = header("benchmarks.quality", argv) | run(args.base_url, args.model, args.api_key, args.base_model, args.dataset, args.prompts,
                     dict(args.samplers or [parse_sampler("direct")]), args.max_tokens, args.concurrency, output)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("Wrote %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
