"""Every error path answers OpenAI's error JSON with the right status, never FastAPI's 422."""

import httpx
import openai
import pytest

from server import protocol as p
from tests.conftest import API_KEY, MODEL


def assert_error(response: httpx.Response, status: int, param: str | None = None, says: str = ""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert says in error["message"]
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in response.text


def complete(http, **fields):
    return http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields})


def test_unknown_model_is_404(http):
    assert_error(complete(http, model="gpt-4"), 404, "model", "gpt-4")


def test_unknown_sampler_names_it_and_lists_the_valid_ones(http):
    assert_error(complete(http, sampler="beam"), 400, "sampler", "'beam'")
    assert "direct" in complete(http, sampler="beam").json()["error"]["message"]
    assert_error(complete(http, model=f"{MODEL}:beam"), 400, "sampler", "'beam'")


def test_sampler_by_model_suffix_and_field(client, http):
    r = client.completions.create(model=f"{MODEL}:direct", prompt="Hi", max_tokens=2)
    assert r.model == f"{MODEL}:direct" and r.sampler_usage["name"] == "direct"
    assert complete(http, sampler="direct").status_code == 200
    assert_error(complete(http, model=f"{MODEL}:direct", sampler="power_mcmc"), 400, "sampler", "disagree")


def test_unknown_parameter_names_it(http, client):
    assert_error(complete(http, power_alpha=4), 400, "power_alpha", "'power_alpha'")
    assert_error(complete(http, sampler="power_mcmc", power_alhpa=4), 400, "power_alhpa",
                 "did you mean 'power_alpha'?")
    with pytest.raises(openai.BadRequestError, match="use_beam_search"):  # vLLM's, not implemented here
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       extra_body={"use_beam_search": True})


@pytest.mark.parametrize("sampler", ["power_mcmc", "power_scalable", "power_smc"])
@pytest.mark.parametrize("fields", [
    {"min_p": 0.1}, {"logit_bias": {"5": 1}}, {"allowed_token_ids": [5]}, {"bad_words": ["a"]},
    {"response_format": {"type": "json_object"}}, {"structured_outputs": {"regex": "a"}},
    {"skip_special_tokens": False}, {"spaces_between_special_tokens": False},
])
def test_engine_options_are_for_direct_only(http, sampler, fields):
    """A power sampler would not honour them: they constrain the engine's draw or its text."""
    [param] = fields
    assert_error(complete(http, sampler=sampler, **fields), 400, param, "sampler 'direct' only")


def test_engine_options_at_their_defaults_pass_for_any_sampler(http):
    defaults = {name: p.SamplingFields.model_fields[name].default for name in p.DIRECT_ONLY_FIELDS}
    assert complete(http, sampler="power_mcmc", **defaults).status_code == 200
    assert complete(http, sampler="power_mcmc", response_format={"type": "text"}).status_code == 200


def test_fields_of_other_apis_are_ignored_and_named(client, http):
    """What OpenAI SDK users send and vLLM's server takes: fields this server does not use."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        metadata={"team": "a"}, parallel_tool_calls=False, store=False, extra_body={"bogus": 1})
    assert raw.status_code == 200 and raw.parse().choices[0].message.content is not None
    assert set(raw.headers["x-ignored-fields"].split(", ")) == {"metadata", "parallel_tool_calls", "store", "bogus"}
    streamed = complete(http, stream=True, metadata={"team": "a"})
    assert streamed.status_code == 200 and streamed.headers["x-ignored-fields"] == "metadata"
    assert streamed.text.endswith("data: [DONE]\n\n")
    assert "x-ignored-fields" not in complete(http).headers


@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": None}, "prompt"),
    ({"stream_options": {"include_usage": "perhaps"}}, "stream_options.include_usage"),
    ({"request_timeout": 0}, "request_timeout"),
    ({"request_timeout": 3601}, "request_timeout"),  # over the default --max-request-timeout
    ({"n": 129}, "n"),
    # Found by the fuzz (tests/test_fuzz.py); each was a 500.
    ({"min_tokens": 3}, "min_tokens"),
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [49152]}, "stop_token_ids"),
    ({"n": 2, "temperature": 0}, "n"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"top_k": 2**64}, "top_k"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty"),  # NaN log-probabilities
])
def test_invalid_fields_are_400(http, fields, param):
    assert_error(complete(http, **fields), 400, param)


def test_missing_fields_and_bad_json_are_400(http):
    assert_error(http.post("/v1/completions", json={"model": MODEL}), 400, "prompt")
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400, "messages")
    assert_error(http.post("/v1/completions", content=b"{not json",
                           headers={"Content-Type": "application/json"}), 400, says="JSON")


def test_prompt_problems_are_400(http):
    assert_error(complete(http, prompt="word " * 1000, max_tokens=1500), 400, "max_tokens", "2048")
    assert_error(complete(http, prompt=""), 400, "prompt", "empty")
    assert_error(complete(http, prompt=[]), 400, "prompt", "empty")
    assert_error(complete(http, prompt=[1] * 2048, max_tokens=None), 400, "prompt", "no room")
    long_chat = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 2100}]}
    assert_error(http.post("/v1/chat/completions", json=long_chat), 400, "prompt", "no room")
    assert_error(complete(http, prompt=[10**9]), 400, "prompt")


def test_chat_specific_errors(http):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert_error(http.post("/v1/chat/completions", json={**chat, "top_logprobs": 2}), 400, "top_logprobs")
    bad_role = {**chat, "messages": [{"role": "robot", "content": "Hi"}]}
    assert_error(http.post("/v1/chat/completions", json=bad_role), 400)


def test_unknown_route_and_method_keep_the_error_shape(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)


# Open as on vLLM's server, which guards only /v1 and its other API prefixes.
OPEN_PATHS = {"/health", "/health/live", "/ping", "/version", "/tokenize", "/detokenize", "/metrics", "/openapi.json", "/docs",
              "/docs/oauth2-redirect", "/redoc"}


def test_api_key_guards_every_v1_endpoint_and_only_those(live_server):
    """Every route the app has (its OpenAPI paths plus the documentation routes) is either in the
    documented open set or refuses a missing, malformed or wrong key with 401, before parsing."""
    with httpx.Client(base_url=live_server.url) as anonymous:
        paths = anonymous.get("/openapi.json").json()["paths"]
        assert set(paths) - OPEN_PATHS == {"/v1/models", "/v1/samplers", "/v1/completion_logprob",
                                           "/v1/completions", "/v1/chat/completions"}
        for path, operations in paths.items():
            for method in operations:
                if path in OPEN_PATHS:  # answered, or refused for the empty body, but not for the key
                    assert anonymous.request(method, path).status_code in (200, 400), path
                    continue
                for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
                    response = anonymous.request(method, path, headers=headers, json={})
                    assert_error(response, 401, says="API key")
        for path in ("/docs", "/openapi.json"):
            assert anonymous.get(path).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="nope", max_retries=0).models.list()
