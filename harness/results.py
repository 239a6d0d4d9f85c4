"""Where results go, what each result starts with, and append-only records that make long runs resumable."""

import datetime
import json
import logging
import os
import platform
import shlex
from pathlib import Path

logger = logging.getLogger("harness.results")

# The benchmarks' figures, and the logs of the servers started for them.
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def header(module: str, argv: list[str]) -> dict:
    """What every benchmark result starts with: the command that made it, when, and on what."""
    return {
        "command": shlex.join(["python", "-m", module, *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }


def read_records(path: Path) -> list[dict]:
    """The JSON lines of an append-only records file (none if it does not exist). A last line cut
    short by an interruption is removed from the file, so that the next append starts on a line of
    its own."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        logger.warning("Dropping an unfinished last line of %s (an interrupted write)", path)
        path.write_bytes(complete)
    return [json.loads(line) for line in complete.decode().splitlines()]
