"""Pluggable samplers over a language-model interface; `REGISTRY` maps request names to them."""

from samplers.base import (
    ChoiceDelta,
    Completion,
    DecodeParams,
    InvalidRequest,
    LanguageModel,
    Sampler,
    Spend,
    TokenLogprob,
    complete,
    merge_streams,
)
from samplers.direct import DirectSampler
from samplers.power_mcmc import PowerMCMCSampler
from samplers.power_scalable import PowerScalableSampler

REGISTRY: dict[str, Sampler] = {
    sampler.name: sampler for sampler in (DirectSampler(), PowerMCMCSampler(), PowerScalableSampler())
}

__all__ = [
    "REGISTRY",
    "ChoiceDelta",
    "Completion",
    "DecodeParams",
    "InvalidRequest",
    "LanguageModel",
    "Sampler",
    "Spend",
    "TokenLogprob",
    "complete",
    "merge_streams",
]
