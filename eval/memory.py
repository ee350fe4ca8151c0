"""Peak tensor memory of a call, for the benchmarks next to this file."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Largest net tensor memory ``fn`` holds at once on ``device``: the running sum of the profiler's allocation
    (+) and free (-) events (``profile_memory=True``: every tensor the allocator hands out and takes back; inputs
    made before the call and library-internal scratch such as MKL's are not counted), from zero at the call."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    wanted = "CUDA" if device.type == "cuda" else "CPU"
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if wanted in str(event.device_type()):
            held += event.nbytes()
            peak = max(peak, held)
    return peak
