"""Request and response models of the OpenAI API, with the vLLM extensions that its clients use.

Request models keep unknown fields (`model_extra`): the flat parameters of the chosen sampler,
validated by the sampler's own `Params` model, and fields of other APIs, which server/requests.py
refuses or ignores.
"""

import functools
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from samplers import DecodeParams, Scheduling


# The engine takes these as fixed-width integers.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_ALTERNATIVES = 20  # the most alternatives per token a client may ask for, as on vLLM's server
NonEmptyString = Annotated[str, StringConstraints(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="Send a last chunk with the usage of the request.")


class JsonSchemaFormat(BaseModel):
    name: str
    description: str | None = None
    json_schema: dict | None = Field(None, alias="schema", description="The JSON schema the output must satisfy.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON that satisfies a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError("type 'json_schema' needs json_schema with its schema")
        return self

    def constraint(self) -> dict | None:
        """As vLLM's structured_outputs, or None for free text."""
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            return {"json": self.json_schema.json_schema}
        return None


STRUCTURED_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint on the output, with its options."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_schema: dict | str | None = Field(None, alias="json", description="A JSON schema the output must satisfy.")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, description="The output is one of these strings.")
    grammar: str | None = Field(None, description="A context-free grammar (EBNF, as vLLM's backends read it).")
    json_object: bool | None = Field(None, description="Any JSON object.")
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> "StructuredOutputs":
        given = self.model_dump(by_alias=True, exclude_none=True)
        if sum(name in given for name in STRUCTURED_CONSTRAINTS) != 1:
            raise ValueError(f"give exactly one of {', '.join(STRUCTURED_CONSTRAINTS)}")
        return self


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="A served model name, optionally suffixed ':SAMPLER'.")
    sampler: str | None = Field(
        None, description="Sampler to draw with (default 'direct'); see GET /v1/samplers."
    )
    n: int = Field(1, ge=1, le=128, description="Completions to draw for each prompt.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 decodes greedily.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=INT32_MAX, description="vLLM extension; 0 or -1 disables top-k.")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description="Makes sampling reproducible.")
    stop: NonEmptyString | list[NonEmptyString] | None = Field(
        None, description="Strings that end a completion.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, description="Accepted for compatibility; not used.")
    # vLLM extensions
    # Far outside this range the engine's logits overflow and its log-probabilities become NaN.
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0,
                                      description="Above 1 discourages repeated tokens (0.01-100).")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    min_tokens: int = Field(0, ge=0, description="Tokens to generate before EOS or stop may end.")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end a completion.")
    return_token_ids: bool = Field(False, description="Return token ids beside the text.")
    # vLLM's constraints on what the engine draws, and its detokenization options: sampler `direct`
    # passes them to the engine; the power samplers refuse them (DIRECT_ONLY_FIELDS).
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens less likely than min_p times the likeliest.")
    logit_bias: dict[int, float] | None = Field(
        None, description="Token id -> bias added to its logit before sampling (vLLM clamps it to [-100, 100]).")
    allowed_token_ids: list[int] | None = Field(None, min_length=1, description="Draw only among these tokens.")
    bad_words: list[NonEmptyString] | None = Field(None, description="Words the output may not contain.")
    response_format: ResponseFormat | None = Field(
        None, description="OpenAI's: JSON output (json_object, or json_schema with a schema) instead of free text.")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's: output that follows a JSON schema, a regex, a choice of strings or a grammar.")
    include_stop_str_in_output: bool = Field(False, description="Keep the stop string that ended the output.")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text.")
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="Cut each prompt to this many tokens (-1: the context less one token).")
    truncation_side: Literal["left", "right"] | None = Field(
        None, description="Which end truncate_prompt_tokens cuts from (default: the tokenizer's; 'left' "
        "keeps the prompt's end).")
    prompt_logprobs: int | None = Field(
        None, ge=-1, description="Report each prompt token's log p and this many alternatives (-1: the whole "
        "vocabulary), in the response (not streamed).")
    # Bounded as the engine's inter-process messages carry it (64 bits).
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX, description="The engine serves lower values first "
                          "when the server runs with --scheduling-policy priority; else ignored, as by vLLM.")
    # Extension
    request_timeout: float | None = Field(
        None, gt=0, description="Seconds the request may take, queueing included (default and "
        "maximum: the server's --request-timeout and --max-request-timeout); past it, 504.")

    @model_validator(mode="after")
    def _one_output_constraint(self) -> "SamplingFields":
        if self.structured_outputs and self.response_format and self.response_format.constraint():
            raise ValueError("response_format and structured_outputs both constrain the output: give one")
        return self

    def output_constraint(self) -> dict | None:
        """vLLM's structured_outputs, as keyword arguments of its StructuredOutputsParams."""
        if self.response_format and self.response_format.constraint():
            return self.response_format.constraint()
        return self.structured_outputs.model_dump(by_alias=True, exclude_none=True) if self.structured_outputs else None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def decode_params(self, max_tokens: int, logprobs: int | None, adapter: str | None = None) -> DecodeParams:
        return DecodeParams(
            max_tokens=max_tokens,
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0 if self.top_k == -1 else self.top_k,
            seed=self.seed,
            stop=self.stop_strings(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logprobs=logprobs,
            adapter=adapter,
            min_p=self.min_p,
            logit_bias=self.logit_bias,
            allowed_token_ids=None if self.allowed_token_ids is None else tuple(self.allowed_token_ids),
            bad_words=tuple(self.bad_words or ()),
            structured_outputs=self.output_constraint(),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            scheduling=Scheduling(priority=self.priority),
        )


# The fields that only sampler `direct` passes on to the engine. A power sampler would not honour
# them: the constraints would change its target p^alpha, and its text is detokenized its own way
# (special tokens left out). include_stop_str_in_output is not among them: power samplers take no
# stop strings, so it cannot change what they return.
DIRECT_ONLY_FIELDS = ("min_p", "logit_bias", "allowed_token_ids", "bad_words", "response_format",
                      "structured_outputs", "skip_special_tokens", "spaces_between_special_tokens")


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids or a list of such lists."
    )
    max_tokens: int | None = Field(16, ge=0, description="Tokens to generate at most per choice; 0 (with echo) "
                                   "generates none: the prompt is only scored.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_ALTERNATIVES, description="Report the log p of each token and this many alternatives."
    )
    echo: bool = Field(False, description="Begin each choice's text, and its logprobs, with the prompt's.")
    add_special_tokens: bool = Field(True, description="Add the tokenizer's special tokens to a text prompt.")

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [prompt]
        return list(prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message; its other fields (a tool message's `tool_call_id`, an assistant's `tool_calls`,
    `name`) reach the chat template as they are."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string: text parts joined by newlines, as vLLM's server joins them for a
        chat template that takes strings."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatTemplateFields(BaseModel):
    """How the chat template writes messages out (chat completions and /tokenize), as on vLLM's server."""

    add_generation_prompt: bool = Field(True, description="End with the opening of the assistant's turn.")
    continue_final_message: bool = Field(False, description="Leave the last message open, to be continued "
                                         "(needs add_generation_prompt false).")
    chat_template: str | None = Field(None, description="A Jinja chat template instead of the model's (refused "
                                      "unless the server runs with --trust-request-chat-template).")
    chat_template_kwargs: dict | None = Field(None, description="More variables for the chat template.")
    tools: list[dict] | None = Field(None, description="OpenAI's function tools, given to the chat template.")

    @model_validator(mode="after")
    def _open_or_closed(self) -> "ChatTemplateFields":
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt set to false")
        return self


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI; use max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
    logprobs: bool = Field(False, description="Report the log p of each output token.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_ALTERNATIVES,
                                     description="Alternatives per token (needs logprobs).")
    add_special_tokens: bool = Field(False, description="Add the tokenizer's special tokens to the templated "
                                     "prompt too (the template writes its own).")
    tool_choice: str | dict | None = Field(None, description="Only 'none': this server parses no tool calls.")
    echo: bool = Field(False, description="Begin the reply with the last message's content when it has the "
                       "reply's role (a continued message).")

    def reply_role(self) -> str:
        """The role the reply continues, as vLLM's server has it: the assistant's after a generation
        prompt, else the last message's."""
        return "assistant" if self.add_generation_prompt else self.messages[-1].role

    def echoed(self) -> str:
        """With `echo`, what the reply begins with: the last message's content, if it has the reply's role."""
        last = self.messages[-1]
        return last.text() if self.echo and last.role == self.reply_role() else ""


class TokenizeRequest(ChatTemplateFields):
    """POST /tokenize, as vLLM's server has it: a `prompt`, or chat `messages` through the chat template."""

    model: str | None = Field(None, description="A served model name (default: the base model).")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(
        None, description="Add the tokenizer's special tokens (default: for a prompt yes; for messages no, "
        "since the chat template writes its own).")
    return_token_strs: bool = Field(False, description="Return each token's string beside its id.")

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class CompletionLogprobRequest(BaseModel):
    """POST /v1/completion_logprob: how likely the base model finds a given completion."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="The served (base) model's name.")
    prompt: NonEmptyString | Annotated[list[int], Field(min_length=1)] = Field(
        description="Text (tokenized as /v1/completions does) or token ids.")
    completion: NonEmptyString | Annotated[list[int], Field(min_length=1)] = Field(
        description="Text (tokenized on its own, without special tokens: pass token ids where the "
        "tokenization must be that of a sampled completion) or token ids.")


class DetokenizeRequest(BaseModel):
    model: str | None = Field(None, description="A served model name (default: the base model).")
    tokens: list[int]


# Fields of vLLM's API that change nothing a response of this server carries, whatever their value:
# scheduling and bookkeeping, distributed KV transfer, tool and multimodal options without tools or
# images, expert-routing diagnostics.
VLLM_FIELDS_SAFE_TO_IGNORE = frozenset({
    "request_id", "session_id", "cache_salt", "kv_transfer_params", "ec_transfer_params",
    "stream_interval", "parallel_tool_calls", "include_reasoning", "media_io_kwargs", "mm_processor_kwargs",
    "return_mm_kwargs", "routed_experts_prompt_start",
})


@functools.cache
def vllm_field_defaults(request: type[SamplingFields]) -> dict[str, object]:
    """The fields of vLLM's own request model for this endpoint that this one lacks, with vLLM's
    defaults: the API of the pinned vLLM, read from its source rather than copied."""
    if issubclass(request, ChatCompletionRequest):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmRequest
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmRequest
    return {name: field.get_default(call_default_factory=True)
            for name, field in VllmRequest.model_fields.items() if name not in request.model_fields}


# Responses


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class CompletionLogprobResponse(BaseModel):
    object: Literal["completion_logprob"] = "completion_logprob"
    model: str
    logprob: float = Field(description="log p(completion | prompt) under the base model, temperature 1: "
                           "the self-reward that power samplers raise.")
    tokens: list[int] = Field(description="The completion's token ids.")
    token_logprobs: list[float] = Field(description="log p of each completion token given all before it.")
    prompt_tokens: int


class VersionResponse(BaseModel):
    version: str = Field(description="The vLLM version serving the model, as vLLM's own /version reports it.")
    server_version: str = Field(description="This server's version.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SamplerUsage(BaseModel):
    """What the sampler spent, beside the usual usage (extension)."""

    name: str
    engine_tokens_generated: int
    engine_tokens_prefilled: int
    engine_tokens_scored: int
    events: dict[str, int] = {}
    details: dict[str, float | list[float]] = {}
    proposal: str | None = None  # power_mcmc: how its proposal densities were obtained


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    # None only for an echoed prompt's first token, which nothing comes before.
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = Field(None, description="Its rank in the vocabulary by log p (1: the likeliest).")
    decoded_token: str


# Per prompt token: its id (and its alternatives' ids) -> log p; None for the first token, which
# nothing comes before. vLLM's shape.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ResponseFields(BaseModel):
    """What every completion response and chunk starts with."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionResponse(ResponseFields):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
    sampler_usage: SamplerUsage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChoiceFields(BaseModel):
    index: int
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatChoice(ChatChoiceFields):
    message: AssistantMessage


class ChatStreamChoice(ChatChoiceFields):
    delta: AssistantMessage


class ChatCompletionResponse(ResponseFields):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    sampler_usage: SamplerUsage
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ChatCompletionChunk(ResponseFields):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    sampler_usage: SamplerUsage | None = None
    prompt_token_ids: list[int] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "power-sampling-server"
    root: str
    parent: str | None = Field(None, description="For a distilled model: the model it adapts.")
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
