"""Sampler resolution and request parsing, in-process: no engine needed."""

import pytest

from samplers import REGISTRY
from server import protocol as p
from server.errors import APIError
from server.requests import resolve_sampler
from server.state import EngineState

pytestmark = pytest.mark.fast  # needs no engine: `make test-fast`

STATE = EngineState(served_name="m", root="/models/m", adapters={"tuned": "/adapters/tuned"})


def request(**fields) -> p.CompletionRequest:
    return p.CompletionRequest.model_validate({"model": "m", "prompt": "x", **fields})


def test_direct_is_the_default_and_registered():
    sampler, params, adapter = resolve_sampler(STATE, request())
    assert sampler is REGISTRY["direct"]
    assert params.model_dump() == {} and adapter is None


def test_a_distilled_model_decodes_directly_with_its_adapter():
    for model in ("tuned", "tuned:direct"):
        sampler, _, adapter = resolve_sampler(STATE, request(model=model))
        assert sampler is REGISTRY["direct"] and adapter == "tuned"


@pytest.mark.parametrize("fields, status, param", [
    ({"model": "other"}, 404, "model"),
    ({"model": "other:direct"}, 404, "model"),
    ({"model": "m:nope"}, 400, "sampler"),
    ({"sampler": "nope"}, 400, "sampler"),
    ({"model": "m:direct", "sampler": "other"}, 400, "sampler"),
    ({"alpha": 2}, 400, "alpha"),
    ({"model": "tuned:power_mcmc"}, 400, "sampler"),
    ({"model": "tuned", "sampler": "power_scalable"}, 400, "sampler"),
])
def test_resolution_errors(fields, status, param):
    with pytest.raises(APIError) as caught:
        resolve_sampler(STATE, request(**fields))
    assert (caught.value.status, caught.value.param) == (status, param)


def test_served_name_containing_a_colon_is_not_split():
    state = EngineState(served_name="org/model:v1", root="/x")
    sampler, _, _ = resolve_sampler(state, request(model="org/model:v1"))
    assert sampler.name == "direct"
    sampler, _, _ = resolve_sampler(state, request(model="org/model:v1:direct"))
    assert sampler.name == "direct"


@pytest.mark.parametrize("prompt, expected", [
    ("a", ["a"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2], [[1, 2]]),
    ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_prompt_forms(prompt, expected):
    assert request(prompt=prompt).prompts() == expected


def test_decode_params_follow_the_request():
    body = request(stop="x", top_k=-1, stop_token_ids=[5], n=3, repetition_penalty=1.1)
    decode = body.decode_params(10, logprobs=2)
    assert (decode.stop, decode.top_k, decode.stop_token_ids, decode.n, decode.logprobs,
            decode.repetition_penalty) == (("x",), 0, (5,), 3, 2, 1.1)
