"""LoRA layers keep their input in the compute dtype when the forward runs under autocast.

peft keeps adapter weights in fp32 (its default upcast, the optimizer's precision) and, in every LoRA layer's forward,
copies the layer input to the adapter's dtype first (`_cast_input_dtype`). Under autocast - how accelerate runs the
single-GPU, DDP and FSDP forwards in bf16/fp16 - `lora_A` then casts that fp32 copy back to bf16 for its matmul, so
the copy buys nothing: with dropout 0 the loss and gradients are bitwise the same without it (tests/test_speed.py);
with dropout the masks are drawn on a bf16 instead of an fp32 tensor (same distribution, other draws). What it costs
is two full-size activation copies (and an fp32 dropout) per LoRA layer and forward: DeepSpeed's bf16 engine, which
keeps its adapters in bf16, never made them, and its 2-GPU step was faster than a 1-GPU step.
Outside autocast (evaluation, generation, DeepSpeed) peft's cast stays as it is.
"""

from __future__ import annotations

import torch

from dist_dpo.speed import switch


class CastUnlessAutocast:
    """peft reads a LoRA layer's `cast_input_dtype_enabled` as a truth value on every forward: cast only when no
    autocast is active."""

    def __bool__(self) -> bool:
        if not switch.live("lora_cast"):
            return True
        return not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))

    def __repr__(self) -> str:
        return "CastUnlessAutocast()"


def install(model) -> int:
    """Every peft LoRA layer of `model` (the PEFT-wrapped model) skips the input copy under autocast; returns how many."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = CastUnlessAutocast()
    return len(layers)
