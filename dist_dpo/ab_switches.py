"""The benchmark's A/B switches: environment variables that put one piece of the speed path back to its
alternative, so `benchmarks/throughput.py` can measure what the piece buys on the same card (benchmarks/README.md
lists the rows that use them). They are for measuring, not for users: every default is the measured winner.

All of them are read here and only here, under one prefix. A mistyped value stops the run with one line before any
heavy work (`check`, called by train.py before the process group), instead of silently running the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PREFIX = "DIST_DPO_AB_"


@dataclass(frozen=True)
class Switch:
    values: tuple[str, ...]  # the first is the default
    what: str  # what a non-default value does


SWITCHES = {
    "LORA_INPUT_CAST": Switch(("0", "1"), "1: keep peft's fp32 copy of every LoRA input (speed/lora_inputs.py)"),
    "HEAD_RECOMPUTE": Switch(("0", "1"), "1: trl's log-prob kernel, which computes every logits tile again in the "
                                         "backward (speed/logprob.py)"),
    "FUSED_QKV": Switch(("1", "0"), "0: q/k/v as three matmuls (speed/fused_qkv.py)"),
    "DDP_GRAD_COPY": Switch(("0", "1"), "1: DDP copies every gradient into its all-reduce bucket and back"),
    "RMSNORM": Switch(("torch", "liger"), "liger: liger's Triton RMSNorm instead of torch's fused rms_norm "
                                          "(speed/rms_norm.py; needs liger's kernels on)"),
    "COMPILE": Switch(("0", "layers"), "layers: every decoder layer through torch.compile, dynamic shapes, q/k/v "
                                       "left to the compiler (speed/compiled.py)"),
    # "": the best mode this torch has (speed/attention.py picks it); the others force one
    "VARLEN_GQA": Switch(("", "varlen", "aten", "expand"), "expand: K/V heads expanded per query head in packed rows; "
                                                           "varlen / aten: that grouped kernel"),
}


def value(name: str) -> str:
    """The switch's value (its default when unset); a value it does not take is refused in one line."""
    switch, var = SWITCHES[name], PREFIX + name
    got = os.environ.get(var, "") or switch.values[0]
    if got not in switch.values:
        from dist_dpo.errors import UserError

        shown = " or ".join(v for v in switch.values if v)
        raise UserError(f"{var}={got}: use {shown}, or unset it ({switch.what})")
    return got


def flag(name: str) -> bool:
    """An on/off switch: whether it is 1."""
    return value(name) == "1"


def check() -> None:
    """Every switch read once: a mistyped one stops here, on every device."""
    for name in SWITCHES:
        value(name)
    stray = sorted(k for k in os.environ if k.startswith(PREFIX) and k[len(PREFIX):] not in SWITCHES)
    if stray:
        from dist_dpo.errors import UserError

        raise UserError(f"{stray[0]}={os.environ[stray[0]]}: no such A/B switch (there are "
                        f"{', '.join(PREFIX + n for n in SWITCHES)})")


def markdown() -> str:
    """The switches as a table, for benchmarks/README.md."""
    rows = [f"| `{PREFIX}{n}` | {s.values[0] or '(best available)'} | {s.what} |" for n, s in SWITCHES.items()]
    return "\n".join(["| variable | default | other values |", "|---|---|---|", *rows])
