"""Request preparation: which sampler and model a request names, and every check a request must
pass, against the model, the sampler and the server's limits, before it may run."""

from typing import NamedTuple

from pydantic import BaseModel, ValidationError

from samplers import REGISTRY, DecodeParams, LanguageModel, Sampler
from server import protocol as p
from server.errors import APIError, bad_request
from server.state import EngineState

DEFAULT_SAMPLER = "direct"


def resolve_sampler(state: EngineState, body: p.SamplingFields) -> tuple[Sampler, BaseModel, str | None]:
    """Pick the sampler named by `sampler` or a ':SAMPLER' model suffix, validate its fields, and
    say which distilled model's adapter to decode with, if the request names one."""
    names = [state.served_name, *state.adapters]
    base, suffix = body.model, None
    if base not in names:
        base, _, suffix = body.model.rpartition(":")
        if base not in names:
            raise APIError(404, f"The model '{body.model}' does not exist; "
                           f"this server serves {', '.join(map(repr, names))}.", param="model")
    adapter = base if base in state.adapters else None
    if suffix and body.sampler and suffix != body.sampler:
        raise bad_request(f"The model suffix ':{suffix}' and sampler '{body.sampler}' disagree.",
                          param="sampler")
    name = suffix or body.sampler or DEFAULT_SAMPLER
    if adapter and name != DEFAULT_SAMPLER:
        raise bad_request(f"'{adapter}' is a distilled model, which decodes directly: its sampler can "
                          f"only be '{DEFAULT_SAMPLER}'.", param="sampler")
    sampler = REGISTRY.get(name)
    if sampler is None:
        raise bad_request(f"Unknown sampler '{name}'. Valid samplers: {', '.join(sorted(REGISTRY))}.",
                          param="sampler")
    try:
        params = sampler.Params.model_validate(body.model_extra or {})
    except ValidationError as exc:
        raise _sampler_param_error(sampler, exc) from None
    return sampler, params, adapter


def _sampler_param_error(sampler: Sampler, exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        own = ", ".join(sampler.Params.model_fields) or "none"
        return bad_request(
            f"Unknown parameter '{param}' for sampler '{sampler.name}'. Its own parameters: {own}; "
            f"other samplers: {', '.join(sorted(REGISTRY))} (GET /v1/samplers lists theirs).",
            param=param,
        )
    return bad_request(f"{param}: {first['msg']}", param=param)


class Checked(NamedTuple):
    """A request that passed every check: its model, its prompts' token ids, what to decode, and
    its deadline in seconds."""

    model: LanguageModel
    prompts: list[list[int]]
    decode: DecodeParams
    timeout: float


def check_request(state: EngineState, body: p.SamplingFields, sampler: Sampler, params: BaseModel,
                  adapter: str | None, prompts: list[list[int]], max_tokens: int | None,
                  logprobs: int | None) -> Checked:
    """The request checked against the server's limits, the model (its vocabulary and context),
    and the sampler; its max_tokens, when absent, is what the context leaves. Raises the first
    check's error: 400, or 503 while the engine cannot take requests."""
    limits = state.limits
    timeout = body.request_timeout or limits.request_timeout
    if timeout > limits.max_request_timeout:
        raise bad_request(f"request_timeout may be at most {limits.max_request_timeout:g} s "
                          "on this server.", param="request_timeout")
    model = state.ready_model()
    if not prompts:
        raise bad_request("The prompt list is empty.", param="prompt")
    prompts = [_checked_prompt(model, ids) for ids in prompts]
    longest = max(len(ids) for ids in prompts)
    room = model.max_model_len - longest
    if room < 1:
        raise bad_request(f"The prompt ({longest} tokens) leaves no room for output in the "
                          f"model's context of {model.max_model_len} tokens.", param="prompt")
    if max_tokens is None:
        max_tokens = room
    if max_tokens > room:
        raise bad_request(
            f"The prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context of {model.max_model_len} tokens.", param="max_tokens")
    decode = body.decode_params(max_tokens, logprobs, adapter)
    _check_decode(model, decode)
    sampler.check(model, decode, params)
    cost = sum(sampler.max_engine_tokens(len(ids), decode, params) for ids in prompts)
    if cost > limits.max_request_cost:
        raise bad_request(
            f"This request could cost up to {cost} engine tokens with sampler "
            f"'{sampler.name}', over this server's cap of {limits.max_request_cost} per "
            "request: lower max_tokens, n, the number of prompts or the sampler's parameters.")
    return Checked(model, prompts, decode, timeout)


def _check_decode(model, decode: DecodeParams) -> None:
    """Combinations of fields that no sampler can serve (the engine would refuse them)."""
    if decode.min_tokens > decode.max_tokens:
        raise bad_request(f"min_tokens ({decode.min_tokens}) exceeds max_tokens ({decode.max_tokens}).",
                          param="min_tokens")
    _check_in_vocabulary(model, decode.stop_token_ids, "stop_token_ids", param="stop_token_ids")
    if decode.temperature == 0 and decode.n > 1:
        raise bad_request("Greedy decoding (temperature 0) gives one completion: n must be 1.", param="n")


def _checked_prompt(model, ids: list[int]) -> list[int]:
    if not ids:
        raise bad_request("The prompt is empty.", param="prompt")
    _check_in_vocabulary(model, ids, "Prompt token ids", param="prompt")
    return ids


def _check_in_vocabulary(model, token_ids, what: str, param: str) -> None:
    if any(not 0 <= t < model.vocab_size for t in token_ids):
        raise bad_request(f"{what} must lie in [0, {model.vocab_size}).", param=param)

