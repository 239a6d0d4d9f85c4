"""Pluggable samplers over a language-model interface; `REGISTRY` maps request names to them."""

from samplers.base import (
    ChoiceDelta,
    DecodeParams,
    InvalidRequest,
    LanguageModel,
    Sampler,
    Spend,
    TokenLogprob,
)
from samplers.direct import DirectSampler
from samplers.power_mcmc import PowerMCMCSampler

REGISTRY: dict[str, Sampler] = {
    sampler.name: sampler for sampler in (DirectSampler(), PowerMCMCSampler())
}

__all__ = [
    "REGISTRY",
    "ChoiceDelta",
    "DecodeParams",
    "InvalidRequest",
    "LanguageModel",
    "Sampler",
    "Spend",
    "TokenLogprob",
]
