"""`python -m benchmarks.vs_vllm`: our server against vLLM's own OpenAI server, side by side.

Both servers load the same model directory with the same engine flags; vLLM's load generator
(`vllm.benchmarks.serve`) drives them in turn (vllm, ours, vllm, ours, ...) with the same seeded
random workload on /v1/completions. The medians over rounds of output-token throughput and TTFT,
and the ratios ours/vllm, go to a JSON file and to a Markdown table on stdout.
"""

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from harness.results import RESULTS
from harness.servers import ENGINE_FLAGS, SERVERS, start_server, stop_server, wait_healthy

logger = logging.getLogger("benchmarks.vs_vllm")

METRICS = ["output_throughput", "median_ttft_ms", "mean_ttft_ms", "p99_ttft_ms"]
TARGETS = {"throughput_ratio": ">= 0.90", "median_ttft_ratio": "<= 1.2"}


def parse_args() -> argparse.Namespace:
    """The command line: model, workload, rounds, ports and where the results go."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vs_vllm", description=__doc__)
    parser.add_argument("--model", help="Hugging Face model directory (default: the embedded model).")
    parser.add_argument("--served-model-name", default="SmolLM2-135M-Instruct")
    for flag, default in [("--num-prompts", 48), ("--input-len", 64), ("--output-len", 64),
                          ("--concurrency", 8), ("--rounds", 3), ("--warmup-prompts", 4), ("--seed", 0),
                          ("--vllm-port", 8101), ("--ours-port", 8102), ("--startup-timeout", 300)]:
        parser.add_argument(flag, type=int, default=default, help=f"(default: {default})")
    parser.add_argument("--output", type=Path, default=RESULTS / "vs_vllm.json")
    return parser.parse_args()


def run_load(args: argparse.Namespace, port: int, num_prompts: int, seed: int) -> dict[str, Any]:
    """One run of vLLM's load generator against a server; its own report goes to results/loadgen.log."""
    from vllm.benchmarks import serve

    parser = argparse.ArgumentParser()
    serve.add_cli_args(parser)
    bench_args = parser.parse_args([
        "--backend", "openai", "--endpoint", "/v1/completions", "--base-url", f"http://127.0.0.1:{port}",
        "--model", args.served_model_name, "--tokenizer", args.model, "--dataset-name", "random",
        "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--ignore-eos",
        "--num-prompts", str(num_prompts), "--max-concurrency", str(args.concurrency), "--seed", str(seed),
        "--disable-tqdm", "--save-detailed",  # detailed: keeps the per-request errors in the result
    ])
    with open(RESULTS / "loadgen.log", "a") as log, contextlib.redirect_stdout(log):
        result = serve.main(bench_args)
    figures = {key: result[key] for key in ["completed", "failed", "duration", *METRICS]} | {"seed": seed}
    if result["failed"]:
        errors = sorted({e for e in result["errors"] if e})[:10]
        figures |= {"errors": errors, "error_body": probe_error(port, args.served_model_name)}
        logger.warning("%d of %d requests failed on port %d: %s; the server says: %s",
                       result["failed"], num_prompts, port, errors, figures["error_body"])
    return figures


def probe_error(port: int, served: str) -> str:
    """The server's answer to a request like the load generator's, whose errors keep only the HTTP reason."""
    payload = {"model": served, "prompt": "Hello", "max_tokens": 1, "logprobs": None, "stream": True,
               "stream_options": {"include_usage": True}, "ignore_eos": True, "repetition_penalty": 1.0}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return f"{response.status}: {response.read(500).decode(errors='replace')}"
    except urllib.error.HTTPError as exc:
        return f"{exc.code}: {exc.read(2000).decode(errors='replace')}"


def verdict(value: float | None, target: str, failed: int) -> str:
    """'pass' or 'fail' against a target such as '>= 0.9'; 'invalid' when requests failed."""
    if failed or value is None:
        return f"invalid ({failed} failed requests)"
    op, bound = target.split()
    return "pass" if (value >= float(bound) if op == ">=" else value <= float(bound)) else "fail"


def markdown(report: dict[str, Any]) -> str:
    """The medians and the ratios as Markdown tables, ready for a README."""
    rows = ["| Server | Output tok/s | Median TTFT (ms) | Mean TTFT (ms) | P99 TTFT (ms) |",
            "|---|---:|---:|---:|---:|"]
    rows += [f"| {n} | " + " | ".join(f"{m[k]:.1f}" for k in METRICS) + " |"
             for n, m in report["medians"].items()]
    rows += ["", "| Ratio ours/vllm | Value | Target | Verdict |", "|---|---:|---|---|"]
    rows += [f"| {k} | {'n/a' if v is None else f'{v:.3f}'} | {TARGETS[k]} | {report['verdicts'][k]} |"
             for k, v in report["ratios"].items()]
    return "\n".join(rows)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    if args.model is None:
        from server import embedded_model

        args.model = str(embedded_model.prepare())
    from vllm import __version__ as vllm_version

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loadgen.log").write_text("")
    ports = {"vllm": args.vllm_port, "ours": args.ours_port}
    procs: dict[str, subprocess.Popen] = {}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in SERVERS}
    try:
        for name in SERVERS:
            procs[name] = start_server(name, args.model, args.served_model_name, ports[name])
        for name in SERVERS:
            wait_healthy(name, procs[name], ports[name], args.startup_timeout)
            logger.info("Warm-up: %d prompts against %s", args.warmup_prompts, name)
            run_load(args, ports[name], args.warmup_prompts, args.seed)
        for i in range(1, args.rounds + 1):
            for name in SERVERS:
                # A new seed each round: the same prompts for both servers, none in a prefix cache yet.
                figures = run_load(args, ports[name], args.num_prompts, args.seed + i)
                rounds[name].append(figures)
                logger.info("Round %d/%d, %s: %.1f tok/s, median TTFT %.1f ms, %d failed", i, args.rounds,
                            name, figures["output_throughput"], figures["median_ttft_ms"], figures["failed"])
    finally:
        for name, proc in procs.items():
            stop_server(name, proc)

    medians = {name: {k: statistics.median(r[k] for r in rs) for k in METRICS} for name, rs in rounds.items()}
    ratios = {f"{label}_ratio": medians["ours"][key] / medians["vllm"][key] if medians["vllm"][key] else None
              for label, key in [("throughput", "output_throughput"), ("median_ttft", "median_ttft_ms")]}
    failed = sum(r["failed"] for rs in rounds.values() for r in rs)
    report = {
        "command": " ".join(["python", "-m", "benchmarks.vs_vllm", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "vllm": vllm_version},
        "model": args.model,
        "workload": {"dataset": "random", "endpoint": "/v1/completions", "ignore_eos": True,
                     "seeds": "warm-up: seed, round i: seed + i", "engine_flags": ENGINE_FLAGS}
        | {k: vars(args)[k] for k in ["input_len", "output_len", "num_prompts", "concurrency",
                                      "rounds", "warmup_prompts", "seed"]},
        "rounds": rounds, "medians": medians, "ratios": ratios, "targets": TARGETS,
        "verdicts": {k: verdict(v, TARGETS[k], failed) for k, v in ratios.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("Wrote %s", args.output)
    print(markdown(report))


if __name__ == "__main__":
    main()
