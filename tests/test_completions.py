"""/v1/completions against the real engine, through the official OpenAI client."""

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import MODEL, STARTUP_TIMEOUT_S, assert_base_logprobs
from tests.test_errors import assert_error

PROMPT = "The capital of France is"


def test_loading_server_answers_503(live_server):
    health = live_server.loading_answers["health"]
    completion = live_server.loading_answers["completion"]
    assert health.status_code == 503
    assert completion.status_code == 503
    assert completion.json()["error"]["code"] == 503
    assert "loading" in completion.json()["error"]["message"]


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == 2048


def test_usage_counts_are_exact(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert len(choice.token_ids) == 7
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    # The prompt, shorter than a KV block, cannot be found in the prefix cache: it is prefilled.
    assert r.sampler_usage == {"name": "direct", "engine_tokens_generated": 7,
                               "engine_tokens_prefilled": r.usage.prompt_tokens, "engine_tokens_scored": 0,
                               "events": {}, "details": {}, "proposal": None}


def test_return_token_ids_match_text_and_prompt(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = r.choices[0]
    assert choice.prompt_token_ids == tokenizer.encode(PROMPT)
    assert tokenizer.decode(choice.token_ids, skip_special_tokens=True) == choice.text


def test_prompt_forms_and_n(client, tokenizer):
    ids = tokenizer.encode(PROMPT)
    for prompt, count in [(PROMPT, 1), ([PROMPT, "One, two,"], 2), (ids, 1), ([ids, ids[:3]], 2)]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, n=2,
                                      extra_body={"ignore_eos": True})
        assert sorted(c.index for c in r.choices) == list(range(2 * count))
        assert r.usage.completion_tokens == 3 * 2 * count


def test_greedy_stream_equals_non_stream_and_arrives_incrementally(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    arrivals, pieces, finish = [], [], None
    for chunk in client.completions.create(stream=True, **kwargs):
        arrivals.append(time.monotonic())
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full
    assert finish == "length"
    # Token-by-token streaming: many chunks, spread over the generation rather than sent at once.
    assert len(arrivals) >= 20
    assert arrivals[len(arrivals) // 2] - arrivals[0] > 0.05


def test_stream_usage_chunk_only_when_asked(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=5, n=2, stream=True,
                  extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in client.completions.create(**kwargs))


def test_stop_string_cuts_and_reports_reason(client):
    kwargs = dict(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=30, temperature=0)
    text = client.completions.create(**kwargs).choices[0].text
    stop = text.strip()[:2]
    assert stop, f"greedy output too short to pick a stop string: {text!r}"
    choice = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.stop_reason == stop
    assert choice.text == text[: text.index(stop)]


def test_stop_token_ids_and_min_tokens(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    greedy = client.completions.create(extra_body={"return_token_ids": True, "ignore_eos": True},
                                       **kwargs).choices[0].token_ids
    stop_id = greedy[3]
    choice = client.completions.create(
        extra_body={"return_token_ids": True, "stop_token_ids": [stop_id]}, **kwargs).choices[0]
    assert choice.token_ids == greedy[: greedy.index(stop_id) + 1]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop_id
    # min_tokens holds back EOS and stop tokens until that many tokens exist.
    choice = client.completions.create(
        extra_body={"return_token_ids": True, "stop_token_ids": [stop_id], "min_tokens": 10},
        **kwargs).choices[0]
    assert len(choice.token_ids) >= 10


def test_seed_makes_sampling_reproducible(client):
    def draw(seed):
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, seed=seed, n=2,
                                      extra_body={"ignore_eos": True})
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = draw(1234)
    assert draw(1234) == first
    assert draw(4321) != first


def test_concurrent_seeded_requests_keep_the_engine_alive(live_server, client):
    # Enough seeded requests at once to overflow a step's token budget: with vLLM's chunked
    # prefill (on by default) this kills the engine on CPU ("CPU Generator does not use offset"),
    # so the server turns it off there (samplers/vllm_engine.py).
    prompt = "Question: what is 12 times 7? Answer step by step. " * 3

    def draw(seed):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=8, seed=seed).choices

    with ThreadPoolExecutor(16) as pool:
        assert all(len(choices) == 8 for choices in pool.map(draw, range(32)))
    with live_server.http() as http:
        assert http.get("/health").status_code == 200


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_logprobs_are_the_models_own_at_any_temperature(live_server, client, temperature):
    """In vLLM's default raw_logprobs mode, as on vLLM's own server, reported log-probabilities are
    the model's log p before temperature."""
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, logprobs=3,
                                  temperature=temperature, extra_body={"return_token_ids": True})
    assert_base_logprobs(live_server.model_dir, r.choices)
    first = r.choices[0].logprobs
    assert first.tokens[0] in first.top_logprobs[0] and len(first.top_logprobs[0]) in (3, 4)  # 3 and the drawn
    assert len(r.choices[0].logprobs.tokens) == len(r.choices[0].token_ids)
    assert r.choices[0].logprobs.text_offset[0] == 0


TOKENIZE = [{"prompt": PROMPT}, {"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True},
            {"messages": [{"role": "user", "content": "Hi"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}],
             "add_generation_prompt": False, "continue_final_message": True, "return_token_strs": True}]


@pytest.fixture(scope="module")
def vllm_http(live_server, tmp_path_factory):
    """vLLM's own OpenAI server on the same model and engine settings as the session's server."""
    from harness.servers import free_port, start_server, stop_server, wait_healthy

    port, log = free_port(), tmp_path_factory.mktemp("vllm") / "vllm.log"
    process = start_server("vllm", str(live_server.model_dir), MODEL, port, "--dtype", "float32",
                           "--block-size", "32", "--trust-request-chat-template", log=log)
    try:
        wait_healthy("vllm", process, port, STARTUP_TIMEOUT_S, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            yield http
    finally:
        stop_server("vllm", process)


def test_logprobs_and_tokenizer_routes_equal_vllms_own_servers(http, vllm_http):
    """vLLM's own server answers the same seeded request with the same tokens, log-probabilities
    and alternatives, at temperature 1 and 0.5; and /tokenize, /detokenize and /version as its do."""
    for temperature in (1.0, 0.5):
        request = dict(model=MODEL, prompt=PROMPT, max_tokens=12, logprobs=3, seed=5, temperature=temperature)
        ours, vllms = (h.post("/v1/completions", json=request).json()["choices"][0]["logprobs"]
                       for h in (http, vllm_http))
        assert ours["tokens"] == vllms["tokens"]
        assert ours["token_logprobs"] == pytest.approx(vllms["token_logprobs"], abs=1e-4)
        for mine, other in zip(ours["top_logprobs"], vllms["top_logprobs"], strict=True):
            assert mine == pytest.approx(other, abs=1e-4)
    for body in TOKENIZE:
        answers = [h.post("/tokenize", json={"model": MODEL, **body}) for h in (http, vllm_http)]
        assert answers[0].status_code == answers[1].status_code == 200, answers[0].text
        assert answers[0].json() == answers[1].json(), body
    tokens = answers[0].json()["tokens"]
    assert http.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json() == vllm_http.post(
        "/detokenize", json={"model": MODEL, "tokens": tokens}).json()
    assert http.get("/version").json()["version"] == vllm_http.get("/version").json()["version"]


CHAT = [{"role": "user", "content": "Name a city and its country, as JSON."}]
PLACE = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
         "required": ["city", "country"]}


def conformance_requests(tokenizer) -> dict[str, tuple[str, dict]]:
    """Requests for `direct` with the fields it passes to the engine, valid and not."""
    paris, the = tokenizer.encode(" Paris")[0], tokenizer.encode(" the")[0]
    completion = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    chat = {"messages": CHAT, "max_tokens": 48, "temperature": 0}
    return {
        "greedy": ("completions", completion),
        "min_p": ("completions", completion | {"temperature": 1, "seed": 7, "min_p": 0.2}),
        "logit_bias": ("completions", completion | {"logit_bias": {str(paris): -100}}),
        "allowed_token_ids": ("completions", completion | {"temperature": 1, "seed": 7,
                                                           "allowed_token_ids": [paris, the, 30]}),
        "bad_words": ("completions", completion | {"bad_words": ["Paris", "city"]}),
        "stop string kept": ("completions", completion | {"stop": ["."], "include_stop_str_in_output": True}),
        "no special tokens": ("completions", completion | {"add_special_tokens": False}),
        "prompt cut": ("completions", completion | {"truncate_prompt_tokens": 3}),
        "prompt cut, end kept": ("completions", completion | {"truncate_prompt_tokens": 3, "truncation_side": "left"}),
        "prompt cut to the context": ("completions", completion | {"truncate_prompt_tokens": -1}),
        "chat prompt cut": ("chat/completions", chat | {"truncate_prompt_tokens": 20, "truncation_side": "left"}),
        "regex": ("completions", {"prompt": "My phone number is", "max_tokens": 12, "temperature": 0,
                                  "structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}}),
        "json schema": ("chat/completions", chat | {"response_format": {"type": "json_schema",
                                                            "json_schema": {"name": "place", "schema": PLACE}}}),
        "json object": ("chat/completions", chat | {"response_format": {"type": "json_object"}}),
        "choice": ("chat/completions", chat | {"structured_outputs": {"choice": ["Paris", "Rome"]}}),
        "json schema, streamed": ("chat/completions", chat | {"structured_outputs": {"json": PLACE}, "stream": True}),
        "bad regex": ("completions", completion | {"structured_outputs": {"regex": "(["}}),
        "token out of vocabulary": ("completions", completion | {"allowed_token_ids": [10 ** 6]}),
        "bias out of vocabulary": ("completions", completion | {"logit_bias": {str(10 ** 6): 1}}),
        "min_p over 1": ("completions", completion | {"min_p": 2}),
        "schema missing": ("chat/completions", chat | {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
        "cut beyond the context": ("completions", completion | {"truncate_prompt_tokens": 4096}),
    }


def answer(http, endpoint: str, body: dict) -> tuple[int, list[dict]]:
    """The status and, for a 200, each choice's text, token ids, finish and stop reasons (the
    stream's chunks joined)."""
    response = http.post(f"/v1/{endpoint}", json={"model": MODEL, "return_token_ids": True, **body})
    if response.status_code != 200:
        return response.status_code, []
    chunks = ([json.loads(line[6:]) for line in response.text.splitlines()
               if line.startswith("data: {")] if body.get("stream") else [response.json()])
    assert all("error" not in chunk for chunk in chunks), response.text
    choices: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            mine = choices.setdefault(c["index"], {"text": "", "token_ids": [], "finish_reason": None, "stop_reason": None})
            mine["text"] += c["text"] if endpoint == "completions" else (c["delta"] if "delta" in c else c["message"]).get(
                "content") or ""
            mine["token_ids"] += c.get("token_ids") or []
            for reason in ("finish_reason", "stop_reason"):
                mine[reason] = c.get(reason) or mine[reason]
            mine["prompt_token_ids"] = mine.get("prompt_token_ids") or c.get("prompt_token_ids") or chunk.get(
                "prompt_token_ids")
    return 200, [choices[i] for i in sorted(choices)]


def test_direct_takes_vllms_engine_options_as_vllms_own_server_does(http, vllm_http, tokenizer):
    """Constraints (min_p, logit_bias, allowed_token_ids, bad_words, structured outputs by regex,
    JSON schema, JSON object or choice) and text options, valid and not: the same status, text,
    token ids and finish reasons from both servers, streamed or not; and JSON that fits its schema."""
    answers = {}
    for name, (endpoint, body) in conformance_requests(tokenizer).items():
        answers[name] = answer(http, endpoint, body)
        assert answers[name] == answer(vllm_http, endpoint, body), name
        if answers[name][0] != 200:
            assert_error(http.post(f"/v1/{endpoint}", json={"model": MODEL, **body}), answers[name][0])
    assert [status for status, _ in answers.values()] == [200] * 16 + [400] * 6
    for name in ("json schema", "json schema, streamed"):
        [placed] = answers[name][1]
        assert placed["finish_reason"] == "stop" and set(json.loads(placed["text"])) == {"city", "country"}, placed


TOOL = {"type": "function", "function": {"name": "weather", "description": "The weather in a city.",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
OPENED = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
TOOL_TURN = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                 "name": "weather", "arguments": '{"city": "Paris"}'}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 21 C"}]
CHAT_TEMPLATE_REQUESTS = {
    "continued": {"messages": OPENED, "add_generation_prompt": False, "continue_final_message": True},
    "closed": {"messages": OPENED, "add_generation_prompt": False},
    "continued, echoed": {"messages": OPENED, "add_generation_prompt": False, "continue_final_message": True,
                          "echo": True},
    "continued, echoed, streamed": {"messages": OPENED, "add_generation_prompt": False,
                                    "continue_final_message": True, "echo": True, "stream": True},
    "echo of another role": {"messages": CHAT, "echo": True},
    "template variables": {"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}},
    "own template": {"messages": CHAT, "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                     "{% endfor %}assistant:"},
    "tool turn": {"messages": TOOL_TURN},
    "tools for the template only": {"messages": CHAT, "tools": [TOOL], "tool_choice": "none"},
    "tools to be parsed": {"messages": CHAT, "tools": [TOOL]},
    "open and prompted": {"messages": OPENED, "continue_final_message": True},
}


def test_chat_template_controls_answer_as_vllms_own_server(http, vllm_http):
    """add_generation_prompt, continue_final_message, chat_template_kwargs, a request's own template
    (both servers trust it here), tool messages and tools: the same prompt token ids and output
    from both, or the same 400."""
    statuses = {}
    for name, body in CHAT_TEMPLATE_REQUESTS.items():
        body = {"max_tokens": 8, "temperature": 0, **body}
        ours = answer(http, "chat/completions", body)
        assert ours == answer(vllm_http, "chat/completions", body), name
        statuses[name] = ours[0]
    assert list(statuses.values()) == [200] * 9 + [400] * 2
    assert answer(http, "chat/completions", {"max_tokens": 8, "temperature": 0, **CHAT_TEMPLATE_REQUESTS[
        "continued, echoed"]})[1][0]["text"].startswith(OPENED[-1]["content"])
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "tools": [TOOL],
                                                         "tool_choice": "required"}), 400, "tool_choice")


ECHO = [{"max_tokens": 4, "temperature": 0}, {"max_tokens": 0, "logprobs": 2},
        {"max_tokens": 3, "logprobs": 1, "temperature": 0}, {"max_tokens": 3, "logprobs": 1, "temperature": 0, "stream": True},
        {"max_tokens": 0, "logprobs": 0, "prompt": [[9, 10, 11], [12, 13]]}]


def echoed(http, body: dict) -> list[dict]:
    """Each choice's text and logprobs, a stream's chunks joined."""
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "echo": True, **body})
    assert response.status_code == 200, response.text
    chunks = ([json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
              if body.get("stream") else [response.json()])
    choices: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            mine = choices.setdefault(c["index"], {"text": ""})
            mine["text"] += c["text"]
            for name, values in (c["logprobs"] or {}).items():
                mine.setdefault(name, []).extend(values)
    return [choices[i] for i in sorted(choices)]


def test_echo_answers_as_vllms_own_server(http, vllm_http):
    """The prompt's text, then the completion's; with logprobs, the prompt tokens' (none for the
    first) before the completion's; max_tokens 0 scores the prompt only. Streamed or not, for a
    string prompt or token ids, as vLLM's own server answers."""
    for body in ECHO:
        ours, theirs = echoed(http, body), echoed(vllm_http, body)
        assert [c["text"] for c in ours] == [c["text"] for c in theirs], body
        assert ours[0]["text"].startswith(PROMPT if "prompt" not in body else "")
        for mine, other in zip(ours, theirs, strict=True):
            assert mine.keys() == other.keys(), body
            if "tokens" in mine:
                assert (mine["tokens"], mine["text_offset"]) == (other["tokens"], other["text_offset"]), body
                assert mine["token_logprobs"][0] is None and other["token_logprobs"][0] is None
                assert mine["token_logprobs"][1:] == pytest.approx(other["token_logprobs"][1:], abs=1e-4)
                for top, their_top in zip(mine["top_logprobs"][1:], other["top_logprobs"][1:], strict=True):
                    assert top == pytest.approx(their_top, abs=1e-4)


PROMPT_LOGPROBS = {
    "completion": ("completions", {"prompt": PROMPT, "prompt_logprobs": 2}),
    "two prompts, no alternatives": ("completions", {"prompt": [PROMPT, "Hello there"], "prompt_logprobs": 0}),
    "an echo's": ("completions", {"prompt": PROMPT, "echo": True, "logprobs": 1}),
    "chat": ("chat/completions", {"messages": CHAT, "prompt_logprobs": 1}),
    "streamed, none": ("completions", {"prompt": PROMPT, "prompt_logprobs": 0, "stream": True}),
    "streamed": ("completions", {"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}),
    "the whole vocabulary": ("completions", {"prompt": PROMPT, "prompt_logprobs": -1}),
    "over the limit": ("completions", {"prompt": PROMPT, "prompt_logprobs": 21}),
    "negative": ("chat/completions", {"messages": CHAT, "prompt_logprobs": -2}),
}


def prompt_logprobs(http, endpoint: str, body: dict) -> tuple[int, list]:
    """The status and, for a 200, each prompt's prompt_logprobs (a stream's chunks have none)."""
    response = http.post(f"/v1/{endpoint}", json={"model": MODEL, "max_tokens": 2, "temperature": 0, **body})
    if response.status_code != 200 or body.get("stream"):
        return response.status_code, []
    answer = response.json()
    return 200, [answer["prompt_logprobs"]] if endpoint == "chat/completions" else [
        c["prompt_logprobs"] for c in answer["choices"]]


def test_prompt_logprobs_answer_as_vllms_own_server(http, vllm_http):
    """Per prompt token, its log p with its alternatives' and their ranks in vLLM's shape, None for
    the first token: on completions (asked for, or an echo's), chat, and refused as vLLM refuses it;
    and the same from a power sampler."""
    statuses = []
    for name, (endpoint, body) in PROMPT_LOGPROBS.items():
        (status, ours), (their_status, theirs) = (prompt_logprobs(h, endpoint, body) for h in (http, vllm_http))
        assert status == their_status, name
        statuses.append(status)
        for mine, other in zip(ours, theirs, strict=True):
            assert len(mine) == len(other) and mine[0] is None and other[0] is None, name
            for position, their_position in zip(mine[1:], other[1:]):
                assert position.keys() == their_position.keys(), name
                for token, entry in position.items():
                    their = their_position[token]
                    assert entry["decoded_token"] == their["decoded_token"], name
                    assert entry["logprob"] == pytest.approx(their["logprob"], abs=1e-4), name
                    # A token deep in the ranking sits among near-equal logits, where float
                    # noise of 1e-4 can move it a few places.
                    assert entry["rank"] == pytest.approx(their["rank"], rel=0.01, abs=1), name
    assert statuses == [200] * 5 + [400] * 4
    asked = {"prompt": PROMPT, "prompt_logprobs": 2, "temperature": 1}
    [direct] = prompt_logprobs(http, "completions", asked)[1]
    [powered] = prompt_logprobs(http, "completions", asked | {"sampler": "power_mcmc", "mcmc_steps": 1})[1]
    assert [position and sorted(position) for position in direct] == [position and sorted(position)
                                                                      for position in powered]


def test_echo_without_generation_scores_the_prompt(http, live_server, tokenizer):
    """max_tokens 0 with echo and logprobs: the prompt's log p by a float32 Hugging Face forward
    pass, token by token, with the likeliest alternative's; nothing is generated."""
    import torch
    from transformers import AutoModelForCausalLM

    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "echo": True, "max_tokens": 0,
                                           "logprobs": 1}).json()
    [choice] = r["choices"]
    ids = tokenizer.encode(PROMPT)
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 0 and r["sampler_usage"]["engine_tokens_generated"] == 0
    model = AutoModelForCausalLM.from_pretrained(live_server.model_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [tokenizer.decode(t) for t in ids] and logprobs["token_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx([reference[i - 1, t].item() for i, t in enumerate(ids)
                                                            if i > 0], abs=2e-3)
    assert [max(top.values()) for top in logprobs["top_logprobs"][1:]] == pytest.approx(
        reference[:-1].max(dim=-1).values.tolist(), abs=2e-3)
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 0}),
                 400, "max_tokens")


def test_a_repeated_prompt_is_prefilled_once(client):
    """On CPU the server's KV blocks hold 32 tokens (vLLM's default is 128) and the prefix cache
    shares whole blocks: a prompt asked a second time is read from the cache but for its last
    partial block (vLLM always computes at least the last token), and `engine_tokens_prefilled`
    counts what was computed."""
    prompt = f"Request {uuid.uuid4().hex}: " + "count the words one two three four five " * 12

    def prefilled() -> tuple[int, int]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        return r.sampler_usage["engine_tokens_prefilled"], r.usage.prompt_tokens

    first, length = prefilled()
    second, _ = prefilled()
    assert length > 64 and first == length
    assert second == length - 32 * ((length - 1) // 32)


def test_tokenize_gives_the_prompt_the_endpoints_run(client, http):
    """The chat messages' token ids are those the chat endpoint runs; a prompt's, those the
    completions endpoint does; detokenize inverts; /ping answers as /health."""
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                          extra_body={"return_token_ids": True})
    assert http.post("/tokenize", json={"messages": messages}).json()["tokens"] == chat.prompt_token_ids
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, extra_body={"return_token_ids": True})
    tokenized = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokenized["tokens"] == completion.choices[0].prompt_token_ids and tokenized["count"] == len(tokenized["tokens"])
    assert http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json() == {"prompt": PROMPT}
    assert http.get("/ping").status_code == http.post("/ping").status_code == 200


def test_completion_logprob_is_the_base_models_log_p(client, http, live_server, tokenizer):
    """Of a sampled completion: the log p the completions endpoint reported for each token, and a
    float32 Hugging Face forward pass's; text completions are tokenized on their own."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.scoring import completion_token_logps

    choice = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=0, seed=3,
                                       extra_body={"return_token_ids": True}).choices[0]
    scored = http.post("/v1/completion_logprob", json={"model": MODEL, "prompt": choice.prompt_token_ids,
                                                       "completion": choice.token_ids}).json()
    assert scored["tokens"] == choice.token_ids and scored["prompt_tokens"] == len(choice.prompt_token_ids)
    assert scored["token_logprobs"] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-4)
    assert scored["logprob"] == pytest.approx(sum(scored["token_logprobs"]), abs=1e-9)
    base = AutoModelForCausalLM.from_pretrained(live_server.model_dir, dtype=torch.float32)
    assert scored["token_logprobs"] == pytest.approx(
        completion_token_logps(base, choice.prompt_token_ids, choice.token_ids), abs=2e-3)
    text = http.post("/v1/completion_logprob", json={"model": MODEL, "prompt": PROMPT, "completion": " Paris"}).json()
    assert text["tokens"] == tokenizer.encode(" Paris", add_special_tokens=False)
    assert text["prompt_tokens"] == len(tokenizer.encode(PROMPT))


@pytest.mark.parametrize("route, body, status, param", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400, None),
    ("/tokenize", {}, 400, None),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "continue_final_message": True}, 400, None),
    ("/tokenize", {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ("/detokenize", {"tokens": [10 ** 9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/v1/completion_logprob", {"model": MODEL, "prompt": "a", "completion": [10 ** 9]}, 400, "completion"),
    ("/v1/completion_logprob", {"model": MODEL, "prompt": "a", "completion": [0] * 2048}, 400, "completion"),
    ("/v1/completion_logprob", {"model": MODEL, "prompt": [], "completion": "a"}, 400, "prompt"),
    ("/v1/completion_logprob", {"model": "gpt-4", "prompt": "a", "completion": "b"}, 404, "model"),
])
def test_tokenizer_and_scoring_routes_refuse_bad_input(http, route, body, status, param):
    assert_error(http.post(route, json=body), status, param)
