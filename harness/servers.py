"""Our server, or vLLM's own, in a process group of its own on a free port, until it is stopped."""

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from harness.results import RESULTS

logger = logging.getLogger("harness.servers")

SERVERS = {"vllm": "vllm.entrypoints.openai.api_server", "ours": "server"}  # run with -m, in this order


ENGINE_FLAGS = ["--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(2 << 30)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(name: str, model: str, served: str, port: int, *flags: str, log: Path | None = None) -> subprocess.Popen:
    """Start a server in a process group of its own, so that its engine processes die with it; its
    output goes to `log` (default: results/NAME.log)."""
    cmd = [sys.executable, "-m", SERVERS[name], "--model", model, "--served-model-name", served,
           "--port", str(port), *ENGINE_FLAGS, *flags]
    log = log or RESULTS / f"{name}.log"
    logger.info("Starting %s: %s (log: %s)", name, " ".join(cmd), log)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(name: str, proc: subprocess.Popen, port: int, timeout: float, log: Path | None = None) -> None:
    """Poll GET /health until it answers 200; fail with the log's tail if the server dies or stalls."""
    url, deadline = f"http://127.0.0.1:{port}/health", time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:  # a 503 raises HTTPError, an OSError
                logger.info("%s server is ready on port %d", name, port)
                return
        time.sleep(2)
    tail = "\n".join((log or RESULTS / f"{name}.log").read_text(errors="replace").splitlines()[-40:])
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not healthy after {timeout}s"
    raise RuntimeError(f"The {name} server {state}; its log ends:\n{tail}")


# Benchmarks measure what the engine does with the load they send, so the server's admission gates
# (4 power requests at a time by default) and its 20-minute deadline must not reshape it.
UNGATED = ("--max-concurrent", "power_mcmc=64", "--max-concurrent", "power_scalable=64",
           "--max-concurrent", "power_smc=64", "--request-timeout", "3600")


@contextlib.contextmanager
def embedded_server(served: str, port: int, flags: tuple[str, ...] = UNGATED, model: Path | None = None,
                    log: Path | None = None) -> Iterator[str]:
    """Our server on `model` (default: the embedded model) for the length of a run; yields its base URL."""
    from server import embedded_model

    process = start_server("ours", str(model or embedded_model.prepare()), served, port, *flags, log=log)
    try:
        wait_healthy("ours", process, port, 600, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server("ours", process)


def stop_server(name: str, proc: subprocess.Popen) -> None:
    """Terminate the server's process group, then kill whatever is left of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    logger.info("Stopped the %s server", name)
