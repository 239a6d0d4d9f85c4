"""`python -m benchmarks.vs_vllm`: our server against vLLM's own OpenAI server, side by side.

Both servers load the same model directory with the same engine flags; vLLM's load generator
(`vllm.benchmarks.serve`) drives each in turn (vllm, ours, vllm, ours, ...) with the same seeded
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
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.vs_vllm")

RESULTS = Path(__file__).parent / "results"
ENGINE_FLAGS = ["--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(2 << 30)]
METRICS = ["output_throughput", "median_ttft_ms", "mean_ttft_ms", "p99_ttft_ms"]
TARGETS = {"throughput_ratio": (">=", 0.90), "median_ttft_ratio": ("<=", 1.2)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vs_vllm", description=__doc__)
    parser.add_argument("--model", help="Hugging Face model directory (default: the embedded model).")
    parser.add_argument("--served-model-name", default="SmolLM2-135M-Instruct")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-prompts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-port", type=int, default=8101)
    parser.add_argument("--ours-port", type=int, default=8102)
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="Seconds to wait for /health.")
    parser.add_argument("--output", type=Path, default=RESULTS / "vs_vllm.json")
    return parser.parse_args()


def start_server(name: str, module: str, model: str, served: str, port: int) -> subprocess.Popen:
    """Start a server in its own process group (so its engine processes can be killed with it)."""
    cmd = [sys.executable, "-m", module, "--model", model, "--served-model-name", served,
           "--port", str(port), *ENGINE_FLAGS]
    logger.info("Starting %s: %s (log: %s)", name, " ".join(cmd), RESULTS / f"{name}.log")
    with open(RESULTS / f"{name}.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(name: str, proc: subprocess.Popen, port: int, timeout: float) -> None:
    """Poll GET /health until it answers 200; fail with the log's tail if the server dies or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} server exited with {proc.returncode}:\n{log_tail(name)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    logger.info("%s server is ready on port %d", name, port)
                    return
        time.sleep(2)
    raise RuntimeError(f"{name} server not healthy after {timeout:.0f}s:\n{log_tail(name)}")


def log_tail(name: str, lines: int = 40) -> str:
    return "\n".join((RESULTS / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])


def stop_server(name: str, proc: subprocess.Popen) -> None:
    """Terminate the server's whole process group, killing it if it does not exit in time."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            logger.warning("%s server ignored %s", name, sig.name)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # engine-core children left behind by the parent
    logger.info("Stopped %s server", name)


def run_load(args: argparse.Namespace, model: str, port: int, num_prompts: int) -> dict[str, Any]:
    """One run of vLLM's load generator; its own report goes to results/loadgen.log."""
    from vllm.benchmarks import serve

    parser = argparse.ArgumentParser()
    serve.add_cli_args(parser)
    bench_args = parser.parse_args([
        "--backend", "openai", "--endpoint", "/v1/completions",
        "--base-url", f"http://127.0.0.1:{port}", "--model", args.served_model_name, "--tokenizer", model,
        "--dataset-name", "random", "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--num-prompts", str(num_prompts), "--max-concurrency", str(args.concurrency),
        "--ignore-eos", "--seed", str(args.seed), "--disable-tqdm", "--save-detailed",
    ])
    with open(RESULTS / "loadgen.log", "a") as log, contextlib.redirect_stdout(log):
        result = serve.main(bench_args)
    errors = sorted({e for e in result.get("errors", []) if e})
    if result["failed"]:
        logger.warning("%d of %d requests failed on port %d: %s", result["failed"], num_prompts, port, errors[:3])
    figures = {key: result[key] for key in ["completed", "failed", "duration", *METRICS]}
    return figures | {"errors": errors[:10]}


def verdict(value: float, target: tuple[str, float]) -> str:
    op, bound = target
    return "pass" if (value >= bound if op == ">=" else value <= bound) else "fail"


def markdown(medians: dict[str, dict[str, float]], ratios: dict[str, float], verdicts: dict[str, str]) -> str:
    rows = ["| Server | Output tok/s | Median TTFT (ms) | Mean TTFT (ms) | P99 TTFT (ms) |",
            "|---|---:|---:|---:|---:|"]
    rows += [f"| {name} | " + " | ".join(f"{m[k]:.1f}" for k in METRICS) + " |" for name, m in medians.items()]
    rows += ["", "| Ratio ours/vllm | Value | Target | Verdict |", "|---|---:|---|---|"]
    rows += [f"| {k} | {v:.3f} | {' '.join(map(str, TARGETS[k]))} | {verdicts[k]} |" for k, v in ratios.items()]
    return "\n".join(rows)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    if args.model is None:
        from server import embedded_model

        args.model = str(embedded_model.prepare())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loadgen.log").write_text("")
    ports = {"vllm": args.vllm_port, "ours": args.ours_port}
    modules = {"vllm": "vllm.entrypoints.openai.api_server", "ours": "server"}
    procs: dict[str, subprocess.Popen] = {}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in ports}
    try:
        for name in ports:
            procs[name] = start_server(name, modules[name], args.model, args.served_model_name, ports[name])
        for name in ports:
            wait_healthy(name, procs[name], ports[name], args.startup_timeout)
        for name in ports:
            logger.info("Warm-up: %d prompts against %s", args.warmup_prompts, name)
            run_load(args, args.model, ports[name], args.warmup_prompts)
        for i in range(1, args.rounds + 1):
            for name in ports:
                figures = run_load(args, args.model, ports[name], args.num_prompts)
                rounds[name].append(figures)
                logger.info("Round %d/%d %s: %.1f tok/s, median TTFT %.1f ms, %d failed", i, args.rounds,
                            name, figures["output_throughput"], figures["median_ttft_ms"], figures["failed"])
    finally:
        for name, proc in procs.items():
            stop_server(name, proc)

    medians = {name: {k: statistics.median(r[k] for r in rs) for k in METRICS} for name, rs in rounds.items()}
    ratios = {
        "throughput_ratio": medians["ours"]["output_throughput"] / medians["vllm"]["output_throughput"],
        "median_ttft_ratio": medians["ours"]["median_ttft_ms"] / medians["vllm"]["median_ttft_ms"],
    }
    verdicts = {k: verdict(v, TARGETS[k]) for k, v in ratios.items()}
    import vllm

    report = {
        "command": sys.argv,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "vllm": vllm.__version__},
        "model": args.model,
        "workload": {"dataset": "random", "endpoint": "/v1/completions", "input_len": args.input_len,
                     "output_len": args.output_len, "num_prompts": args.num_prompts,
                     "max_concurrency": args.concurrency, "ignore_eos": True, "seed": args.seed,
                     "rounds": args.rounds, "warmup_prompts": args.warmup_prompts, "engine_flags": ENGINE_FLAGS},
        "rounds": rounds,
        "medians": medians,
        "ratios": ratios,
        "targets": {k: " ".join(map(str, t)) for k, t in TARGETS.items()},
        "verdicts": verdicts,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("Wrote %s", args.output)
    print(markdown(medians, ratios, verdicts))


if __name__ == "__main__":
    main()
