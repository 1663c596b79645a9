"""`merge_micro_batches: auto`: the recipe's 4 pairs x 4 accumulation run as 16 pairs x 1 when they fit.

Gradient accumulation exists for memory. A recipe written for a small card (the tutorial's 4 x 4) leaves a large one
running four small, poorly filled micro-steps where one full one computes the same thing: trl's loss is a mean per
micro-batch and the Trainer averages the micro-batches, so one micro-batch of all 16 pairs gives the same loss and
gradient (up to float rounding). The tutorial's 4 x 4 as 16 x 1 on one H100: 24.3 k -> 33.2 k tokens/s.
The memory plan decides: merged only when the larger batch needs no more gradient checkpointing than the recipe's.
And only up to a micro-batch that already fills the GPU (MERGE_UP_TO_TOKENS): on an H200 the 1.5B shape's 8 x 2 at 2048 tokens run as 16 x 1 fell from 53 % to 46 % MFU (steady) and doubled its peak memory
(52 -> 102 GiB). Merging k of the recipe's micro-batches, k a divisor of the accumulation, keeps the rest accumulated.
The pairs of each optimizer step stay the same (the grouped order is drawn for the whole step either way).
"""

from __future__ import annotations

from dataclasses import replace

from dist_dpo import plan
from dist_dpo.speed import checkpointing

# Tokens per micro-batch (trl's two rows per pair, the data's mean width) up to which merging still pays: the
# tutorial's 4 x 512 (4 k tokens, merged 4x: 16 k) gained x1.37 on an H100; 8 x 2048 (32 k) lost.
MERGE_UP_TO_TOKENS = 16384

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
    p, c, r = lengths
    mean_width = sum(x + max(y, z) for x, y, z in zip(p, c, r)) / max(len(p), 1)
    tokens = per_device * 2 * mean_width
    factors = [k for k in range(accum, 1, -1) if accum % k == 0 and k * tokens <= MERGE_UP_TO_TOKENS]
    if not factors:
        return per_device, (f"{per_device} x {accum} as the recipe says (~{tokens / 1024:.0f} k tokens per micro-batch "
                            "already fill the GPU)")
    gpu_gib = checkpointing.planning_gib(recipe, rt)
    if gpu_gib is None:
        k = factors[0]
        return per_device * k, f"{per_device * k} pairs x {accum // k} (auto: no GPU memory to plan for)"
    job = checkpointing.job_for(trainer, recipe, rt, lengths)
    fixed = {True: 1, False: 0}.get(recipe.train.gradient_checkpointing)  # None: auto
    small = plan.least_checkpointing(job, gpu_gib) if fixed is None else None
    for k in factors:
        bigger = replace(job, pairs=per_device * k)
        if fixed is not None:
            ok = plan.estimate(replace(bigger, checkpoint_every=fixed))["needs"] <= gpu_gib
        else:
            big = plan.least_checkpointing(bigger, gpu_gib)
            ok = big is not None and (small is None or
                                      _RECOMPUTE_RANK[big.checkpoint_every] <= _RECOMPUTE_RANK[small.checkpoint_every])
        if ok:
            return per_device * k, (f"{per_device * k} pairs x {accum // k} instead of {per_device} x {accum} "
                                    f"(auto: fits {gpu_gib:.0f} GiB, same loss)")
    least = per_device * factors[-1]
    return per_device, f"{per_device} x {accum} as the recipe says ({least} pairs at once need more memory)"


