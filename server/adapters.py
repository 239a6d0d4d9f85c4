"""Checks of the PEFT LoRA adapters served as distilled models (`--distilled NAME=PATH`).

vLLM loads an adapter whose matrices do not fit the model without complaint and then decodes as
if it were absent, so the server compares shapes itself before it starts.
"""

import json
from pathlib import Path

from safetensors import safe_open

ADAPTER_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def adapter_rank(directory: Path) -> int:
    """The rank of the LoRA adapter in `directory`; ValueError if it is not a servable one."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        rank = int(config["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"'{directory}' is not a PEFT LoRA adapter directory (adapter_config.json "
                         f"with a rank 'r'): {exc}") from None
    if config.get("peft_type", "LORA") != "LORA" or not 1 <= rank <= 512:
        raise ValueError(f"'{directory}' holds a {config.get('peft_type')} adapter of rank {rank}; only "
                         "LoRA adapters of rank 1 to 512 can be served.")
    return rank


def check_fits(model_dir: Path, directory: Path) -> None:
    """ValueError unless every LoRA matrix of the adapter matches a weight of the model: A is
    rank x in_features and B is out_features x rank of the weight it adapts."""
    weights = _shapes(model_dir.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"'{model_dir}' has no safetensors weights to check the adapter against.")
    if not (directory / "adapter_model.safetensors").is_file():
        raise ValueError(f"'{directory}' has no adapter_model.safetensors.")
    adapted = _shapes([directory / "adapter_model.safetensors"])
    for name, shape in adapted.items():
        module = name.removeprefix(ADAPTER_PREFIX)
        for suffix in LORA_SUFFIXES:
            module = module.removesuffix(suffix)
        target = weights.get(f"{module}.weight")
        if target is None:
            raise ValueError(f"The adapter '{directory}' adapts '{module}', which the model has not.")
        out_features, in_features = target
        fits = shape[1] == in_features if name.endswith(LORA_SUFFIXES[0]) else shape[0] == out_features
        if not fits:
            raise ValueError(f"The adapter '{directory}' does not fit the model: its {name} is "
                             f"{list(shape)} for a weight of {list(target)}.")


def _shapes(files) -> dict[str, list[int]]:
    shapes = {}
    for path in files:
        with safe_open(path, framework="pt") as tensors:
            shapes.update({key: tensors.get_slice(key).get_shape() for key in tensors.keys()})
    return shapes
