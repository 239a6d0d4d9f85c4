"""Sampler resolution and request parsing, in-process: no engine needed."""

import pytest

from samplers import REGISTRY
from server import formats, protocol as p
from server.errors import APIError
from server.requests import _meant, resolve_sampler
from server.state import EngineState

pytestmark = pytest.mark.fast  # needs no engine: `make test-fast`

STATE = EngineState(served_name="m", root="/models/m", adapters={"tuned": "/adapters/tuned"})


def request(**fields) -> p.CompletionRequest:
    return p.CompletionRequest.model_validate({"model": "m", "prompt": "x", **fields})


def test_direct_is_the_default_and_registered():
    sampler, params, adapter, ignored = resolve_sampler(STATE, request())
    assert sampler is REGISTRY["direct"]
    assert params.model_dump() == {} and adapter is None and ignored == []


def test_a_distilled_model_decodes_directly_with_its_adapter():
    for model in ("tuned", "tuned:direct"):
        sampler, _, adapter, _ = resolve_sampler(STATE, request(model=model))
        assert sampler is REGISTRY["direct"] and adapter == "tuned"


@pytest.mark.parametrize("fields, status, param", [
    ({"model": "other"}, 404, "model"),
    ({"model": "other:direct"}, 404, "model"),
    ({"model": "m:nope"}, 400, "sampler"),
    ({"sampler": "nope"}, 400, "sampler"),
    ({"model": "m:direct", "sampler": "other"}, 400, "sampler"),
    ({"alpha": 2}, 400, "alpha"),  # power_alpha, shortened
    ({"sampler": "power_mcmc", "power_alhpa": 2}, 400, "power_alhpa"),  # misspelt
    ({"sampler": "power_mcmc", "particles": 2}, 400, "particles"),  # power_smc's
    ({"use_beam_search": True}, 400, "use_beam_search"),  # vLLM's, not ours
    ({"length_penalty": 2.0}, 400, "length_penalty"),
    ({"model": "tuned:power_mcmc"}, 400, "sampler"),
    ({"model": "tuned", "sampler": "power_scalable"}, 400, "sampler"),
])
def test_resolution_errors(fields, status, param):
    with pytest.raises(APIError) as caught:
        resolve_sampler(STATE, request(**fields))
    assert (caught.value.status, caught.value.param) == (status, param)


def test_fields_of_other_apis_that_change_nothing_are_ignored():
    resolved = resolve_sampler(STATE, request(sampler="power_mcmc", power_alpha=2, metadata={"user": "x"},
                                              cache_salt="s", length_penalty=None, use_beam_search=False))
    assert resolved.params.power_alpha == 2
    assert resolved.ignored == ["metadata", "cache_salt", "length_penalty", "use_beam_search"]
    chat = p.ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                   "parallel_tool_calls": False, "store": True})
    assert resolve_sampler(STATE, chat).ignored == ["parallel_tool_calls", "store"]


# Fields of OpenAI's chat API that the OpenAI SDK sends and vLLM's request models lack.
OPENAI_ONLY = ["metadata", "store", "service_tier", "modalities", "audio", "prediction", "web_search_options",
               "verbosity", "prompt_cache_key", "safety_identifier", "functions", "function_call"]


def test_no_field_of_vllms_or_openais_api_passes_for_a_misspelt_sampler_parameter():
    """Else a request that vLLM's server takes would be refused here as a misspelling. (The fields
    this server implements never come to that check.)"""
    for request_model in (p.CompletionRequest, p.ChatCompletionRequest):
        for name in [*p.vllm_field_defaults(request_model), *OPENAI_ONLY]:
            assert _meant(name) is None, name


def test_served_name_containing_a_colon_is_not_split():
    state = EngineState(served_name="org/model:v1", root="/x")
    sampler = resolve_sampler(state, request(model="org/model:v1")).sampler
    assert sampler.name == "direct"
    sampler = resolve_sampler(state, request(model="org/model:v1:direct")).sampler
    assert sampler.name == "direct"


@pytest.mark.parametrize("prompt, expected", [
    ("a", ["a"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2], [[1, 2]]),
    ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_prompt_forms(prompt, expected):
    assert request(prompt=prompt).prompts() == expected


def test_output_constraints_become_vllms_structured_outputs():
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    assert request(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
                   ).decode_params(8, None).structured_outputs == {"json": schema}
    assert request(response_format={"type": "json_object"}).output_constraint() == {"json_object": True}
    assert request(response_format={"type": "text"}).output_constraint() is None
    assert request(structured_outputs={"choice": ["a", "b"], "disable_any_whitespace": True}).output_constraint() == {
        "choice": ["a", "b"], "disable_any_whitespace": True, "disable_additional_properties": False}
    assert request(structured_outputs={"json": schema}).output_constraint()["json"] == schema
    for fields in ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
                   {"structured_outputs": {}}, {"structured_outputs": {"regex": "a", "choice": ["a"]}},
                   {"structured_outputs": {"structural_tag": "{}"}},
                   {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}):
        with pytest.raises(ValueError):
            request(**fields)


def test_decode_params_follow_the_request():
    body = request(stop="x", top_k=-1, stop_token_ids=[5], n=3, repetition_penalty=1.1, min_p=0.1,
                   logit_bias={"7": -5}, allowed_token_ids=[1, 2], bad_words=["no"], skip_special_tokens=False)
    decode = body.decode_params(10, logprobs=2)
    assert (decode.stop, decode.top_k, decode.stop_token_ids, decode.n, decode.logprobs,
            decode.repetition_penalty) == (("x",), 0, (5,), 3, 2, 1.1)
    assert (decode.min_p, decode.logit_bias, decode.allowed_token_ids, decode.bad_words,
            decode.skip_special_tokens) == (0.1, {7: -5.0}, (1, 2), ("no",), False)


def chat(**fields) -> p.ChatCompletionRequest:
    return p.ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                   **fields})


@pytest.mark.parametrize("fields, param", [
    ({"chat_template": "{{ messages[0]['content'] }}"}, "chat_template"),  # the server does not trust it
    ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),  # 'auto': no parser here
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),  # no tools
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),  # apply_chat_template's own
])
def test_chat_requests_the_server_cannot_honour(fields, param):
    with pytest.raises(APIError) as caught:
        formats.chat_run(STATE, chat(**fields))
    assert (caught.value.status, caught.value.param) == (400, param)
