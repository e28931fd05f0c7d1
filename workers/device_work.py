"""The model's work queued on its device, read later: its time there and its results' copy to
the host, neither blocking the host.

On a GPU the worker queues batch k's model work before it publishes batch k-1 (``worker.run``),
so nothing here may wait for the device: the clock is a pair of CUDA events read once the
work has run, and results cross to the host into pinned buffers behind an event. On a CPU the
work is done when the call returns: wall time, plain copies, no event.
"""

from __future__ import annotations

import time

import torch


class DeviceClock:
    """The model's time on its device: CUDA events around the queued work (read once it has run),
    wall time on a CPU (where the work is done when the call returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.current_stream(device)  # the model's device, not the process's current one
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record(self.stream)
        else:
            self.began, self.elapsed = time.monotonic(), 0.0

    def stop(self) -> None:
        if self.cuda:
            self.end.record(self.stream)
        else:
            self.elapsed = time.monotonic() - self.began

    def seconds(self) -> float:
        """After the work has run (``end`` reached on CUDA)."""
        return self.begin.elapsed_time(self.end) / 1000.0 if self.cuda else self.elapsed


def to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], "torch.cuda.Event | None"]:
    """Copies of ``tensors`` in host memory. From a GPU they are queued into pinned buffers
    without blocking, and the returned event marks them done: a later batch's kernels, queued
    behind them, do not delay them."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors], None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for target, source in zip(host, tensors):
        target.copy_(source, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(tensors[0].device))  # the copies' stream, on their device
    return host, ready
