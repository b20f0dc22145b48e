"""What a run ran on: device name, library versions, peak device memory (recorded beside results,
so a number is never separated from the machine that produced it)."""

from __future__ import annotations

import platform
import sys

import torch


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU: {cpu_name()}"
    return device.type


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def describe(device: torch.device | str) -> dict:
    """Device, versions and the CPU thread count of this process."""
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
    }


def peak_memory_mib(device: torch.device | str) -> float | None:
    """Peak memory the caching allocator reserved on a CUDA device (None elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / 2**20
