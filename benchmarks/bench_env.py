"""What every results file records about where it ran: cards, versions, commit, date (one place for all benchmarks)."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import os
import platform
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["torch", "transformers", "accelerate", "peft", "trl", "datasets", "deepspeed", "bitsandbytes",
            "liger-kernel"]


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def git_commit(explicit: str | None = None) -> str | None:
    """--commit, else $GIT_COMMIT, else git (a copy of the tree without .git has only the first two)."""
    if explicit or os.environ.get("GIT_COMMIT"):
        return explicit or os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return out or None


def environment(commit: str | None = None) -> dict:
    import torch

    cards = []
    if shutil.which("nvidia-smi"):
        cards = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True).stdout.strip().splitlines()
    return {"cards": cards or ["cpu"], "gpu_count": torch.cuda.device_count(), "cuda": torch.version.cuda,
            "versions": {n: _version(n) for n in PACKAGES}, "git_commit": git_commit(commit),
            "host": platform.node(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
