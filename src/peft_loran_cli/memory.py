"""Peak memory of a run: CUDA allocations, else the process's peak RSS (``/proc/self/status``), reset before it."""

from __future__ import annotations

import resource
from typing import Optional

import torch


def _on_cuda(device: Optional[str]) -> bool:
    return torch.cuda.is_available() if device is None else device == "cuda"


def reset_peak_memory(device: Optional[str] = None) -> float:
    """Reset the peak-memory counter (CUDA allocations, else the process's peak RSS where the OS allows);
    returns the current level in MB. ``device`` None: CUDA when available, as the Trainer does."""
    if _on_cuda(device):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as fh:
            rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return rss
    except OSError:
        return 0.0


def peak_memory(device: Optional[str] = None) -> tuple[float, str]:
    """(peak in MB since :func:`reset_peak_memory`, what was measured)."""
    if _on_cuda(device):
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024, "peak RSS"
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
