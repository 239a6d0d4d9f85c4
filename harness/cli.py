"""What the command-line tools share: one-line usage errors and sampler specs."""

import argparse
import json


class UsageError(Exception):
    """A bad argument or a request the server refuses: reported in one line, not a traceback."""


def parse_sampler(spec: str) -> tuple[str, dict]:
    """'NAME' or 'NAME:{json fields}' -> (label, request fields). `direct` adds no `sampler` field,
    so that plain decoding runs on any OpenAI-compatible server."""
    name, _, fields = spec.partition(":")
    try:
        extra = json.loads(fields) if fields else {}
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"sampler fields must be a JSON object: {spec!r} ({exc})") from None
    if not name or not isinstance(extra, dict):
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:{{json fields}}, got {spec!r}")
    return spec, ({} if name == "direct" else {"sampler": name}) | extra


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
