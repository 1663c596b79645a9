"""What a run costs: where the start-up went, seconds per optimizer step and peak GPU memory per rank, gathered on
rank 0 and written into the run marker (dist_dpo_run.json) so benchmarks and users read one file."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import TrainerCallback


class StartUp:
    """Seconds between named points of `dist-dpo train`, from process start (imports included) to the end of step
    1: on several GPUs the start is a fixed cost a short epoch feels (on 2 GPUs about twice one GPU's)."""

    def __init__(self) -> None:
        self.points: list[tuple[str, float]] = [("process start", _process_start())]
        self.parts: list[tuple[int, str, float]] = []  # a named share ("of which ...") of the interval just marked

    def mark(self, name: str) -> None:
        self.points.append((name, time.time()))

    def part(self, name: str, seconds: float | None) -> None:
        if seconds is not None:
            self.parts.append((len(self.points) - 1, name, seconds))

    def seconds(self) -> dict[str, float]:
        out = {}
        for i, (name, t) in enumerate(self.points[1:], 1):
            out[name] = round(t - self.points[i - 1][1], 2)
            out.update({part: round(s, 2) for at, part, s in self.parts if at == i})
        return out


def _process_start() -> float:
    try:
        import psutil  # accelerate's dependency

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - without it, count from here
        return time.time()


class RunStats(TrainerCallback):
    def __init__(self, startup: StartUp | None = None) -> None:
        self.step_times: list[float] = []
        self._last = None
        self.summary: dict = {}
        self.startup = startup or StartUp()

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.startup.mark("train() set-up (wrapping, process-group warm-up, checks)")
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()  # on_step_end follows optimizer.step(); the loss .item() already synced the GPU
        self.step_times.append(now - self._last)
        self._last = now
        if len(self.step_times) == 1:
            self.startup.mark("step 1")

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
            "startup_s": self.startup.seconds(),  # rank 0's
            "seconds_per_step": statistics.median(steady) if steady else None,
            "step_times_s": [round(t, 4) for t in self.step_times],
            "peak_mem_gib_per_rank": [round(r["peak_allocated_gib"], 3) for r in per_rank],
            "peak_reserved_gib_per_rank": [round(r["peak_reserved_gib"], 3) for r in per_rank],
        }
