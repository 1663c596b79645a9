"""Which speed-path pieces are live right now. Each piece installed on a model asks `live(piece)` on every call and
runs the model's own code when it is not, so the first-batch self-check (self_check.py) can run trl's exact path
through the same modules, and a failed check turns pieces off for the rest of the run."""

from __future__ import annotations

import contextlib
import os

_OFF: set[str] = set()  # pieces turned off for good (a failed self-check)
_PAUSED: list[set[str]] = []  # pieces paused by `paused(...)`, innermost last
ALL = "*"


def live(piece: str) -> bool:
    if piece in _OFF or ALL in _OFF:
        return False
    return not any(piece in s or ALL in s for s in _PAUSED)


BREAKABLE = ("torch_norm", "shared_rows")


def check_break() -> None:
    """A DIST_DPO_TEST_BREAK naming no breakable piece is refused in one line (speed.check_switches)."""
    value = os.environ.get("DIST_DPO_TEST_BREAK", "")
    if value and value not in BREAKABLE:
        from dist_dpo.errors import UserError

        raise UserError(f"DIST_DPO_TEST_BREAK={value}: use one of {', '.join(BREAKABLE)} (tests only), or unset it")


def broken(piece: str) -> bool:
    """Tests only: DIST_DPO_TEST_BREAK=<piece> makes that piece compute a wrong result on purpose, to show that the
    self-check finds it (tests/test_families.py). Pieces that honour it: torch_norm (output halved),
    shared_rows (rejected tokens see the chosen ones)."""
    return os.environ.get("DIST_DPO_TEST_BREAK") == piece


def turn_off(pieces=(ALL,)) -> None:
    _OFF.update(pieces)


@contextlib.contextmanager
def paused(pieces=(ALL,)):
    """The pieces named (default: all) run the model's own code inside the block."""
    _PAUSED.append(set(pieces))
    try:
        yield
    finally:
        _PAUSED.pop()


def reset() -> None:
    """Every piece live again (a new trainer in the same process, e.g. tests)."""
    _OFF.clear()
    _PAUSED.clear()
