"""How long the training loop waits for data, measured without synchronising host and device every step.

On a GPU the host runs ahead of the device: it queues step ``k``'s kernels and asks the loader for batch
``k+1`` while the GPU is still busy. A host clock around the loader call therefore measures the wrong thing
(a wait the GPU never notices, or, behind a device synchronisation per step, a GPU that idles while the
host launches). What costs training time is the GPU having nothing to do because the next batch is not
there. ``DataWaitTimer`` records one CUDA event on the compute stream when a step's work has been queued
(``step_done``) and one once the next batch has been handed over and its copies and normalisation are queued
(``batch_ready``); the device time between the two is that stall: near zero when the batch arrived while the
GPU was still busy, the idle gap when it did not (the batch's host→device copy on the compute stream
included, which the GPU also spends not training). The events are read only in ``take()``, at log time,
after the loop has synchronised anyway. On a CPU device host and "device" are the same, and the host clock
around the loader call is the wait.
"""

from __future__ import annotations

import time

import torch


class DataWaitTimer:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self._pending = None  # step_done mark awaiting its batch
        self._pairs: list = []  # (step_done, batch_ready) events since the last take (CUDA)
        self._seconds = 0.0  # host wait since the last take (CPU)

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def step_done(self) -> None:
        """The previous step's work is queued; the loop now asks for the next batch."""
        self._pending = self._mark()

    def batch_ready(self) -> None:
        """The batch is in hand (its device copies queued)."""
        if self._pending is None:
            return
        start, self._pending = self._pending, None
        if self.cuda:
            self._pairs.append((start, self._mark()))
        else:
            self._seconds += time.perf_counter() - start

    def take(self) -> float:
        """Seconds of data wait since the last call (on CUDA this waits for the recorded events)."""
        if self.cuda:
            if self._pairs:
                self._pairs[-1][1].synchronize()
            total = sum(a.elapsed_time(b) for a, b in self._pairs) / 1e3
            self._pairs = []
            return total
        total, self._seconds = self._seconds, 0.0
        return total
