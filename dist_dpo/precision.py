"""Numerics the wrappers get wrong by default. Under every strategy: DPO log-probs and the loss stay fp32, QLoRA
adapters train as fp32 weights, and FSDP2 moves packed 4-bit weights bit for bit (each choice is a strategy-table cell,
dist_dpo/strategies.py, with what the GPU matrix measured)."""

from __future__ import annotations

import torch

from dist_dpo.strategies import Strategy


def has_packed_4bit(model) -> bool:
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def keep_qlora_adapters_fp32(trainer, strat: Strategy) -> int:
    """Undo trl's bf16 cast of a quantized model's adapters (see `Strategy.qlora_adapters_fp32`); before `train()`,
    which builds the optimizer and the FSDP wrapper. Returns how many tensors were cast back."""
    model = trainer.model
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)  # trl's test
    if not strat.qlora_adapters_fp32 or not quantized:
        return 0
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            cast += 1
    return cast


def fsdp_param_dtype(trainer, strat: Strategy) -> torch.dtype | None:
    """The dtype FSDP2 casts parameters to before its all-gather (see `Strategy.fsdp_4bit_gather_as_stored`)."""
    if strat.fsdp_4bit_gather_as_stored and has_packed_4bit(trainer.model):
        return None
    return torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else None


def refuse_float_gathered_4bit(model, strat: Strategy) -> None:
    """Before FSDP2 wraps a 4-bit model: every unit it will gather (a decoder layer; the rest is the root) that holds
    packed 4-bit weights must also hold a tensor of another dtype, or FSDP2 gathers it through a float copy that
    rewrites some of those weights (bitsandbytes#1945) - silently. The fp32 adapters make that true when LoRA is on
    every layer; a recipe that leaves a layer without adapters would not be, so it stops here with one line."""
    if not strat.fsdp_4bit_gather_as_stored or not has_packed_4bit(model):
        return
    from dist_dpo.errors import UserError

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    unit_types = set(getattr(base, "_no_split_modules", None) or ())
    units = [(n, m) for n, m in base.named_modules() if type(m).__name__ in unit_types]
    inside = {id(p) for _, m in units for p in m.parameters()}
    root = [p for p in base.parameters() if id(p) not in inside]
    for name, params in [(n, list(m.parameters())) for n, m in units] + [("the model's root", root)]:
        if any(type(p).__name__ == "Params4bit" for p in params) and len({p.dtype for p in params}) == 1:
            raise UserError(
                f"FSDP2 would gather {name} (4-bit weights, all {params[0].dtype}) through a float copy that rewrites "
                "some packed 4-bit weights (bitsandbytes#1945): choose lora_target_modules that every decoder layer "
                "has, or train this model with ddp / zero3")


def keep_logprobs_fp32(trainer, strat: Strategy) -> None:
    """Set before `train()` (FSDP wraps the model there). See `Strategy.fsdp_uncast_outputs`."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if not strat.fsdp_uncast_outputs or plugin is None:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param_dtype = fsdp_param_dtype(trainer, strat)
    # Gradients are reduced in fp32 too: LoRA gradients are small and bf16 all-reduce rounding shows in the loss.
    plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=None
    )
