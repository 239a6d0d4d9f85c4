"""Endpoint-specific halves of serving: how each endpoint builds its prompts and shapes its output."""

import dataclasses
import inspect
import json
import math

from samplers import ChoiceDelta, Spend, TokenLogprob
from server import protocol as p
from server.errors import bad_request
from server.requests import DEFAULT_SAMPLER, check_in_vocabulary, check_model_name
from server.serving import Run
from server.state import EngineState
from server.transport import Format


def completion_run(state: EngineState, body: p.CompletionRequest) -> Run:
    model = state.ready_model()
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens 0 generates nothing: it is for scoring a prompt, with echo and logprobs.",
                          param="max_tokens")
    prompts = [model.tokenizer.encode(x, add_special_tokens=body.add_special_tokens) if isinstance(x, str) else x
               for x in body.prompts()]
    return Run(state, body, prompts, body.max_tokens, body.logprobs, p.new_id("cmpl"),
               prompt_logprobs=_prompt_alternatives(model, body, body.logprobs if body.echo else None))


def chat_run(state: EngineState, body: p.ChatCompletionRequest) -> Run:
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true.", param="top_logprobs")
    _check_tool_choice(body)
    prompt = chat_prompt(state, body.messages, body, body.add_special_tokens)
    max_tokens = body.max_completion_tokens or body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return Run(state, body, [prompt], max_tokens, logprobs, p.new_id("chatcmpl"),
               prompt_logprobs=_prompt_alternatives(state.ready_model(), body, None))


def _prompt_alternatives(model, body: p.SamplingFields, echoed: int | None) -> int | None:
    """How many alternatives each prompt token is scored with (None: it is not scored): what
    prompt_logprobs asks for, else what an echo's logprobs show (`echoed`), as on vLLM's server.
    A stream has no place for prompt_logprobs: there only 0 is accepted, as by vLLM's server."""
    asked = body.prompt_logprobs
    if asked is not None:
        if body.stream and asked != 0:
            raise bad_request("prompt_logprobs are not returned in a stream.", param="prompt_logprobs")
        if asked == -1:
            asked = model.vocab_size
        if asked > p.MAX_ALTERNATIVES:
            raise bad_request(f"prompt_logprobs asks for {asked} alternatives per token; this server reports at "
                              f"most {p.MAX_ALTERNATIVES}.", param="prompt_logprobs")
    alternatives = echoed if asked is None else asked
    if alternatives is not None and not model.can_score:
        raise bad_request("This server cannot score prompts: vLLM's CPU engine cannot compute prompt "
                          "log-probabilities while it serves LoRA adapters (--distilled).",
                          param="echo" if asked is None else "prompt_logprobs")
    return alternatives


def _check_tool_choice(body: p.ChatCompletionRequest) -> None:
    """Tools reach the chat template; calls to them are not parsed from the output (no model served
    here has a tool-call parser), so only tool_choice 'none' can be honoured."""
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none")
    if choice == "none":
        return
    if not body.tools:
        raise bad_request("tool_choice needs tools.", param="tool_choice")
    raise bad_request(f"tool_choice {json.dumps(choice)} needs a tool-call parser for the model, which this "
                      "server does not have: set tool_choice to 'none' to give the tools to the chat template "
                      "only.", param="tool_choice")


def chat_prompt(state: EngineState, messages: list[p.ChatMessage], template: p.ChatTemplateFields,
                add_special_tokens: bool = False) -> list[int]:
    """The token ids of `messages` written out by the chat template: the model's, or the request's
    own where the server trusts it."""
    variables = dict(template.chat_template_kwargs or {})
    from_variables = variables.pop("chat_template", None)
    own = template.chat_template or from_variables
    if own is not None and not state.trust_request_chat_template:
        raise bad_request("This server runs its model's chat template only; a request's own needs the server "
                          "started with --trust-request-chat-template.", param="chat_template")
    # Variables for the template only: apply_chat_template's own parameters (tokenize, return_dict, ...)
    # would change what it returns.
    from transformers import PreTrainedTokenizerBase

    own_parameters = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) & set(variables)
    if own_parameters:
        raise bad_request(f"chat_template_kwargs cannot set {', '.join(sorted(own_parameters))}.",
                          param="chat_template_kwargs")
    tokenizer = state.ready_model().tokenizer
    try:
        text = tokenizer.apply_chat_template(
            [{**(m.model_extra or {}), "role": m.role, "content": m.text()} for m in messages], tokenize=False,
            add_generation_prompt=template.add_generation_prompt,
            continue_final_message=template.continue_final_message, chat_template=own, tools=template.tools,
            **variables)
    except Exception as exc:  # the template's own checks, e.g. roles it does not allow
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from None
    # The template already wrote the special tokens it wants, unless asked for more.
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def tokenize(state: EngineState, body: p.TokenizeRequest) -> p.TokenizeResponse:
    model = state.ready_model()
    check_model_name(state, body.model)
    if body.prompt is not None:
        ids = model.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    else:
        ids = chat_prompt(state, body.messages, body, bool(body.add_special_tokens))
    strings = model.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return p.TokenizeResponse(count=len(ids), max_model_len=model.max_model_len, tokens=ids, token_strs=strings)


async def completion_logprob(state: EngineState, body: p.CompletionLogprobRequest) -> p.CompletionLogprobResponse:
    """The base model's log p of each completion token, from one prefill of prompt and completion,
    run in a slot of `direct`'s admission gate."""
    model = state.ready_model()
    if body.model in state.adapters:
        raise bad_request(f"'{body.model}' is a distilled model; this route scores with the base model "
                          f"'{state.served_name}' only.", param="model")
    check_model_name(state, body.model)
    if not model.can_score:
        raise bad_request("This server cannot score: vLLM's CPU engine cannot compute prompt log-probabilities "
                          "while it serves LoRA adapters (--distilled).", param="model")
    tokenizer = model.tokenizer
    prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
    completion = (tokenizer.encode(body.completion, add_special_tokens=False) if isinstance(body.completion, str)
                  else body.completion)
    check_in_vocabulary(model, prompt, "Prompt token ids", param="prompt")
    check_in_vocabulary(model, completion, "Completion token ids", param="completion")
    if len(prompt) + len(completion) > model.max_model_len:
        raise bad_request(f"Prompt and completion ({len(prompt) + len(completion)} tokens) exceed the model's "
                          f"context of {model.max_model_len} tokens.", param="completion")
    ticket = state.gates[DEFAULT_SAMPLER].admit()
    try:
        await ticket.wait()
        scored = await model.score(prompt + completion, len(prompt), p.new_id("score"), Spend())
    finally:
        ticket.release()
    logprobs = [t.logprob for t in scored]
    return p.CompletionLogprobResponse(model=body.model, logprob=math.fsum(logprobs), tokens=completion,
                                       token_logprobs=logprobs, prompt_tokens=len(prompt))


def detokenize(state: EngineState, body: p.DetokenizeRequest) -> p.DetokenizeResponse:
    model = state.ready_model()
    check_model_name(state, body.model)
    check_in_vocabulary(model, body.tokens, "Token ids", param="tokens")
    return p.DetokenizeResponse(prompt=model.tokenizer.decode(body.tokens))


# JSON has no -infinity: tokens that cannot be drawn (cut by top-k or top-p) are reported at this
# floor, as vLLM's own server does.
LOGPROB_FLOOR = -9999.0


def _reported(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _completion_logprobs(tokens: list[TokenLogprob], offset: int, unscored: str | None = None) -> p.CompletionLogprobs:
    """Logprobs of `tokens`, whose text starts `offset` characters into the choice's text, after
    the token `unscored` has, if given: an echoed prompt's first token, which has no log p."""
    entries = [] if unscored is None else [(unscored, None, None)]
    # The drawn token first, then the most likely ones: what vLLM's server (and OpenAI's completions
    # API) report, so `logprobs: k` may give k + 1 entries.
    entries += [(t.token, _reported(t.logprob), {t.token: _reported(t.logprob)} |
                 {a.token: _reported(a.logprob) for a in t.top}) for t in tokens]
    offsets = []
    for text, _, _ in entries:
        offsets.append(offset)
        offset += len(text)
    return p.CompletionLogprobs(tokens=[e[0] for e in entries], token_logprobs=[e[1] for e in entries],
                                top_logprobs=[e[2] for e in entries], text_offset=offsets)


def _joined(first: p.CompletionLogprobs | None, second: p.CompletionLogprobs | None) -> p.CompletionLogprobs | None:
    if first is None or second is None:
        return first or second
    return p.CompletionLogprobs(**{name: getattr(first, name) + getattr(second, name)
                                   for name in p.CompletionLogprobs.model_fields})


class CompletionFormat(Format):
    """Completion choices; with `echo`, each choice's first chunk (or its whole text) begins with
    its prompt's text and, where logprobs are asked for, the prompt tokens' log p."""

    def __init__(self, body: p.CompletionRequest):
        self.token_ids = body.return_token_ids
        self.prompts = body.prompts() if body.echo else None
        self.echoed_alternatives = body.logprobs
        self.truncated = body.truncate_prompt_tokens is not None  # then a string prompt may have been cut
        self.echoes: dict[int, tuple[str, p.CompletionLogprobs | None]] = {}  # per prompt
        self.started: set[int] = set()  # the choices whose first chunk is sent

    def _echo(self, run: Run, index: int) -> tuple[str, p.CompletionLogprobs | None]:
        """What choice `index` begins with: its prompt's text, and its tokens' logprobs if they were
        scored (a string prompt as given, token ids or a cut prompt decoded)."""
        if self.prompts is None:
            return "", None
        i = index // run.decode.n
        if i not in self.echoes:
            tokenizer, ids = run.model.tokenizer, run.prompts[i]
            text = self.prompts[i] if isinstance(self.prompts[i], str) and not self.truncated else tokenizer.decode(ids)
            logprobs = None
            if run.prompt_logprobs is not None and self.echoed_alternatives is not None:
                named = [dataclasses.replace(t, token=tokenizer.decode(t.token_id), top=tuple(
                    dataclasses.replace(a, token=tokenizer.decode(a.token_id))
                    for a in t.top[:self.echoed_alternatives])) for t in run.prompt_logprobs[i]]
                logprobs = _completion_logprobs(named, 0, unscored=tokenizer.decode(ids[:1]))
            self.echoes[i] = text, logprobs
        return self.echoes[i]

    def chunks(self, run: Run, delta: ChoiceDelta) -> list[p.CompletionResponse]:
        choice = run.choices[delta.index]
        first = delta.index not in self.started
        self.started.add(delta.index)
        echo_text, echo_logprobs = self._echo(run, delta.index)
        logprobs = None
        if delta.logprobs is not None:
            logprobs = _completion_logprobs(delta.logprobs, len(echo_text) + len(choice.text) - len(delta.text))
        out = p.CompletionChoice(
            index=delta.index, text=echo_text + delta.text if first else delta.text,
            logprobs=_joined(echo_logprobs, logprobs) if first else logprobs,
            finish_reason=delta.finish_reason, stop_reason=delta.stop_reason,
            token_ids=delta.token_ids if self.token_ids else None,
            prompt_token_ids=choice.prompt_token_ids if self.token_ids and first else None,
        )
        return [p.CompletionResponse(id=run.request_id, model=run.model_name, choices=[out])]

    def usage_chunk(self, run: Run) -> p.CompletionResponse:
        return p.CompletionResponse(id=run.request_id, model=run.model_name, choices=[],
                                    usage=run.usage(), sampler_usage=run.sampler_usage())

    def final(self, run: Run) -> p.CompletionResponse:
        choices = []
        # Per prompt, once: its n choices carry the same.
        scored_prompts = [prompt_logprobs(run, i) for i in range(len(run.prompts))]
        for c in run.choices:
            echo_text, echo_logprobs = self._echo(run, c.index)
            logprobs = None if c.logprobs is None else _completion_logprobs(c.logprobs, len(echo_text))
            choices.append(p.CompletionChoice(
                index=c.index, text=echo_text + c.text, logprobs=_joined(echo_logprobs, logprobs),
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                token_ids=c.token_ids if self.token_ids else None,
                prompt_token_ids=c.prompt_token_ids if self.token_ids else None,
                prompt_logprobs=scored_prompts[c.index // run.decode.n],
            ))
        return p.CompletionResponse(id=run.request_id, model=run.model_name, choices=choices,
                                    usage=run.usage(), sampler_usage=run.sampler_usage())


def prompt_logprobs(run: Run, i: int) -> p.PromptLogprobs | None:
    """Prompt `i`'s scored tokens in vLLM's shape: per token, it and its alternatives by id."""
    if run.prompt_logprobs is None:
        return None
    decode = run.model.tokenizer.decode

    def entry(t: TokenLogprob) -> tuple[str, p.PromptLogprob]:
        return str(t.token_id), p.PromptLogprob(logprob=_reported(t.logprob), rank=t.rank,
                                                 decoded_token=decode(t.token_id))

    return [None, *(dict([entry(t), *map(entry, t.top)]) for t in run.prompt_logprobs[i])]


def _chat_logprobs(tokens: list[TokenLogprob]) -> p.ChatLogprobs:
    def entry(t: TokenLogprob) -> dict:
        return {"token": t.token, "logprob": _reported(t.logprob), "bytes": list(t.token.encode())}

    return p.ChatLogprobs(content=[
        p.ChatTokenLogprob(**entry(t), top_logprobs=[p.TopLogprob(**entry(a)) for a in t.top])
        for t in tokens
    ])


class ChatFormat(Format):
    """Chat choices; with `echo`, the reply begins with the continued message's content (in a stream,
    a chunk of its own after the role's)."""

    def __init__(self, body: p.ChatCompletionRequest):
        self.token_ids = body.return_token_ids
        self.echo = body.echoed()

    def _chunk(self, run: Run, choices: list[p.ChatStreamChoice], **extra) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(id=run.request_id, model=run.model_name, choices=choices, **extra)

    def opening(self, run: Run) -> list[p.ChatCompletionChunk]:
        roles = [p.ChatStreamChoice(index=c.index, delta=p.AssistantMessage(role="assistant", content=""))
                 for c in run.choices]
        prompt_ids = run.prompts[0] if self.token_ids else None
        echoes = [self._chunk(run, [p.ChatStreamChoice(index=c.index, delta=p.AssistantMessage(content=self.echo))])
                  for c in run.choices] if self.echo else []
        return [self._chunk(run, roles, prompt_token_ids=prompt_ids), *echoes]

    def chunks(self, run: Run, delta: ChoiceDelta) -> list[p.ChatCompletionChunk]:
        out = p.ChatStreamChoice(
            index=delta.index, delta=p.AssistantMessage(content=delta.text),
            logprobs=None if delta.logprobs is None else _chat_logprobs(delta.logprobs),
            finish_reason=delta.finish_reason, stop_reason=delta.stop_reason,
            token_ids=delta.token_ids if self.token_ids else None,
        )
        return [self._chunk(run, [out])]

    def usage_chunk(self, run: Run) -> p.ChatCompletionChunk:
        return self._chunk(run, [], usage=run.usage(), sampler_usage=run.sampler_usage())

    def final(self, run: Run) -> p.ChatCompletionResponse:
        choices = [
            p.ChatChoice(
                index=c.index, message=p.AssistantMessage(role="assistant", content=self.echo + c.text),
                logprobs=None if c.logprobs is None else _chat_logprobs(c.logprobs),
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                token_ids=c.token_ids if self.token_ids else None,
            )
            for c in run.choices
        ]
        return p.ChatCompletionResponse(
            id=run.request_id, model=run.model_name, choices=choices, usage=run.usage(),
            sampler_usage=run.sampler_usage(),
            prompt_token_ids=run.prompts[0] if self.token_ids else None,
            prompt_logprobs=prompt_logprobs(run, 0),
        )
