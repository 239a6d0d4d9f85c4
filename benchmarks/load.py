"""`python -m benchmarks.load {run,compare}`: load-test samplers on any OpenAI-compatible server.

run: for each sampler (a name and its request fields) and each concurrency (or request rate), one
  run of vLLM's own load generator (`vllm.benchmarks.serve`: seeded random prompts, streaming,
  TTFT, time per output token, inter-token and end-to-end latency percentiles) with the sampler's
  fields in `--extra-body`. Where the server exports our `powerserve_*` metrics, each run's spend
  (engine tokens per output token, sampler events) is the difference of its counters before and
  after the run. Writes JSON (schema: benchmarks/schemas/load.schema.json) and a PNG of latency
  against concurrency (or rate) per sampler.
compare: two result files side by side, per sampler and load point, as ratios second / first.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from harness.cli import UsageError, parse_sampler, positive
from harness.results import RESULTS, header

logger = logging.getLogger("benchmarks.load")

PERCENTILES = "50,90,99"
LATENCIES = ["ttft", "tpot", "itl", "e2el"]  # vLLM's names: first token, per output token, inter-token, end to end
SUMMARY = ["completed", "failed", "duration", "request_throughput", "output_throughput", "total_output_tokens"] + [
    f"{stat}_{metric}_ms" for metric in LATENCIES for stat in ("mean", "median", "p90", "p99")]
COMPARED = ["request_throughput", "output_throughput", "median_ttft_ms", "median_tpot_ms", "median_e2el_ms",
            "p99_e2el_ms"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="drive a server and write a result file")
    run.add_argument("--base-url", help="the server (default: start ours on the embedded model for the run)")
    run.add_argument("--model", default="SmolLM2-135M-Instruct", help="served model name (default: %(default)s)")
    run.add_argument("--tokenizer", help="tokenizer directory for the random prompts (default: the embedded model's)")
    run.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default: $OPENAI_API_KEY)")
    run.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    run.add_argument("--sampler", dest="samplers", type=parse_sampler, action="append",
                     help="NAME or NAME:{json request fields}, repeatable (default: direct)")
    load = run.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=positive, nargs="+", help="concurrency sweep (default: 1 4 8)")
    load.add_argument("--request-rate", type=float, nargs="+", help="request-rate sweep, requests/s (Poisson arrivals)")
    size = run.add_mutually_exclusive_group()
    size.add_argument("--num-prompts", type=positive, help="requests per load point (default: 16)")
    size.add_argument("--duration", type=float,
                      help="seconds per load point, with --request-rate: rate x duration requests")
    run.add_argument("--input-len", type=positive, default=64, help="random prompt tokens (default: %(default)s)")
    run.add_argument("--output-len", type=positive, default=64, help="max_tokens, EOS ignored (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output", type=Path, default=RESULTS / "load.json")
    compare = commands.add_parser("compare", help="ratios between two result files")
    compare.add_argument("first", type=Path)
    compare.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.duration is not None and not args.request_rate:
            parser.error("--duration needs --request-rate (a closed loop at fixed concurrency has no fixed count)")
        if args.request_rate and any(r <= 0 for r in args.request_rate):
            parser.error("--request-rate values must be positive")
        args.samplers = args.samplers or [parse_sampler("direct")]
        args.concurrency = args.concurrency or (None if args.request_rate else [1, 4, 8])
        args.num_prompts = args.num_prompts or 16
    return args


def auth(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def http_get(url: str, api_key: str | None) -> str:
    request = urllib.request.Request(url, headers=auth(api_key))
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def probe(args: argparse.Namespace, label: str, extra: dict) -> None:
    """One small request with the sampler's fields, so that a refusal stops the run with the server's reason."""
    path = "/v1/completions" if args.endpoint == "completions" else "/v1/chat/completions"
    body = {"model": args.model, "max_tokens": 2, **extra}
    body |= {"prompt": "Hello"} if args.endpoint == "completions" else {"messages": [{"role": "user", "content": "Hello"}]}
    headers = {"Content-Type": "application/json"} | auth(args.api_key)
    request = urllib.request.Request(args.base_url + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=600):
            return
    except urllib.error.HTTPError as exc:
        detail = exc.read(2000).decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]["message"]
        raise UsageError(f"the server refuses sampler {label!r} (HTTP {exc.code}): {detail}") from None
    except OSError as exc:
        raise UsageError(f"cannot reach {args.base_url}: {exc}") from None


def spend_counters(args: argparse.Namespace) -> dict[tuple, float]:
    """Our server's powerserve_* counters for the model, keyed by (metric, sampler, kind/event); {} elsewhere."""
    try:
        text = http_get(args.base_url + "/metrics", args.api_key)
    except OSError:
        return {}
    counters = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("powerserve_engine_tokens_total", "powerserve_output_tokens_total",
                               "powerserve_sampler_events_total") and sample.labels.get("model") == args.model:
                key = (sample.name, sample.labels["sampler"], sample.labels.get("kind") or sample.labels.get("event"))
                counters[key] = sample.value
    return counters


def spend(before: dict, after: dict, sampler: str) -> dict | None:
    """Engine tokens per output token and sampler events during one run, from the counters' growth."""
    if not after:
        return None
    grown = {key: after[key] - before.get(key, 0.0) for key in after if key[1] == sampler}
    output = sum(v for (name, _, _), v in grown.items() if name == "powerserve_output_tokens_total")
    engine = {kind: v for (name, _, kind), v in grown.items() if name == "powerserve_engine_tokens_total"}
    return {"engine_tokens_per_output_token": sum(engine.values()) / output if output else None,
            "engine_tokens": engine,
            "events": {event: v for (name, _, event), v in grown.items() if name == "powerserve_sampler_events_total"}}


def load_point(args: argparse.Namespace, extra: dict, concurrency: int | None, rate: float | None) -> dict:
    """One run of vLLM's load generator; its printed report goes to load.log beside the output."""
    from vllm.benchmarks import serve

    prompts = math.ceil(rate * args.duration) if args.duration else args.num_prompts
    argv = ["--backend", "openai" if args.endpoint == "completions" else "openai-chat",
            "--endpoint", "/v1/completions" if args.endpoint == "completions" else "/v1/chat/completions",
            "--base-url", args.base_url, "--model", args.model, "--tokenizer", args.tokenizer,
            "--dataset-name", "random", "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--ignore-eos", "--num-prompts", str(prompts), "--seed", str(args.seed), "--disable-tqdm",
            "--percentile-metrics", ",".join(LATENCIES), "--metric-percentiles", PERCENTILES,
            "--save-detailed", "--extra-body", json.dumps(extra),
            "--request-rate", str(rate if rate else "inf")]
    if concurrency:
        argv += ["--max-concurrency", str(concurrency)]
    parser = argparse.ArgumentParser()
    serve.add_cli_args(parser)
    with open(args.output.parent / "load.log", "a") as log, contextlib.redirect_stdout(log):
        result = serve.main(parser.parse_args(argv))
    point = {key: result.get(key) for key in SUMMARY} | {"concurrency": concurrency, "request_rate": rate,
                                                          "num_prompts": prompts}
    point["errors"] = sorted({e.strip().splitlines()[-1] for e in result.get("errors", []) if e})[:5]
    return point


def run(args: argparse.Namespace) -> dict:
    from harness.servers import embedded_server
    from server import embedded_model

    if args.tokenizer is None:
        args.tokenizer = str(embedded_model.prepare())
    if args.api_key:
        os.environ["OPENAI_API_KEY"] = args.api_key  # where vLLM's load generator reads it
    with contextlib.ExitStack() as stack:
        if args.base_url is None:
            args.base_url = stack.enter_context(embedded_server(args.model, 8105))
        samplers = sweep(args)
    return {
        "server": {"base_url": args.base_url, "model": args.model, "endpoint": args.endpoint},
        "workload": {"dataset": "random", "input_len": args.input_len, "output_len": args.output_len,
                     "ignore_eos": True, "seed": args.seed, "sweep": "concurrency" if args.concurrency else "request_rate"},
        "samplers": samplers,
    }


def sweep(args: argparse.Namespace) -> dict:
    """Every sampler at every load point, after checking that the server accepts each sampler."""
    for label, extra in args.samplers:
        probe(args, label, extra)
    points = [(c, None) for c in args.concurrency] if args.concurrency else [(None, r) for r in args.request_rate]
    samplers = {}
    for label, extra in args.samplers:
        rows = []
        for concurrency, rate in points:
            before = spend_counters(args)
            row = load_point(args, extra, concurrency, rate)
            row["spend"] = spend(before, spend_counters(args), extra.get("sampler", "direct"))
            rows.append(row)
            logger.info("%s at %s: %d ok, %d failed, %.1f output tok/s, median e2e %.0f ms, p99 %.0f ms",
                        label, f"concurrency {concurrency}" if concurrency else f"{rate} req/s", row["completed"],
                        row["failed"], row["output_throughput"], row["median_e2el_ms"] or 0, row["p99_e2el_ms"] or 0)
        samplers[label] = {"request_fields": extra, "points": rows}
    return samplers


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = report["workload"]["sweep"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, result in report["samplers"].items():
        x = [p[sweep] for p in result["points"]]
        for ax, metric in zip(axes, ("e2el", "ttft")):
            line, = ax.plot(x, [p[f"median_{metric}_ms"] / 1000 for p in result["points"]], "o-", label=f"{label} median")
            ax.plot(x, [p[f"p99_{metric}_ms"] / 1000 for p in result["points"]], "--", color=line.get_color(),
                    label=f"{label} p99")
    for ax, title in zip(axes, ("end-to-end latency", "time to first token")):
        ax.set_xlabel(sweep.replace("_", " "))
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['server']['model']}: {report['workload']['input_len']} in, "
                 f"{report['workload']['output_len']} out")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def compare(first: dict, second: dict) -> str:
    """A Markdown table of second / first for each sampler and load point present in both."""
    sweep = first["workload"]["sweep"]
    rows = [f"| sampler | {sweep.replace('_', ' ')} | " + " | ".join(COMPARED) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in COMPARED) + " |"]
    for label, result in first["samplers"].items():
        others = {p[sweep]: p for p in second["samplers"].get(label, {}).get("points", [])}
        for point in result["points"]:
            other = others.get(point[sweep])
            if other is None:
                continue
            ratios = [other[k] / point[k] if point.get(k) and other.get(k) is not None else None for k in COMPARED]
            rows.append(f"| {label} | {point[sweep]} | "
                        + " | ".join("n/a" if r is None else f"{r:.2f}" for r in ratios) + " |")
    return "\n".join(rows)


def read_result(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
        report["samplers"], report["workload"]["sweep"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a result file of benchmarks.load run: {exc}") from None
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        if args.command == "compare":
            first, second = read_result(args.first), read_result(args.second)
            if first["workload"]["sweep"] != second["workload"]["sweep"]:
                raise UsageError("the two files sweep different things (concurrency against request rate)")
            print(f"Ratios {args.second} / {args.first}:\n\n{compare(first, second)}")
            return 0
        args.output.parent.mkdir(parents=True, exist_ok=True)
        (args.output.parent / "load.log").write_text("")
        report = header("benchmarks.load", argv) | run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.output.with_suffix(".png"))
    logger.info("Wrote %s and %s", args.output, args.output.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
