"""What a benchmark ran on: one provenance record (device name, library versions, git commit) for
`bench` and `bench-e2e`, and the device bench times on."""

from __future__ import annotations

import platform
from dataclasses import dataclass, replace

import torch

from ..errors import UserError
from ..results import git_hash, versions


@dataclass(frozen=True)
class Environment:
    gpu: str  # the CUDA device's name, or "cpu (<processor>)"
    torch: str
    triton: str
    cuda: str
    transformers: str
    lokitool: str
    git: str
    copy_gbps: float | None = None  # measured device-to-device copy, bytes read + written

    def with_copy_bandwidth(self, gbps: float) -> Environment:
        return replace(self, copy_gbps=gbps)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def environment(device: torch.device) -> Environment:
    v = versions()
    return Environment(gpu=device_name(device), torch=v["torch"], triton=_triton_version(), cuda=torch.version.cuda or "none",
                       transformers=v["transformers"], lokitool=v["lokitool"], git=git_hash(short=True) or "unknown")


def timing_device(device: str) -> torch.device:
    """The device `bench` times on: cuda unless --device cpu, with one clear line when no GPU is
    there (unlike calib.models.resolve_device, `auto` never falls back to the CPU: bench times GPU kernels)."""
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU found: bench times GPU kernels; pass --device cpu to time the PyTorch reference on the CPU at small shapes")
    return torch.device("cuda")
