"""Request preparation: which sampler and model a request names, and every check a request must
pass, against the model, the sampler and the server's limits, before it may run."""

import difflib
import logging
from typing import NamedTuple

from pydantic import BaseModel, ValidationError

from samplers import REGISTRY, DecodeParams, LanguageModel, Sampler
from server import protocol as p
from server.errors import APIError, bad_request
from server.state import EngineState

logger = logging.getLogger(__name__)

DEFAULT_SAMPLER = "direct"
SAMPLER_PARAMETERS = sorted({name for sampler in REGISTRY.values() for name in sampler.Params.model_fields})
# How alike (difflib's ratio) a field's name and a sampler parameter's must be for the field to be
# taken as a misspelling: 'power_alhpa' and 'power_alpha' are 0.91 alike, 'particle' and
# 'particles' 0.94. No field of vLLM's API is that close to a parameter, or the end of one
# (tests/test_sampler_selection.py), so none is refused as a misspelling.
CLOSE = 0.8
IGNORED_FIELDS_HEADER = "x-ignored-fields"
# The ignored fields logged so far, up to a bound: a client sending ever new names must not grow it forever.
_reported: set[str] = set()
REPORTED_AT_MOST = 1000


class Resolved(NamedTuple):
    sampler: Sampler
    params: BaseModel  # the sampler's parameters, validated
    adapter: str | None  # the distilled model's name, if the request names one
    ignored: list[str]  # the request's fields that are ignored


def check_model_name(state: EngineState, name: str | None) -> None:
    """404 unless `name` is None or a served model's name."""
    if name is not None and name not in state.served_names():
        raise _no_such_model(state, name)


def _no_such_model(state: EngineState, name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; this server serves "
                    f"{', '.join(map(repr, state.served_names()))}.", param="model")


def resolve_sampler(state: EngineState, body: p.SamplingFields) -> Resolved:
    """Pick the sampler named by `sampler` or a ':SAMPLER' model suffix, validate its fields, and
    say which distilled model's adapter to decode with, if the request names one."""
    names = state.served_names()
    base, suffix = body.model, None
    if base not in names:
        base, _, suffix = body.model.rpartition(":")
        if base not in names:
            raise _no_such_model(state, body.model)
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
    sampler_fields, ignored = _sort_extra_fields(sampler, body)
    try:
        params = sampler.Params.model_validate(sampler_fields)
    except ValidationError as exc:
        raise _sampler_param_error(sampler, exc) from None
    return Resolved(sampler, params, adapter, ignored)


def _sort_extra_fields(sampler: Sampler, body: p.SamplingFields) -> tuple[dict, list[str]]:
    """The request's fields beyond the OpenAI ones it implements: those of the samplers' parameters,
    and the names of the fields that are ignored (docs/api.md, "Fields this server does not know").

    A parameter of another sampler (refused by the sampler's own model, with its parameters), or a
    name close to a sampler's parameter (a misspelling), is refused: ignoring it would silently
    decode otherwise than asked. So is a field of vLLM's API, set to other than vLLM's default, that
    would change what vLLM's server returns and that this server does not implement. Other fields
    are ignored, as vLLM's server ignores those it does not know.
    """
    extra = body.model_extra or {}
    sampler_fields = {name: value for name, value in extra.items() if name in SAMPLER_PARAMETERS}
    vllm_defaults = p.vllm_field_defaults(type(body))
    ignored = []
    for name, value in extra.items():
        if name in sampler_fields:
            continue
        meant = _meant(name)
        if meant:
            raise bad_request(f"Unknown parameter '{name}'; did you mean '{meant}'? Sampler "
                              f"'{sampler.name}' takes {', '.join(sampler.Params.model_fields) or 'none'}.",
                              param=name)
        if name in vllm_defaults and name not in p.VLLM_FIELDS_SAFE_TO_IGNORE and value not in (
                None, vllm_defaults[name]):
            raise bad_request(f"'{name}' is a field of vLLM's API that this server does not implement; "
                              "leave it out or set it to its default.", param=name)
        if name not in _reported and len(_reported) < REPORTED_AT_MOST:
            _reported.add(name)
            logger.warning("Ignoring the request field %r, which this server does not use (logged once "
                           "per field name; responses name them in %s).", name, IGNORED_FIELDS_HEADER)
        ignored.append(name)
    return sampler_fields, ignored


def _meant(name: str) -> str | None:
    """The sampler parameter that the field `name` probably misspells ('power_alhpa') or shortens
    ('alpha' for power_alpha), if any."""
    close = difflib.get_close_matches(name, SAMPLER_PARAMETERS, n=1, cutoff=CLOSE)
    return close[0] if close else next((param for param in SAMPLER_PARAMETERS if param.endswith("_" + name)), None)


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
                  logprobs: int | None, scores_prompts: bool = False) -> Checked:
    """The request checked against the server's limits, the model (its vocabulary and context),
    and the sampler; its max_tokens, when absent, is what the context leaves; `scores_prompts`:
    the prompts are scored too (an echo's logprobs), at a prefill each. Raises the first check's
    error: 400, or 503 while the engine cannot take requests."""
    limits = state.limits
    timeout = body.request_timeout or limits.request_timeout
    if timeout > limits.max_request_timeout:
        raise bad_request(f"request_timeout may be at most {limits.max_request_timeout:g} s "
                          "on this server.", param="request_timeout")
    model = state.ready_model()
    if not prompts:
        raise bad_request("The prompt list is empty.", param="prompt")
    prompts = [_checked_prompt(model, _truncated(model, body, ids)) for ids in prompts]
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
    cost = sum(len(ids) for ids in prompts) if scores_prompts else 0
    decode = body.decode_params(max_tokens, logprobs, adapter)
    if max_tokens > 0:  # else an echo that only scores the prompt: nothing is sampled
        if sampler.name != DEFAULT_SAMPLER:
            _refuse_direct_only_fields(body, sampler)
        _check_decode(model, decode)
        sampler.check(model, decode, params)
        cost += sum(sampler.max_engine_tokens(len(ids), decode, params) for ids in prompts)
    if cost > limits.max_request_cost:
        raise bad_request(
            f"This request could cost up to {cost} engine tokens with sampler "
            f"'{sampler.name}', over this server's cap of {limits.max_request_cost} per "
            "request: lower max_tokens, n, the number of prompts or the sampler's parameters.")
    return Checked(model, prompts, decode, timeout)


def _refuse_direct_only_fields(body: p.SamplingFields, sampler: Sampler) -> None:
    for name in p.DIRECT_ONLY_FIELDS:
        value = getattr(body, name)
        if name == "response_format" and value is not None and value.constraint() is None:
            continue  # {"type": "text"}: free text, as without the field
        if value != type(body).model_fields[name].default:
            raise bad_request(f"'{name}' is passed to the engine by sampler '{DEFAULT_SAMPLER}' only; sampler "
                              f"'{sampler.name}' would not honour it.", param=name)


def _check_decode(model, decode: DecodeParams) -> None:
    """Combinations of fields that no sampler can serve (the engine would refuse them)."""
    if decode.min_tokens > decode.max_tokens:
        raise bad_request(f"min_tokens ({decode.min_tokens}) exceeds max_tokens ({decode.max_tokens}).",
                          param="min_tokens")
    check_in_vocabulary(model, decode.stop_token_ids, "stop_token_ids", param="stop_token_ids")
    check_in_vocabulary(model, decode.logit_bias or (), "logit_bias's token ids", param="logit_bias")
    check_in_vocabulary(model, decode.allowed_token_ids or (), "allowed_token_ids", param="allowed_token_ids")
    if decode.temperature == 0 and decode.n > 1:
        raise bad_request("Greedy decoding (temperature 0) gives one completion: n must be 1.", param="n")


def _truncated(model, body: p.SamplingFields, ids: list[int]) -> list[int]:
    """The prompt cut to truncate_prompt_tokens, from the end truncation_side names, as vLLM's server cuts it."""
    keep = body.truncate_prompt_tokens
    if keep is None:
        return ids
    if keep > model.max_model_len:
        raise bad_request(f"truncate_prompt_tokens ({keep}) exceeds the model's context of {model.max_model_len} "
                          "tokens.", param="truncate_prompt_tokens")
    if keep == -1:
        keep = model.max_model_len - 1  # a token of the context left for the output
    if len(ids) <= keep:
        return ids
    side = body.truncation_side or model.tokenizer.truncation_side
    return ids[len(ids) - keep:] if side == "left" else ids[:keep]


def _checked_prompt(model, ids: list[int]) -> list[int]:
    if not ids:
        raise bad_request("The prompt is empty.", param="prompt")
    check_in_vocabulary(model, ids, "Prompt token ids", param="prompt")
    return ids


def check_in_vocabulary(model, token_ids, what: str, param: str) -> None:
    if any(not 0 <= t < model.vocab_size for t in token_ids):
        raise bad_request(f"{what} must lie in [0, {model.vocab_size}).", param=param)

