"""Which checkpoint a run resumes from. Only COMPLETE checkpoints count: a save cut off midway is never picked."""

from __future__ import annotations

import re
from pathlib import Path

_CKPT = re.compile(r"^checkpoint-(\d+)$")
# transformers writes trainer_state.json after the model, optimizer, scheduler and RNG files of a checkpoint.
COMPLETE_FILE = "trainer_state.json"


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    found = []
    for d in Path(output_dir).iterdir():
        m = _CKPT.match(d.name)
        if m and d.is_dir() and (d / COMPLETE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None
