"""Timing a call on the device it runs on: CUDA events on a GPU, the wall clock elsewhere."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call. On a GPU the seconds are the stream's, between two CUDA events recorded
    around the call (host-side gaps in which the GPU idles count, host work the GPU overlaps does not)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        res = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0, res
    t = time.perf_counter()
    res = fn()
    return time.perf_counter() - t, res
