"""Where a window of training steps makes the host wait for the GPU, and which Python-level collectives it calls.

    probe = SyncProbe(); probe.start(); ...steps...; probe.steps = n; summary = probe.stop()

Host syncs come from torch.cuda.set_sync_debug_mode("warn"): torch warns ("...synchronizing CUDA operation...") at
each one; each warning's Python call site is counted. Without CUDA only the collectives are recorded.
"""

from __future__ import annotations

import functools
import os
import traceback
import warnings
from collections import Counter
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent) + os.sep
COLLECTIVES = ("barrier", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "all_gather_object", "broadcast_object_list", "gather", "reduce", "gather_object", "monitored_barrier")
_HERE = os.path.abspath(__file__)


def _site(filename: str) -> str:
    if "site-packages" + os.sep in filename:
        return filename.split("site-packages" + os.sep, 1)[1]
    path = os.path.abspath(filename)
    return path[len(ROOT):] if path.startswith(ROOT) else filename


def call_site(depth: int = 5) -> str:
    """The innermost `depth` frames of the caller, innermost first, this module's and the warnings module's left out."""
    frames = [f for f in traceback.extract_stack() if os.path.abspath(f.filename) != _HERE
              and os.path.basename(f.filename) not in ("warnings.py", "_py_warnings.py")]
    return " <- ".join(f"{_site(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-depth:]))


class SyncProbe:
    def __init__(self):
        self.steps = 0  # set by the caller: steps the window covered
        self.syncs: Counter = Counter()
        self.collectives: Counter = Counter()
        self._patched: list[tuple[object, str, object]] = []
        self._catch, self._cuda = None, False

    def start(self) -> None:
        import torch
        import torch.distributed as dist

        self._cuda = torch.cuda.is_available()
        if self._cuda:
            self._mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        self._catch = warnings.catch_warnings()  # restores filters and showwarning on exit
        self._catch.__enter__()
        warnings.simplefilter("always")
        original_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, UserWarning) and "synchronizing" in str(message):
                self.syncs[call_site()] += 1
            else:
                original_show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        if dist.is_available():
            for module in (dist, dist.distributed_c10d):
                for name in COLLECTIVES:
                    if hasattr(module, name):
                        original = getattr(module, name)
                        self._patched.append((module, name, original))
                        setattr(module, name, self._wrap(name, original))

    def _wrap(self, name, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            self.collectives[name, call_site()] += 1
            return original(*args, **kwargs)

        return wrapper

    def stop(self) -> dict:
        for module, name, original in reversed(self._patched):
            setattr(module, name, original)
        self._patched.clear()
        if self._catch is not None:
            self._catch.__exit__(None, None, None)
            self._catch = None
        if self._cuda:
            import torch

            torch.cuda.set_sync_debug_mode(self._mode)
        total = sum(self.syncs.values())
        return {"steps": self.steps, "syncs": total,
                "syncs_per_step": round(total / self.steps, 2) if self.steps else None,
                "sync_sites": [[n, key] for key, n in self.syncs.most_common(25)],
                "collectives": [[n, name, key] for (name, key), n in self.collectives.most_common(25)]}
