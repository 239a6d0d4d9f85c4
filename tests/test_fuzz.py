"""Property-based fuzzing of every operation in the server's own OpenAPI schema, with Schemathesis.

A server of its own (the embedded model, context 128) answers requests that Schemathesis generates
from `/openapi.json`, valid and invalid, over HTTP. The properties: no 5xx (but the 504 of a request
whose own `request_timeout` ran out), no hang (every call has a finite timeout, and a timeout fails the
test), and every JSON error, in a 4xx answer or as an event of a stream, has OpenAI's shape. Two thirds
of the generated bodies name the served model, with `n` and the token budget kept small, so that the
fuzz reaches sampling instead of stopping at the 404 of an unknown model. The run is derandomized and
writes no Hypothesis database.
"""

import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from server import embedded_model
from tests.conftest import API_KEY, MODEL, running_server

log = logging.getLogger(__name__)

# No example database (`database=None` below), and Hypothesis's caches (Unicode tables, constants) go
# beside the model cache rather than into a `.hypothesis` folder in the working directory.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(embedded_model.cache_root().parent / "hypothesis")

# A call's time limit on the machine on which the suite's seconds were chosen; stretched by the fuzz
# server's measured pace (tests/pace.py).
REFERENCE_TIMEOUT_S = 60
# Examples per operation (Hypothesis stops earlier when it has tried every distinct input).
MAX_EXAMPLES = 300
# Bounds on the requests that name the served model, so that each costs well under a second even
# on the slower CPUs (docs/testing.md): the engine's time is most of the fuzz's, and two choices
# of at most 8 tokens still reach n > 1, streaming in several events, stops and min_tokens.
MAX_N = 2
MAX_TOKENS = 8
SERVED_FIELDS = {"model", "sampler", "n", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                 "stream_options", "presence_penalty", "frequency_penalty", "user", "repetition_penalty",
                 "ignore_eos", "min_tokens", "stop_token_ids", "return_token_ids", "prompt", "messages",
                 "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "min_p", "bad_words",
                 "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens"}

# Status codes per operation, summarised when the module's server stops.
STATUSES: defaultdict[str, Counter] = defaultdict(Counter)


@dataclass
class Fuzzed:
    schema: schemathesis.BaseSchema
    timeout_s: float  # for every call: past it, the call has hung


@pytest.fixture(scope="module")
def fuzzed(model_dir, tmp_path_factory) -> Iterator[Fuzzed]:
    log_path = tmp_path_factory.mktemp("fuzz") / "server.log"
    with running_server(model_dir, log_path, "--max-model-len", "128") as (server, _):
        timeout_s = server.pace.timeout(REFERENCE_TIMEOUT_S)
        config = schemathesis.Config.from_dict({
            "headers": {"Authorization": f"Bearer {API_KEY}"},
            "request-timeout": timeout_s,
            # Read every stream to its end (the default stops after 20 events).
            "max-stream-events": 100_000,
            # Failures print a curl reproduction: whole, and with `max_tokens` (its name has "token" in it)
            # and the test key left in.
            "output": {"sanitization": {"enabled": False}, "truncation": {"enabled": False}},
        })
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config,
                                               timeout=timeout_s)
        vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        schema.hook(served_model_hook(vocab_size))
        started = time.monotonic()
        yield Fuzzed(schema, timeout_s)
        log.info("fuzzed for %.0f s; statuses per operation: %s", time.monotonic() - started,
                 {label: dict(sorted(counts.items())) for label, counts in sorted(STATUSES.items())})


def served_model_hook(vocab_size: int):
    """A `flatmap_body` hook: two thirds of the object bodies name the served model, with `n` and the token
    budget bounded; half of those ("clean") also keep to the documented fields, the `direct` sampler and a
    non-empty prompt of token ids inside the vocabulary, so that they are likely to be sampled rather than
    refused."""

    def flatmap_body(context: schemathesis.HookContext, body):
        if not isinstance(body, dict):
            return st.just(body)
        # The first choice is the one Hypothesis shrinks to: a failure is reported with the cleanest body.
        return st.sampled_from(["served and clean", "served", "as generated"]).map(
            lambda how: body if how == "as generated"
            else served(body, clean=how == "served and clean", vocab_size=vocab_size))

    return flatmap_body


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    # An integral float such as 26.0 passes as an integer field.
    return isinstance(value, int | float) and not isinstance(value, bool)


def served(body: dict, clean: bool, vocab_size: int) -> dict:
    body = {**body, "model": MODEL}
    if is_number(body.get("n")):
        body["n"] = min(body["n"], MAX_N)
    budget = "max_completion_tokens" if "messages" in body else "max_tokens"
    for field in ("max_tokens", "max_completion_tokens"):
        if is_number(body.get(field)):
            body[field] = min(body[field], MAX_TOKENS)
        elif field == budget and body.get(field) is None:
            # An absent or null budget means the rest of the context: too slow for a fuzz.
            body[field] = MAX_TOKENS
    if clean:
        body = {k: v for k, v in body.items() if k in SERVED_FIELDS}
        if body.get("sampler") not in (None, "direct"):
            del body["sampler"]
        prompt = body.get("prompt")
        if prompt in ("", []):
            body["prompt"] = prompt = "Hello"
        if isinstance(prompt, list):
            body["prompt"] = [
                [t % vocab_size if is_int(t) else t for t in p] if isinstance(p, list)
                else p % vocab_size if is_int(p) else p
                for p in prompt]
    return body


def is_openai_error(payload) -> bool:
    error = payload.get("error") if isinstance(payload, dict) else None
    return (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str) and isinstance(error["type"], str)
            and isinstance(error["code"], int))


def not_a_server_error_but_the_clients_deadline(ctx, response, case):
    """Schemathesis's `not_a_server_error`, except the 504 of a request that set a `request_timeout` too
    short for it: the server then does what the request asked."""
    if response.status_code == 504 and _error_param(response) == "request_timeout":
        return None
    return not_a_server_error(ctx, response, case)


def _error_param(response):
    try:
        return response.json()["error"]["param"]
    except (ValueError, KeyError, TypeError):
        return None


@schemathesis.check
def openai_error_shape(ctx, response, case):
    """A 4xx JSON body is OpenAI's error; an error event in a stream is too, and never a 5xx."""
    content_type = response.headers.get("content-type", [""])[0]
    if 400 <= response.status_code < 500 and content_type.startswith("application/json"):
        if not is_openai_error(json.loads(response.content)):
            raise AssertionError(f"{response.status_code} body is not OpenAI's error JSON: "
                                 f"{response.text[:500]}")
    if content_type.startswith("text/event-stream"):
        for line in response.content.decode().splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                if not is_openai_error(event):
                    raise AssertionError(f"stream error event is not OpenAI's error JSON: {line[:500]}")
                if event["error"]["code"] >= 500:
                    raise AssertionError(f"stream ended with a server error: {line[:500]}")
    return None


CHECKS = [not_a_server_error_but_the_clients_deadline, openai_error_shape]

# Every operation in the schema, so that a new one fails `test_every_operation_is_fuzzed` until it is added.
OPERATIONS = ["GET /health", "GET /health/live", "GET /ping", "POST /ping", "GET /version", "POST /tokenize", "POST /detokenize",
              "GET /metrics", "GET /v1/models", "GET /v1/samplers", "POST /v1/completion_logprob", "POST /v1/completions",
              "POST /v1/chat/completions"]


def test_every_operation_is_fuzzed(fuzzed):
    assert sorted(result.ok().label for result in fuzzed.schema.get_all_operations()) == sorted(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz(fuzzed, label):
    operation = fuzzed.schema.find_operation_by_label(label)
    strategy = operation.as_strategy(GenerationMode.POSITIVE)
    if operation.body:
        # Invalid bodies too: wrong types, missing fields, not JSON at all (bodiless GETs have none).
        strategy = st.one_of(strategy, operation.as_strategy(GenerationMode.NEGATIVE))

    # No `explain` phase: it traces every line of a failing run again to no use here.
    @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                         phases=set(hypothesis.Phase) - {hypothesis.Phase.explain},
                         suppress_health_check=list(HealthCheck))
    @hypothesis.given(case=strategy)
    def fuzz(case):
        started = time.monotonic()
        # A hang fails too: `requests` raises on the timeout, and a stream cut short by it is refused.
        response = case.call(timeout=fuzzed.timeout_s)
        STATUSES[label][response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except BaseExceptionGroup as failures:
            # Schemathesis's FailureGroup is a BaseException, which Hypothesis passes through unshrunk;
            # as an ordinary ExceptionGroup the failing request is shrunk to a minimal reproduction.
            raise ExceptionGroup(str(failures), list(failures.exceptions)) from None
        assert not response.stream_cut_short, (
            f"the stream did not end within {fuzzed.timeout_s:.0f} s ({time.monotonic() - started:.0f} s)")

    fuzz()
