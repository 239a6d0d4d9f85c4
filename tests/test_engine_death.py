"""A server whose engine process dies answers 503 on /health and on requests, never a hang or 500."""

import os
import signal
import subprocess
import time

import httpx

from tests.conftest import API_KEY, MODEL, running_server


def engine_core_pids(server_pid: int) -> list[int]:
    """vLLM's engine core is a child process of the server named EngineCore."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(server_pid)],
                         capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "EngineCore" in line]


def test_dead_engine_gives_503(model_dir, tmp_path):
    with running_server(model_dir, tmp_path / "server.log", "--max-model-len", "512") as (server, process):
        pids = engine_core_pids(process.pid)
        assert pids, "no EngineCore child process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            deadline = time.monotonic() + 30
            while http.get("/health").status_code != 503:
                assert time.monotonic() < deadline, "/health still 200 30 s after the engine died"
                time.sleep(0.5)
            response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == 503
