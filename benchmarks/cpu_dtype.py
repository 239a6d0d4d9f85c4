"""`python -m benchmarks.cpu_dtype`: the embedded model's speed in bf16 and in float32, with PyTorch's
native kernels and with its AVX2 kernels, eager and compiled by torch, on this CPU; the measurement
behind the server's choices of dtype and of eager execution on CPU (`samplers/vllm_engine.py`).

`ATEN_CPU_CAPABILITY=avx2` with `ONEDNN_MAX_CPU_ISA=AVX2` makes PyTorch and oneDNN (which runs vLLM's
linear layers on CPU) use AVX2 instructions only, so that bf16 is emulated as on the AVX2-only machines
of this kind; vLLM's own kernels (attention, activations) are chosen by the CPU's flags and are not
affected. Each configuration is one server started with an explicit `--dtype` and `--enforce-eager`
or `--no-enforce-eager`, one after another: the engine's start-up time, and that of a second start
with the same flags (a restart, with whatever the first left in vLLM's compile cache); decode tokens/s of one 64-token request alone and of 8 at once; prefill
tokens/s of a 448-token prompt that misses the prefix cache (what power_mcmc's scoring costs); and
the wall-clock of a seeded power_mcmc request (32 tokens, 1 step per block). Medians of `--repeats`.
Each finished configuration is appended to cpu_dtype.jsonl, so an interrupted run resumes; writes
cpu_dtype.json and prints a Markdown table. Each row keeps the command that measured it, and the
file's `command` names every invocation its rows came from (several may fill one `--output`).
"""

import argparse
import json
import logging
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import httpx

from harness.results import RESULTS, header, read_records
from harness.servers import embedded_server, free_port

logger = logging.getLogger("benchmarks.cpu_dtype")
SERVED = "SmolLM2-135M-Instruct"
KERNELS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
DTYPES = ("bfloat16", "float32")
MODES = {"eager": "--enforce-eager", "compiled": "--no-enforce-eager"}
DECODE = {"model": SERVED, "prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True}
PREFILL_TOKENS = 448
MCMC = {**DECODE, "max_tokens": 32, "sampler": "power_mcmc", "mcmc_steps": 1}
FIGURES = ["start_s", "restart_s", "decode_alone_tok_s", "decode_8_tok_s", "prefill_tok_s", "power_mcmc_s"]


def timed(http: httpx.Client, body: dict) -> float:
    start = time.monotonic()
    http.post("/v1/completions", json=body).raise_for_status()
    return time.monotonic() - start


def measure(url: str, repeats: int, rng: random.Random) -> dict:
    with httpx.Client(base_url=url, timeout=1800) as http:
        timed(http, DECODE)  # warm-up
        alone = [DECODE["max_tokens"] / timed(http, DECODE) for _ in range(repeats)]
        batched = []
        with ThreadPoolExecutor(8) as pool:
            for _ in range(repeats):
                start = time.monotonic()
                list(pool.map(lambda _: timed(http, DECODE), range(8)))
                batched.append(8 * DECODE["max_tokens"] / (time.monotonic() - start))
        # Random token ids: a prompt no earlier request shares, so every token is prefilled.
        prefill = [PREFILL_TOKENS / timed(http, {"model": SERVED, "max_tokens": 1,
                                                 "prompt": [rng.randrange(1000, 40000) for _ in range(PREFILL_TOKENS)]})
                   for _ in range(repeats)]
        mcmc = [timed(http, {**MCMC, "seed": seed}) for seed in range(repeats)]
    return {"decode_alone_tok_s": statistics.median(alone), "decode_8_tok_s": statistics.median(batched),
            "prefill_tok_s": statistics.median(prefill), "power_mcmc_s": statistics.median(mcmc)}


def markdown(rows: list[dict]) -> str:
    lines = ["| kernels | dtype | engine | start (s) | restart (s) | decode alone (tok/s) | "
             "decode, 8 at once (tok/s) | prefill (tok/s) | power_mcmc 32 tokens (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['kernels']} | {r['dtype']} | {r['mode']} | " + " | ".join(f"{r[k]:.1f}" for k in FIGURES) + " |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_dtype", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="(default: 3)")
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS), help="(default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="(default: both)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="(default: both)")
    parser.add_argument("--output", type=Path, default=RESULTS / "cpu_dtype.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = header("benchmarks.cpu_dtype", sys.argv[1:] if argv is None else argv)["command"]
    records = args.output.with_suffix(".jsonl")
    done = [r for r in read_records(records) if "mode" in r]  # rows from before the compile axis: measured again
    configurations = [(kernels, dtype, mode) for kernels in args.kernels for dtype in args.dtypes
                      for mode in args.modes]
    for i, (kernels, dtype, mode) in enumerate(configurations, 1):
        name = f"[{i}/{len(configurations)}] {kernels} kernels, {dtype}, {mode}"
        if any((r["kernels"], r["dtype"], r["mode"]) == (kernels, dtype, mode) for r in done):
            logger.info("%s: measured already", name)
            continue
        logger.info(name)
        log = RESULTS / f"cpu_dtype-{kernels}-{dtype}-{mode}.log"
        flags = ("--dtype", dtype, MODES[mode])
        with mock.patch.dict("os.environ", KERNELS[kernels]):
            started = time.monotonic()
            with embedded_server(SERVED, free_port(), flags, log=log) as url:
                row = {"kernels": kernels, "dtype": dtype, "mode": mode, "command": command,
                       "start_s": time.monotonic() - started,
                       **measure(url, args.repeats, random.Random(i))}
            started = time.monotonic()
            with embedded_server(SERVED, free_port(), flags, log=log):
                row["restart_s"] = time.monotonic() - started
        log.unlink()
        with records.open("a") as out:
            out.write(json.dumps(row) + "\n")
        done.append(row)
    cpuinfo = {key.strip(): value.strip() for key, _, value in
               (line.partition(":") for line in Path("/proc/cpuinfo").read_text().splitlines())}
    # Rows measured by several invocations (one file, configurations chosen per run) name them all.
    commands = list(dict.fromkeys(row.get("command", command) for row in done)) or [command]
    report = header("benchmarks.cpu_dtype", sys.argv[1:] if argv is None else argv) | {
        "command": " && ".join(commands),
        "cpu": cpuinfo["model name"], "cpu_bf16_instructions": "avx512_bf16" in cpuinfo["flags"].split(),
        "kernels": KERNELS,
        "workload": {"decode": DECODE, "prefill_tokens": PREFILL_TOKENS, "power_mcmc": MCMC,
                     "repeats": args.repeats},
        "rows": done,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("Wrote %s", args.output)
    print(markdown(done))


if __name__ == "__main__":
    main()
