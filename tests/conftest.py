"""One real server per test session: the embedded SmolLM2 on vLLM, driven over HTTP.

It runs in float32 so that its log-probabilities can be checked tightly against a Hugging Face
forward pass, and with an API key so that authentication is exercised on every call.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from harness.servers import free_port
from server import embedded_model
from tests.pace import Pace, measure_pace

API_KEY = "test-key"
MODEL = embedded_model.MODEL_NAME
STARTUP_TIMEOUT_S = 600
SESSION_SERVER_GROUP = "session-server"

# `make test` runs two pytest-xdist workers. vLLM's CPU engine binds its OpenMP threads to one core,
# the same one in every engine unless told otherwise, so each worker's engines (servers, in-process
# engines, the distillation's, all started below this process) get a core of their own.
# Torch work outside the engines (training in the distillation miniature, reference forward passes)
# runs on one thread: on two threads, with the other worker holding a core, each parallel region
# waits for the thread that has none, and a 13-second training took 3 minutes.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    _cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(_cores[int(_WORKER.removeprefix("gw")) % len(_cores)]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Worker groups for `--dist loadgroup`: every test that talks to the session's server runs on
    one worker, so that one server serves them all; the rest run a module to a worker, so that
    their module fixtures (servers and engines of their own) start once."""
    for item in items:
        group = SESSION_SERVER_GROUP if "live_server" in item.fixturenames else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
    yield  # the other plugins' hooks: pytest-xdist's puts the group in each node id


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Fail at once where pytest-xdist ignores the groups: each worker would start every server and
    engine again, on memory that may not hold them all."""
    if node.config.getvalue("dist") == "loadgroup" and any("@" not in nodeid for nodeid in ids):
        raise pytest.UsageError("pytest-xdist ignored the test groups of tests/conftest.py "
                                "(see the pin of pytest in pyproject.toml)")


@dataclass
class LiveServer:
    url: str
    model_dir: Path
    log: Path
    pid: int  # the server process; vLLM's engine core is its child
    # What the server answered while its engine was still loading.
    loading_answers: dict[str, httpx.Response] = field(default_factory=dict)

    def client(self, **kwargs) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, **kwargs)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"},
                            timeout=120)

    @cached_property
    def pace(self) -> Pace:
        """This server's decoding speed, measured on first use."""
        with self.http() as http:
            measured = measure_pace(http, MODEL)
        logging.getLogger(__name__).info("%s decodes %.1f tokens/s alone (%.1fx the reference machine's time)",
                                         self.url, 1 / measured.s_per_token, measured.slowdown)
        return measured


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return embedded_model.prepare()


@contextmanager
def running_server(model_dir: Path, log: Path, *flags: str) -> Iterator[tuple[LiveServer, subprocess.Popen]]:
    """Start `python -m server` with an API key on a free port; stop its whole process group after.
    The key and --enforce-eager come from the environment, as a container's would."""
    port = free_port()
    command = [sys.executable, "-m", "server", "--port", str(port), *flags]
    environment = {**os.environ, "POWERSERVE_API_KEY": API_KEY, "POWERSERVE_ENFORCE_EAGER": "true"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=environment)
    server = LiveServer(url=f"http://127.0.0.1:{port}", model_dir=model_dir, log=log, pid=process.pid)
    try:
        _wait_until_ready(server, process)
        yield server, process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has exited already
        pass


@pytest.fixture(scope="session")
def live_server(model_dir: Path, tmp_path_factory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    # Trusting requests' own chat templates, to compare them with vLLM's server (test_completions.py).
    with running_server(model_dir, log, "--dtype", "float32", "--max-model-len", "2048",
                        "--trust-request-chat-template") as (server, _):
        yield server


def _wait_until_ready(server: LiveServer, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with server.http() as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log.read_text()[-4000:]}")
            try:
                health = http.get("/health")
            except httpx.TransportError:
                time.sleep(0.5)
                continue
            if health.status_code == 200:
                return
            if "health" not in server.loading_answers:
                server.loading_answers["health"] = health
                server.loading_answers["completion"] = http.post(
                    "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            time.sleep(0.5)
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{server.log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def client(live_server: LiveServer) -> OpenAI:
    return live_server.client()


@pytest.fixture(scope="session")
def http(live_server: LiveServer):
    with live_server.http() as http:
        yield http


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def assert_base_logprobs(model_dir: Path, choices, tolerance: float = 2e-3, temperature: float = 1.0) -> None:
    """Each choice's token logprobs, and the best of its alternatives where it has them, are the
    model's own log p (at `temperature`, 1 by default: the base model), by a float32 Hugging Face
    forward pass over prompt and completion."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for choice in choices:
        ids = choice.prompt_token_ids + choice.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        reference = torch.log_softmax(logits / temperature, dim=-1)
        start = len(choice.prompt_token_ids)
        for i, token_id in enumerate(choice.token_ids):
            row = reference[start + i - 1]
            assert choice.logprobs.token_logprobs[i] == pytest.approx(row[token_id].item(), abs=tolerance)
            # top_logprobs holds the drawn token and the alternatives asked for: with any
            # alternative there, its best is the model's most likely token.
            if choice.logprobs.top_logprobs and len(choice.logprobs.top_logprobs[i]) > 1:
                assert max(choice.logprobs.top_logprobs[i].values()) == pytest.approx(row.max().item(), abs=tolerance)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    """The exactness tests' tiny random Llama (harness/tiny_models.py) and its exact next-token table."""
    from harness import tiny_models as tm

    directory = tm.build(tmp_path_factory.mktemp("tiny"), tm.SEED, tm.SHARPNESS, tm.EOS_TILT)
    return directory, tm.next_token_logprobs(directory, tm.PROMPT, tm.MAX_TOKENS)


@pytest.fixture(scope="module")
def tiny_engine(tiny):
    """A real vLLM engine on the tiny Llama, for one test module."""
    from harness import tiny_models as tm

    engine = tm.TinyEngine(tiny[0])
    yield engine
    engine.close()
