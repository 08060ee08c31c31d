"""The device and precision policy: where a stage puts its tensors and in which number format.

Device. Every stage resolves devices through one ``DevicePolicy`` carried by its context.
``auto`` takes CUDA when torch sees a device and the CPU otherwise; a worker can pin the
choice with ``FACTORY_DEVICE=cpu|cuda`` (a CPU work pool on a GPU host, a debugging run). A
spec that names a device itself wins over the policy. Asking for CUDA where there is none is
an error before any work, naming who asked.

Precision. One table, for every stage:

    train.precision   weights held in   matmuls run in                     checkpoint saved in
    fp32              float32           float32 (TF32 on CUDA)             float32
    bf16              float32 (master)  bfloat16 autocast                  bfloat16
    fp8               float32 (master)  float8 linears (torchao), bf16     bfloat16
                                        autocast for the rest
    auto              bf16 on CUDA, fp32 on the CPU

Frozen models (importance, search scoring, a distillation teacher, evaluation, SDG) are
loaded in ``inference_dtype``: bfloat16 on CUDA (half the memory; a 56B teacher is 112 GB,
not 224), float32 on the CPU, where bfloat16 matmuls are slow and gain nothing. fp8 needs a
GPU of compute capability 8.9 or newer (Ada, Hopper) and torchao; anywhere else it is
refused before any work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

DEVICES = ("auto", "cpu", "cuda")
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp8"]
FP8_MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada and Hopper onwards


@dataclass(frozen=True)
class DevicePolicy:
    device: Device = "auto"

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")

    @classmethod
    def from_environment(cls) -> DevicePolicy:
        value = os.environ.get("FACTORY_DEVICE", "auto").strip().lower() or "auto"
        if value not in DEVICES:
            raise ValueError(f"FACTORY_DEVICE must be one of {', '.join(DEVICES)}, got {value!r}")
        return cls(value)

    def choose(self, requested: str = "auto", who: str = "device") -> str:
        """``cpu`` or ``cuda`` for a spec's ``requested`` device (``who`` names the field in errors)."""
        import torch

        choice = self.device if requested == "auto" else requested
        if choice == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if choice == "cuda" and not torch.cuda.is_available():
            source = who if requested == "cuda" else "FACTORY_DEVICE"
            raise RuntimeError(f"{source} is 'cuda' but torch sees no CUDA device")
        return choice

    def resolve(self, requested: str = "auto", who: str = "device"):
        """The ``torch.device`` for a spec's ``requested`` device."""
        import torch

        return torch.device(self.choose(requested, who))


def training_precision(precision: str, device) -> str:
    """``fp32``, ``bf16`` or ``fp8`` for a train spec's ``precision`` on ``device`` (``auto`` is
    bf16 on CUDA, fp32 elsewhere); fp8 where the device cannot run it is a ValueError."""
    if precision == "auto":
        return "bf16" if _device_type(device) == "cuda" else "fp32"
    if precision == "fp8":
        problem = fp8_problem(device)
        if problem:
            raise ValueError(f"train.precision is 'fp8' but {problem}; use 'bf16'")
    return precision


def fp8_problem(device) -> str | None:
    """Why float8 training cannot run on ``device``, or None when it can."""
    import importlib.util

    import torch

    if _device_type(device) != "cuda":
        return "this stage trains on the CPU (float8 matmuls need a CUDA GPU of compute capability 8.9+)"
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < FP8_MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(torch.device(device))} has compute capability "
                f"{capability[0]}.{capability[1]} (float8 needs 8.9+: Ada, Hopper or newer)")
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'hybrid-model-factory[gpu]')"
    return None


def autocast(device, precision: str):
    """The autocast context of a resolved precision: bfloat16 for bf16 and fp8 (float8 covers the
    converted linears only), none for fp32."""
    import torch

    device_type = _device_type(device)
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision in ("bf16", "fp8"))


def weights_dtype(precision: str):
    """The dtype a trained checkpoint is saved in: the training dtype, not the fp32 master copy."""
    import torch

    return torch.float32 if precision == "fp32" else torch.bfloat16


def inference_dtype(device):
    """The dtype frozen models are loaded in on ``device``: bfloat16 on CUDA, float32 on the CPU."""
    import torch

    return torch.bfloat16 if _device_type(device) == "cuda" else torch.float32


def enable_tf32(device) -> None:
    """TF32 for the float32 matmuls and convolutions that remain on CUDA (optimizer-side, fp32 runs)."""
    import torch

    if _device_type(device) == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _device_type(device) -> str:
    return device if isinstance(device, str) else device.type
