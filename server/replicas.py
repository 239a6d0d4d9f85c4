"""`python -m server.replicas`: several server replicas behind vllm-router on this machine's
loopback, to try the multi-replica deployment (deploy/k8s) on one machine.

    python -m server.replicas --replicas 2 --policy cache_aware --port 8000 -- --max-model-len 2048

Replica i (from 1) listens on --port + i, the router on --port; what follows `--` goes to every
replica (POWERSERVE_* variables reach them too). The router runs as the Kubernetes manifests run it:
health checks on /health every 5 s, and no retries (docs/deployment.md says why). Ctrl-C or SIGTERM
stops the router, then lets the replicas drain and stop.
"""

import argparse
import contextlib
import logging
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

logger = logging.getLogger("server.replicas")

POLICIES = ("cache_aware", "round_robin", "power_of_two", "consistent_hash", "random")
# Where `make router` installs vllm-router: a virtual environment of its own inside the project's,
# since its dependencies are pinned to other versions than vLLM's.
ROUTER = Path(sys.prefix) / "router" / "bin" / "vllm-router"
START_TIMEOUT_S = 1800  # a replica's engine start: minutes, several at once on few cores


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    ours, replica_flags = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m server.replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2, help="Server replicas to start (default 2).")
    parser.add_argument("--policy", choices=POLICIES, default="cache_aware", help="vllm-router's routing policy.")
    parser.add_argument("--port", type=int, default=8000, help="The router's port; replica i takes port + i.")
    parser.add_argument("--router", type=Path, default=ROUTER, help=f"The vllm-router executable (default {ROUTER}).")
    args = parser.parse_args(ours)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1.")
    if not args.router.exists():
        parser.error(f"{args.router} does not exist: `make router` installs vllm-router.")
    return args, replica_flags


def router_command(router: Path, port: int, replicas: list[str], policy: str) -> list[str]:
    return [str(router), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *replicas,
            "--policy", policy, "--health-check-endpoint", "/health", "--health-check-interval-secs", "5",
            "--disable-retries", "--request-timeout-secs", "3600",
            # Its own metrics, on a port of its own beside the replicas'.
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(port + len(replicas) + 1)]


def wait_ready(url: str, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(1)
    raise SystemExit(f"The {what} did not become ready (exit status {process.poll()}).")


def stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM (a replica drains), then its whole process group killed if it outlives `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            signal.killpg(process.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, replica_flags = parse_args(sys.argv[1:] if argv is None else argv)
    # Stopping is the same for Ctrl-C and SIGTERM: the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ports = [args.port + i for i in range(1, args.replicas + 1)]
    replicas, router = [], None
    try:
        for port in ports:
            command = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *replica_flags]
            replicas.append(subprocess.Popen(command, start_new_session=True))
            logger.info("Started replica %d (pid %d): %s", len(replicas), replicas[-1].pid, " ".join(command))
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, process in zip(urls, replicas):
            wait_ready(url + "/health", process, f"replica at {url}")
        command = router_command(args.router, args.port, urls, args.policy)
        logger.info("Starting the router: %s", " ".join(command))
        router = subprocess.Popen(command, start_new_session=True)
        wait_ready(f"http://127.0.0.1:{args.port}/health", router, "router")
        logger.info("Router ready on http://127.0.0.1:%d (policy %s) in front of %s", args.port, args.policy,
                    ", ".join(urls))
        router.wait()
        logger.error("The router exited with status %s", router.returncode)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if router is not None:
            stop(router, 10)
        for process in replicas:
            stop(process, 60)


if __name__ == "__main__":
    sys.exit(main())
