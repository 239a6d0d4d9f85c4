"""`direct`: plain decoding by the engine, streamed token by token."""

from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import BaseModel

from samplers.base import ChoiceDelta, DecodeParams, LanguageModel, Sampler, Spend


class DirectSampler(Sampler):
    name = "direct"

    async def sample(
        self,
        model: LanguageModel,
        prompt_token_ids: list[int],
        decode: DecodeParams,
        params: BaseModel,
        request_id: str,
        spend: Spend,
    ) -> AsyncIterator[ChoiceDelta]:
        async with aclosing(model.decode(prompt_token_ids, decode, request_id, spend)) as batches:
            async for batch in batches:
                for delta in batch:
                    yield delta
