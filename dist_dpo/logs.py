"""Rank-aware logging: global rank 0 speaks INFO on the console, other ranks only WARNING and up; every rank
writes `<output_dir>/logs/rank<N>.log` with host and rank on each line.

Libraries (transformers, datasets, deepspeed, accelerate) are quieted off rank 0 here, in one place.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from dist_dpo.runtime import Runtime

LOGGER_NAME = "dist_dpo"
_FORMAT = "%(asctime)s [{host} rank{rank}] %(levelname)s %(name)s: %(message)s"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_console(rt: Runtime) -> logging.Logger:
    """Console logging for this process, before the output dir is known."""
    log = get_logger()
    log.setLevel(logging.INFO)
    log.propagate = False
    if not any(getattr(h, "_dist_dpo_console", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout if rt.is_main else sys.stderr)
        handler._dist_dpo_console = True  # type: ignore[attr-defined]
        handler.setLevel(logging.INFO if rt.is_main else logging.WARNING)
        handler.setFormatter(logging.Formatter(_FORMAT.format(host=rt.hostname, rank=rt.rank), "%H:%M:%S"))
        log.addHandler(handler)
    _quiet_libraries(rt)
    return log


def add_rank_file(rt: Runtime, output_dir: str | os.PathLike) -> Path:
    """Every rank logs everything it says (and library warnings) to its own file."""
    path = Path(output_dir) / "logs" / f"rank{rt.rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT.format(host=rt.hostname, rank=rt.rank)))
    for name in (LOGGER_NAME, "transformers", "trl", "peft", "accelerate", "DeepSpeed", "datasets"):
        logging.getLogger(name).addHandler(handler)
    return path


def _quiet_libraries(rt: Runtime) -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()  # per-map bars on every rank drown the step logs
    if rt.is_main:
        transformers.utils.logging.set_verbosity_warning()
        datasets.utils.logging.set_verbosity_warning()
    else:
        # Off rank 0 only errors reach the console; the rank file still records this rank's own log lines.
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        logging.getLogger("accelerate").setLevel(logging.ERROR)
        logging.getLogger("torch.distributed").setLevel(logging.ERROR)


def log_to_rank_file(level: int, message: str) -> None:
    """Record a message in this rank's file only: for errors that global rank 0 already prints for everyone."""
    record = get_logger().makeRecord(LOGGER_NAME, level, __file__, 0, message, None, None)
    for handler in get_logger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
