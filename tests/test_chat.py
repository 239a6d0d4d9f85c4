"""/v1/chat/completions: the model's chat template, streaming and logprobs."""

from tests.conftest import MODEL

MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is the capital of France?"}]


def test_prompt_is_the_chat_template(client, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=8,
                                       extra_body={"return_token_ids": True})
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert r.prompt_token_ids == tokenizer.encode(expected, add_special_tokens=False)
    assert r.usage.prompt_tokens == len(r.prompt_token_ids)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(r.choices[0].token_ids) <= 8


def test_text_parts_are_the_content_joined_by_newlines(client):
    """As vLLM's server joins them for a template that takes strings (its /tokenize agrees:
    tests/test_completions.py)."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"},
                                          {"type": "text", "text": "Answer in one word."}]}]
    plain = [{"role": "user", "content": "What is the capital of France?\nAnswer in one word."}]
    a, b = (client.chat.completions.create(model=MODEL, messages=m, max_tokens=8, temperature=0,
                                           extra_body={"return_token_ids": True}) for m in (parts, plain))
    assert a.prompt_token_ids == b.prompt_token_ids
    assert a.choices[0].message.content == b.choices[0].message.content


def test_greedy_chat_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                 **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=2,
                                       logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    for choice in r.choices:
        content = choice.logprobs.content
        assert len(content) == 6
        for entry in content:
            assert entry.logprob <= 0
            assert len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert bytes(entry.bytes).decode() == entry.token
    no_logprobs = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert no_logprobs.choices[0].logprobs is None
