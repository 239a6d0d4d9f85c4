"""Pluggable samplers over a language-model interface; `REGISTRY` maps request names to them."""

from samplers.base import (
    ChoiceDelta,
    ChoiceStream,
    Completion,
    DecodeParams,
    InvalidRequest,
    LanguageModel,
    Sampler,
    Scheduling,
    Spend,
    TokenLogprob,
    complete,
    merge_streams,
)
from samplers.direct import DirectSampler
from samplers.power_mcmc import PowerMCMCSampler
from samplers.power_scalable import PowerScalableSampler
from samplers.power_smc import PowerSMCSampler

REGISTRY: dict[str, Sampler] = {
    sampler.name: sampler for sampler in (DirectSampler(), PowerMCMCSampler(), PowerScalableSampler(), PowerSMCSampler())
}

__all__ = [
    "REGISTRY",
    "ChoiceDelta",
    "ChoiceStream",
    "Completion",
    "DecodeParams",
    "InvalidRequest",
    "LanguageModel",
    "Sampler",
    "Scheduling",
    "Spend",
    "TokenLogprob",
    "complete",
    "merge_streams",
]
