"""`merge_micro_batches: auto`: the recipe's 4 pairs x 4 accumulation run as 16 pairs x 1 when they fit.

Gradient accumulation exists for memory. A recipe written for a small card (the tutorial's 4 x 4) leaves a large one
running four small, poorly filled micro-steps where one full one computes the same thing: trl's loss is a mean per
micro-batch and the Trainer averages the micro-batches, so one micro-batch of all 16 pairs gives the same loss and
gradient (up to float rounding). The issue's anchor: 24.3 k -> 33.2 k tokens/s for 4 x 4 -> 16 x 1 on one H100.
The memory plan decides: merged only when the larger batch needs no more gradient checkpointing than the recipe's.
The pairs of each optimizer step stay the same (the grouped order is drawn for the whole step either way).
"""

from __future__ import annotations

from dataclasses import replace

from dist_dpo import plan
from dist_dpo.fast import checkpointing

# Less recompute first: none, every 4th layer, every 2nd, all (plan.CHECKPOINT_CHOICES' order)
_RECOMPUTE_RANK = {every: i for i, every in enumerate(plan.CHECKPOINT_CHOICES)}


def decide(trainer, recipe, rt, lengths) -> tuple[int, str]:
    """(pairs per micro-batch to run, why); the recipe's own count when nothing is merged."""
    from dist_dpo.strategies import strategy_for

    a, setting = trainer.args, recipe.train.merge_micro_batches
    per_device, accum = a.per_device_train_batch_size, a.gradient_accumulation_steps
    merged = per_device * accum
    if accum == 1 or setting is False:
        return per_device, "as the recipe says"
    if not strategy_for(rt.strategy).merges_micro_batches:
        return per_device, "as the recipe says (DeepSpeed fixes the micro-batch in its config)"
    if setting is True:
        return merged, f"{merged} pairs x 1 (recipe: merge_micro_batches true)"
    gpu_gib = checkpointing.planning_gib(recipe, rt)
    if gpu_gib is None:
        return merged, f"{merged} pairs x 1 (auto: no GPU memory to plan for)"
    job = checkpointing.job_for(trainer, recipe, rt, lengths)
    fixed = {True: 1, False: 0}.get(recipe.train.gradient_checkpointing)  # None: auto
    if fixed is not None:
        ok = plan.estimate(replace(job, pairs=merged, checkpoint_every=fixed))["needs"] <= gpu_gib
    else:
        small = plan.least_checkpointing(job, gpu_gib)
        big = plan.least_checkpointing(replace(job, pairs=merged), gpu_gib)
        ok = big is not None and (small is None or
                                  _RECOMPUTE_RANK[big.checkpoint_every] <= _RECOMPUTE_RANK[small.checkpoint_every])
    if not ok:
        return per_device, f"{per_device} x {accum} as the recipe says ({merged} pairs at once need more memory)"
    return merged, f"{merged} pairs x 1 instead of {per_device} x {accum} (auto: fits {gpu_gib:.0f} GiB, same loss)"


def apply(trainer, pairs: int) -> None:
    """Run `pairs` per micro-batch, keeping the pairs per optimizer step (read by the Trainer at train())."""
    a = trainer.args
    step = a.per_device_train_batch_size * a.gradient_accumulation_steps
    if pairs == a.per_device_train_batch_size:
        return
    a.per_device_train_batch_size, a.gradient_accumulation_steps = pairs, step // pairs
    trainer._train_batch_size = a.train_batch_size  # the Trainer copied it at construction
    trainer.accelerator.gradient_accumulation_steps = a.gradient_accumulation_steps
