"""A SIGTERM that the main thread cannot answer still gets its one line and ends the rank.

Python runs a signal handler only when the main thread is back in the interpreter. A rank blocked inside a NCCL call
never gets there: on 2 x H200, with ZeRO-3 + QLoRA, rank 1 SIGKILLed mid-step left rank 0 in an all-gather, and the
launcher's SIGTERM went unanswered until its SIGKILL 30 s later - the job ended without a word from rank 0
(benchmarks/gpu_resume.py). The C-level handler still writes the signal number to the wakeup
fd; a daemon thread reading it waits `grace_s` for the main thread's own path and, if the rank is still there, says
the same line and ends the process.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable


class StuckSignalWatch:
    def __init__(self, say_stuck: Callable[[], None], exit_code: int, grace_s: float = 5.0, exit=os._exit):
        self._said = threading.Lock()
        self._say_stuck, self._exit, self._code, self._grace = say_stuck, exit, exit_code, grace_s
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._previous = signal.set_wakeup_fd(write)  # main thread only: train_or_explain runs there
        threading.Thread(target=self._watch, name="dist-dpo-sigterm-watch", daemon=True).start()

    def say_once(self, say: Callable[[], None]) -> bool:
        """The one line, from whichever path gets here first; False if it was already said."""
        if not self._said.acquire(blocking=False):
            return False
        say()
        return True

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)

    def _watch(self) -> None:
        try:
            while signal.SIGTERM not in os.read(self._read, 64):
                pass
        except OSError:
            return
        threading.Event().wait(self._grace)
        self.say_once(self._say_stuck)
        self._exit(self._code)  # the main thread had its chance; a stuck collective must not keep the rank alive
