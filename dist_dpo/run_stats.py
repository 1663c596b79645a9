"""What a run costs: seconds per optimizer step and peak GPU memory per rank, gathered on rank 0 and written into
the run marker (dist_dpo_run.json) so benchmarks and users read one file."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import TrainerCallback


class RunStats(TrainerCallback):
    def __init__(self) -> None:
        self.step_times: list[float] = []
        self._last = None
        self.summary: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()  # on_step_end follows optimizer.step(); the loss .item() already synced the GPU
        self.step_times.append(now - self._last)
        self._last = now

    def on_train_end(self, args, state, control, **kwargs):
        mine = {"peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0}
        if torch.cuda.is_available():
            mine = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
        per_rank = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, mine)
        steady = self.step_times[2:] or self.step_times  # the first steps include compilation and allocator warm-up
        self.summary = {
            "seconds_per_step": statistics.median(steady) if steady else None,
            "step_times_s": [round(t, 4) for t in self.step_times],
            "peak_mem_gib_per_rank": [round(r["peak_allocated_gib"], 3) for r in per_rank],
            "peak_reserved_gib_per_rank": [round(r["peak_reserved_gib"], 3) for r in per_rank],
        }
