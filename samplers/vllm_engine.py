"""The one adapter between samplers and vLLM's `AsyncLLM`; no other sampler module imports vLLM."""

import argparse
import asyncio
import dataclasses
import logging
import typing
from collections.abc import AsyncIterator, Mapping

import torch
from vllm import SamplingParams
from vllm.config.lora import MaxLoRARanks
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt
from vllm.logprobs import Logprob
from vllm.lora.request import LoRARequest
from vllm.outputs import CompletionOutput
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM

from samplers.base import ChoiceDelta, DecodeParams, InvalidRequest, Scheduling, Spend, TokenLogprob

# vLLM sizes the CPU KV cache as a fraction of the NUMA node's memory and refuses to start when that
# much is not free; a fixed 2 GiB serves small models comfortably on a 24 GiB machine.
CPU_KV_CACHE_BYTES = 2 << 30
# vLLM's CPU KV blocks hold 128 tokens, and the prefix cache shares whole blocks only: at these
# lengths power samplers' requests then share nothing. 32 is the smallest the CPU attention kernel
# takes; with it power_mcmc computed 38% fewer engine tokens and ran 8% faster (docs/benchmarks.md,
# "power_mcmc's proposal paths and KV blocks on CPU").
CPU_KV_BLOCK_SIZE = 32
PROCESSED_LOGPROBS = "processed_logprobs"
# Alternatives a position may report (vLLM's default is 20): power_mcmc's one-pass proposal reads
# the top 2K at each position to find every token tied with the K-th (samplers/power_mcmc.py).
MAX_LOGPROBS = 64
LORA_RANKS = typing.get_args(MaxLoRARanks)  # the adapter ranks vLLM can be sized for

logger = logging.getLogger(__name__)


def cpu_dtype() -> tuple[str, str]:
    """The engine dtype on this CPU when `--dtype` is left at `auto`, and the reason.

    bf16 pays only where the CPU has bf16 instructions (AVX-512 BF16, or AMX) and PyTorch runs its
    AVX-512 kernels. Elsewhere bf16 is emulated through float32: the embedded model then decodes 8
    requests at once 1.8x slower and prefills 4.6x slower in bf16 than in float32 (docs/benchmarks.md,
    "Engine dtype on CPU").
    """
    kernels = torch.backends.cpu.get_cpu_capability()
    if torch.cpu._is_avx512_bf16_supported() and kernels.startswith("AVX512"):
        return "auto", f"the CPU has bf16 instructions and PyTorch runs its {kernels} kernels"
    return "float32", f"bf16 would be emulated here (PyTorch runs its {kernels} kernels without bf16 instructions)"


class VllmModel:
    """`LanguageModel` over one `AsyncLLM` engine."""

    def __init__(self, engine: AsyncLLM, adapters: Mapping[str, str]):
        self.engine = engine
        # vLLM numbers adapters from 1.
        self.adapters = {name: LoRARequest(name, i, path) for i, (name, path) in enumerate(adapters.items(), 1)}
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len: int = engine.model_config.max_model_len
        self.vocab_size: int = engine.model_config.get_vocab_size()
        self.processed_logprobs = engine.model_config.logprobs_mode == PROCESSED_LOGPROBS
        self.max_logprobs: int = engine.model_config.max_logprobs
        if self.max_logprobs == -1:  # vLLM's "the whole vocabulary"
            self.max_logprobs = self.vocab_size
        # With LoRA enabled, vLLM 0.32's CPU engine dies computing prompt logprobs (its LoRA
        # logits path is indexed for the sampled tokens only; vllm-project/vllm#29955).
        self.can_score = not (adapters and current_platform.is_cpu())
        self.eos_token_ids = _eos_token_ids(engine, self.tokenizer)
        # Requests pinned to each data-parallel engine (pin_engine); one engine needs no pinning.
        self.pinned = [0] * engine.vllm_config.parallel_config.data_parallel_size

    def pin_engine(self) -> int | None:
        """An engine for all of one request's engine requests, so that they share its prefix cache:
        the one with the fewest requests pinned to it (None where there is one engine). Give it
        back with unpin_engine."""
        if len(self.pinned) == 1:
            return None
        rank = min(range(len(self.pinned)), key=self.pinned.__getitem__)
        self.pinned[rank] += 1
        return rank

    def unpin_engine(self, rank: int) -> None:
        self.pinned[rank] -= 1

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """vLLM's own engine flags (`--model`, `--dtype`, `--max-model-len`, ...), as `vllm serve` has them.

        One default differs from vLLM's: `--max-logprobs` is MAX_LOGPROBS rather than 20.
        """
        AsyncEngineArgs.add_cli_args(parser)
        parser.set_defaults(max_logprobs=MAX_LOGPROBS)

    @staticmethod
    def engine_flags(args: argparse.Namespace) -> dict:
        """The engine flags among command-line arguments parsed with add_cli_args, for from_args."""
        return {field.name: getattr(args, field.name) for field in dataclasses.fields(AsyncEngineArgs)
                if hasattr(args, field.name)}

    @classmethod
    def from_args(cls, model: str, adapters: Mapping[str, str] | None = None, adapter_rank: int = 0,
                  **engine_flags) -> "VllmModel":
        """Start an engine on `model` (blocking: loads weights and warms up), able to decode with
        the given LoRA adapters (name -> PEFT directory) of rank up to `adapter_rank`.

        `engine_flags` are vLLM's engine arguments by their field names (`dtype="float32"`,
        `enforce_eager=True`, ...; a flag left out has the default of add_cli_args). On a CPU,
        `dtype` "auto" becomes cpu_dtype()'s choice, and the KV cache's size, its block size and
        chunked prefill get this module's defaults unless given.
        """
        engine_args = AsyncEngineArgs(model=model, **{"max_logprobs": MAX_LOGPROBS, **engine_flags})
        if adapters:
            engine_args.enable_lora = True
            engine_args.max_loras = max(engine_args.max_loras, len(adapters))
            engine_args.max_lora_rank = min(r for r in LORA_RANKS if r >= adapter_rank)
        if current_platform.is_cpu() and engine_args.dtype == "auto":
            engine_args.dtype, reason = cpu_dtype()
            logger.info("Engine dtype %s: %s; --dtype overrides it.",
                        "as the model's config" if engine_args.dtype == "auto" else engine_args.dtype, reason)
        if current_platform.is_cpu() and engine_args.kv_cache_memory_bytes is None:
            engine_args.kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        if current_platform.is_cpu() and engine_args.block_size is None:
            engine_args.block_size = CPU_KV_BLOCK_SIZE
        if current_platform.is_cpu() and engine_args.enable_chunked_prefill is None:
            # After a partial (chunked) prefill vLLM rewinds a seeded request's generator with
            # Generator.set_offset, which CPU generators lack: the engine dies as soon as concurrent
            # seeded requests overflow one step's token budget.
            engine_args.enable_chunked_prefill = False
        return cls(AsyncLLM.from_engine_args(engine_args), adapters or {})

    async def load_adapters(self) -> None:
        """Load every adapter now, so that one that cannot be loaded fails at start-up."""
        for request in self.adapters.values():
            try:
                await self.engine.add_lora(request)
            except Exception as exc:
                raise ValueError(f"vLLM could not load the adapter '{request.lora_name}' "
                                 f"({request.lora_path}): {exc}") from None

    @property
    def errored(self) -> bool:
        return self.engine is None or self.engine.errored

    async def check_health(self) -> None:
        await self.engine.check_health()

    def shutdown(self) -> None:
        # Drop the engine here: AsyncLLM shuts down again when collected, which fails if that
        # happens only at interpreter exit.
        engine, self.engine = self.engine, None
        engine.shutdown()

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    async def score(self, token_ids: list[int], start: int, request_id: str, spend: Spend,
                    alternatives: int = 0, scheduling: Scheduling = Scheduling()) -> list[TokenLogprob]:
        # Prompt logprobs are the model's raw log p whatever the logprobs mode, which makes them
        # exact for scoring; the price is that vLLM then skips the prefix cache for the request,
        # so the whole sequence is prefilled again.
        sampling = SamplingParams(max_tokens=1, prompt_logprobs=alternatives, detokenize=False)
        final = None
        async for output in self.engine.generate(
            TokensPrompt(prompt_token_ids=token_ids), sampling, request_id, priority=scheduling.priority,
            data_parallel_rank=scheduling.engine_rank,
        ):
            final = output
        spend.scored += len(token_ids)
        rows = final.prompt_logprobs  # rows[i] scores token_ids[i]; rows[0] is None
        return [_token_logprob(token_ids[i], rows[i], alternatives) for i in range(start, len(token_ids))]

    async def decode(
        self, prompt_token_ids: list[int], params: DecodeParams, request_id: str, spend: Spend
    ) -> AsyncIterator[list[ChoiceDelta]]:
        started: set[int] = set()  # the choices whose prefill is counted
        # The server checks what it knows of; vLLM checks the rest, such as a grammar or schema its
        # structured-output backend cannot compile, when the request is added (the first output).
        try:
            sampling = _sampling_params(params)
            # Cancelling or closing `generate` makes vLLM abort the request, so nothing outlives the caller.
            async for output in self.engine.generate(
                TokensPrompt(prompt_token_ids=prompt_token_ids), sampling, request_id,
                lora_request=self.adapters[params.adapter] if params.adapter else None,
                priority=params.scheduling.priority, data_parallel_rank=params.scheduling.engine_rank,
            ):
                # With n > 1 each choice is a request of its own inside vLLM, with its own prefill;
                # its first output says how much of the prompt it found in the prefix cache.
                for choice in output.outputs:
                    if choice.index not in started:
                        started.add(choice.index)
                        spend.prefilled += len(prompt_token_ids) - (output.num_cached_tokens or 0)
                    spend.generated += len(choice.token_ids)
                yield [_choice_delta(o, params.logprobs) for o in output.outputs]
        except VLLMValidationError as exc:
            raise InvalidRequest(str(exc), param=exc.parameter) from None


class BlockingModel:
    """A `VllmModel` driven from synchronous code (training, tests): its coroutines run to the end
    on an event loop of its own. Takes what VllmModel.from_args takes."""

    def __init__(self, model: str, **engine_flags):
        self.loop = asyncio.new_event_loop()
        self.model = VllmModel.from_args(model, **engine_flags)

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.model.shutdown()
        # vLLM's output-handler task lives in this loop once it has run; end it before closing the
        # loop, or the interpreter hangs at exit.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()


def _eos_token_ids(engine: AsyncLLM, tokenizer) -> frozenset[int]:
    """The tokens that end a completion, as vLLM decides them: the tokenizer's EOS and the
    generation config's `eos_token_id` (an int or a list)."""
    extra = engine.model_config.try_get_generation_config().get("eos_token_id", [])
    ids = {extra} if isinstance(extra, int) else set(extra)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _sampling_params(params: DecodeParams) -> SamplingParams:
    return SamplingParams(
        n=params.n,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logprobs=params.logprobs,
        min_p=params.min_p,
        logit_bias=params.logit_bias,
        allowed_token_ids=None if params.allowed_token_ids is None else list(params.allowed_token_ids),
        bad_words=list(params.bad_words),
        structured_outputs=StructuredOutputsParams(**params.structured_outputs) if params.structured_outputs else None,
        include_stop_str_in_output=params.include_stop_str_in_output,
        skip_special_tokens=params.skip_special_tokens,
        spaces_between_special_tokens=params.spaces_between_special_tokens,
        output_kind=RequestOutputKind.DELTA,
    )


def _choice_delta(output: CompletionOutput, top_count: int | None) -> ChoiceDelta:
    logprobs = None
    if top_count is not None and output.logprobs is not None:
        logprobs = [
            _token_logprob(token_id, position, top_count)
            for token_id, position in zip(output.token_ids, output.logprobs)
        ]
    return ChoiceDelta(
        index=output.index,
        token_ids=list(output.token_ids),
        text=output.text,
        logprobs=logprobs,
        finish_reason=output.finish_reason,
        stop_reason=output.stop_reason,
    )


def _token_logprob(token_id: int, position: Mapping[int, Logprob], top_count: int) -> TokenLogprob:
    """vLLM gives, per position, the sampled token plus the `top_count` most likely ones.

    The alternatives are ordered by their log-probability, not by vLLM's `rank`: under PyTorch's AVX2
    kernels the test suite once saw a sampled token ranked first above a likelier one.
    """
    ranked = sorted(position.items(), key=lambda item: -item[1].logprob)
    top = tuple(
        TokenLogprob(tid, lp.decoded_token or "", lp.logprob, rank=lp.rank)
        for tid, lp in ranked[:top_count]
    )
    chosen = position[token_id]
    return TokenLogprob(token_id, chosen.decoded_token or "", chosen.logprob, top, chosen.rank)
