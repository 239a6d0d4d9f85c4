"""The engine's dtype on CPU, when `--dtype` is left at `auto`, follows the CPU: the model's own (bf16
for the embedded model) where the CPU has bf16 instructions and PyTorch runs its AVX-512 kernels,
float32 where bf16 would be emulated. `ATEN_CPU_CAPABILITY=avx2` makes PyTorch run its AVX2 kernels,
as on the AVX2-only machines of this kind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # needs no engine: `make test-fast`


def chosen_dtype(**env: str) -> str:
    """What `cpu_dtype` answers in a fresh interpreter (PyTorch reads ATEN_CPU_CAPABILITY at import)."""
    base = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = "from samplers.vllm_engine import cpu_dtype; print(cpu_dtype()[0])"
    result = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                            check=True)
    return result.stdout.split()[-1]


def cpu_has_bf16_instructions() -> bool:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def test_bf16_only_where_the_cpu_computes_it():
    assert chosen_dtype() == ("auto" if cpu_has_bf16_instructions() else "float32")


def test_float32_where_pytorch_runs_kernels_without_bf16():
    assert chosen_dtype(ATEN_CPU_CAPABILITY="avx2") == "float32"
