"""Rank-aware logging: global rank 0 speaks INFO on the console, other ranks only WARNING and up; every rank
writes `<output_dir>/logs/rank<N>.log` with host and rank on each line.

The console carries dist-dpo's own lines (and the training progress bar). What libraries log (transformers,
datasets, deepspeed, accelerate, trl, peft, liger-kernel, bitsandbytes ...) and `warnings.warn` messages ask
nothing of the user: they go to the rank file only - held in memory until the output dir is known, here, in one
place. A failure still reaches the console as the exception itself.
"""

from __future__ import annotations

import collections
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
    """Every rank logs everything it says (and what libraries said, also before this) to its own file."""
    path = Path(output_dir) / "logs" / f"rank{rt.rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT.format(host=rt.hostname, rank=rt.rank)))
    get_logger().addHandler(handler)
    LIBRARIES.attach(handler)
    return path


class _LibraryRecords(logging.Handler):
    """The root logger's one handler: library records and warnings go to the rank file, never to the console; held
    (the last HELD_RECORDS) until the file exists."""

    HELD_RECORDS = 2000

    def __init__(self):
        super().__init__(logging.INFO)
        self.file: logging.Handler | None = None
        self.held: collections.deque = collections.deque(maxlen=self.HELD_RECORDS)

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.handle(record)
        else:
            self.held.append(record)

    def attach(self, file_handler: logging.Handler) -> None:
        self.file = file_handler
        while self.held:
            file_handler.handle(self.held.popleft())


class _ToRankFile(logging.Filter):
    """On a library's logger: hand each record to the rank file instead of that logger's own handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        LIBRARIES.handle(record)
        return False


LIBRARIES = _LibraryRecords()
# Libraries whose logger writes to the console with a handler of its own (added at import, so it may come after
# us): a filter on the logger hands each record to the rank file instead. Records logged to the library's root
# logger itself only - which is how DeepSpeed logs (deepspeed.utils.logging.logger).
OWN_HANDLER_LOGGERS = ("DeepSpeed",)


def hold_library_records() -> None:
    """From here on, library log records and warnings.warn go to the rank file (held until it exists). `train` and
    `launch` call it first thing, so that what libraries say while they are imported is caught too."""
    root = logging.getLogger()
    if LIBRARIES not in root.handlers:
        root.addHandler(LIBRARIES)  # also keeps Python's last-resort handler from printing library warnings
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the root handler above
    for name in OWN_HANDLER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ToRankFile) for f in logger.filters):
            logger.addFilter(_ToRankFile())


def _quiet_libraries(rt: Runtime) -> None:
    import datasets
    import transformers

    hold_library_records()
    # transformers and datasets log through their own console handler: drop it, let records reach the root.
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars; the training bar is trl's own tqdm
    datasets_root = logging.getLogger("datasets")
    for h in [h for h in datasets_root.handlers if type(h) is logging.StreamHandler]:
        datasets_root.removeHandler(h)
    datasets.utils.logging.enable_propagation()
    datasets.disable_progress_bars()  # per-map bars on every rank drown the step logs
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    if not rt.is_main:  # torch's own logging handlers (TORCH_LOGS) stay; off rank 0 only its errors
        logging.getLogger("torch.distributed").setLevel(logging.ERROR)


def log_to_rank_file(level: int, message: str) -> None:
    """Record a message in this rank's file only: for errors that global rank 0 already prints for everyone."""
    record = get_logger().makeRecord(LOGGER_NAME, level, __file__, 0, message, None, None)
    for handler in get_logger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
