"""The memory an update takes: the peak of bytes allocated while it runs, above what was allocated when it began.

* CUDA: the caching allocator's counters (`reset_peak_memory_stats` as the update begins, `max_memory_allocated`
  when it ends, minus `memory_allocated` at its start): weights, optimizer state and the rollout's KV cache (freed
  before the update) are not charged to it.
* CPU: there is no resettable counter and `tracemalloc` cannot see torch tensors, so torch.profiler records every
  allocation and free (`profile_memory=True`) and they are replayed in time order: the CPU analogue of the CUDA
  figure. Unlike the bytes saved for backward, it sees inside `torch.utils.checkpoint`, the LM head's logits, the
  backward's own buffers, the gradients and the optimizer step. The profiler slows every op, so it is for a probed
  step, not for every step.

An optimizer step of several micro-batches is several update windows (one per micro-batch, each after its rollout);
its peak is the highest point within any window, measured from the memory allocated when the first window began, so
the gradients accumulated by earlier micro-batches count and the rollouts in between do not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

WINDOW = "oprd.update"
"""The profiler range that marks an update window on CPU."""

KINDS = {
    "cuda": "update peak (CUDA allocator)",
    "cpu": "update peak (CPU allocation replay)",
}
"""What the memory figure of each device is, as tables and plots label it."""


def memory_kind(device: torch.device) -> str:
    return KINDS["cuda" if device.type == "cuda" else "cpu"]


def allocation_events(prof) -> list[tuple[int, int]]:
    """`(time_ns, signed bytes)` of every CPU allocation and free the profiler recorded, in time order."""
    allocation = torch._C._profiler._EventType.Allocation
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return sorted(events)


def named_ranges(prof, name: str) -> list[tuple[int, int]]:
    """`(start_ns, end_ns)` of every `record_function(name)` range the profiler recorded, in time order."""
    ranges, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.name == name:
            ranges.append((node.start_time_ns, node.end_time_ns))
        stack.extend(node.children)
    return sorted(ranges)


def replay_peak(events: list[tuple[int, int]], windows: list[tuple[int, int]] | None = None) -> int:
    """The highest running total of `events` (time-ordered signed sizes, starting from 0) inside `windows`.

    Args:
        events: `(time_ns, signed bytes)`; frees of memory allocated before the recording lower the total, as they
            lower `memory_allocated`.
        windows: `(start_ns, end_ns)` ranges where the peak is taken (None: everywhere). Events between windows still
            move the running total (what they leave allocated counts in the next window) but set no peak.
    """
    if windows is None:
        windows = [(-(2**63), 2**63)]
    running = peak = 0
    position = 0
    for start, end in windows:
        while position < len(events) and events[position][0] < start:
            running += events[position][1]
            position += 1
        peak = max(peak, running)  # what earlier windows left allocated is live as this one begins
        while position < len(events) and events[position][0] <= end:
            running += events[position][1]
            peak = max(peak, running)
            position += 1
    return peak


def cpu_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run `fn()` under the profiler; return its result and the peak of live CPU bytes allocated inside it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return result, replay_peak(allocation_events(prof))


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """Run `fn()`; return its result and `max_memory_allocated` during it minus the memory allocated before."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """Peak memory increase while `fn()` runs, on CUDA or CPU (see the module docstring)."""
    return cuda_peak_bytes(fn, device) if device.type == "cuda" else cpu_peak_bytes(fn)


class UpdateMemory:
    """The peak memory of one optimizer step's update windows (`begin`/`end` around each; `close` gives the figure).

    Args:
        device: the device the update runs on.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base: int | None = None
        self._peak: int | None = None
        self._prof = None
        self._range = None

    @property
    def kind(self) -> str:
        return memory_kind(self.device)

    def begin(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if self._base is None:
                self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        from torch.profiler import ProfilerActivity, profile, record_function

        if self._prof is None:
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.start()
        self._range = record_function(WINDOW)
        self._range.__enter__()

    def end(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - (self._base or 0)
            self._peak = max(self._peak or 0, peak)
        elif self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def close(self) -> int | None:
        """Stop measuring; the peak bytes over the windows (None when no window ran)."""
        if self._range is not None:
            self.end()
        if self._prof is not None:
            self._prof.stop()
            windows = named_ranges(self._prof, WINDOW)
            self._peak = replay_peak(allocation_events(self._prof), windows) if windows else None
            self._prof = None
        peak, self._peak, self._base = self._peak, None, None
        return peak
