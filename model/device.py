"""The device policy: where a stage puts its tensors when its spec says ``device: auto``.

Every stage resolves devices through one ``DevicePolicy`` carried by its context. ``auto``
takes CUDA when torch sees a device and the CPU otherwise; a worker can pin the choice with
``FACTORY_DEVICE=cpu|cuda`` (a CPU work pool on a GPU host, a debugging run). A spec that
names a device itself wins over the policy. Asking for CUDA where there is none is an
error before any work, naming who asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

DEVICES = ("auto", "cpu", "cuda")
Device = Literal["auto", "cpu", "cuda"]


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
