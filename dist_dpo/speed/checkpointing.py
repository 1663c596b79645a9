"""`gradient_checkpointing: auto`: recompute only as many decoder layers as the memory plan says this GPU needs.

Full checkpointing costs a third more compute per DPO step (the policy forward runs twice: 8N instead of 6N per
token), so it should be on only when the activations do not fit. transformers 5 can checkpoint every n-th layer
(`every_n_layers`); dist_dpo.plan picks the largest n (none at all if possible) whose predicted peak fits the GPU,
for the longest micro-batch of THIS dataset (length grouping puts it first, so an OOM shows at step 1).
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from dist_dpo import plan


def job_for(trainer, recipe, rt, lengths: tuple[list[int], list[int], list[int]]) -> plan.Job:
    from dist_dpo.modeling import uses_prepare_kbit
    from dist_dpo.strategies import planned_name, strategy_for

    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    cfg = model.config.get_text_config().to_dict()
    shape = plan.shape_from_config(cfg, (cfg.get("architectures") or ["Qwen2ForCausalLM"])[0])
    p, c, r = lengths
    widths = [a + max(b, d) for a, b, d in zip(p, c, r)]
    scored = sum(c) + sum(r)
    strategy = planned_name(rt.strategy, rt.offload)
    quant = "4bit" if recipe.model.load_in_4bit else "none"
    lo = recipe.lora
    return plan.Job(
        shape=shape, strategy=strategy, quant=quant, gpus=rt.world_size,
        pairs=trainer.args.per_device_train_batch_size, seq_len=max(widths), rows_per_pair=2,  # trl's rows: the upper bound
        completion_frac=scored / max(sum(widths) * 2, 1), lora_r=lo.lora_r if lo.use_peft else 0,
        targets=plan.ALL_TARGETS if lo.lora_target_modules == ["all-linear"] else tuple(lo.lora_target_modules),
        prepare_kbit=uses_prepare_kbit(recipe.model, rt, strategy_for(rt.strategy)),
        paged_optimizer="paged" in str(trainer.args.optim), liger=bool(trainer.args.use_liger_kernel),
        masked_attention=len(set(widths)) > 1 or statistics.pstdev(c + r) > 0,
    )


def planning_gib(recipe, rt) -> float | None:
    """The GPU memory plans are made for: this GPU's, or less with `gpu_memory_gib`; None on CPU."""
    gpu_gib = plan.gpu_memory_gib(rt.local_rank) if rt.device_type == "cuda" else None
    if gpu_gib is not None and recipe.train.gpu_memory_gib:
        gpu_gib = min(gpu_gib, recipe.train.gpu_memory_gib)
    return gpu_gib


def decide(trainer, recipe, rt, lengths) -> tuple[int, str]:
    """(every_n_layers, why); 0 = no checkpointing."""
    setting = recipe.train.gradient_checkpointing
    if setting is True:
        return 1, "every layer (recipe: true)"
    if setting is False:
        return 0, "off (recipe: false)"
    gpu_gib = planning_gib(recipe, rt)
    if gpu_gib is None:
        return 0, "auto: no GPU memory to save on CPU"
    job = job_for(trainer, recipe, rt, lengths)
    chosen = plan.least_checkpointing(job, gpu_gib)
    if chosen is None:
        need = plan.estimate(replace(job, checkpoint_every=1))["needs"]
        return 1, f"auto: even full checkpointing needs ~{need:.1f} of {gpu_gib:.0f} GiB (lower the batch size)"
    est = plan.estimate(chosen)
    label = {0: "none", 1: "every layer"}.get(chosen.checkpoint_every, f"every {chosen.checkpoint_every} layers")
    return chosen.checkpoint_every, (f"auto: {label} (planned peak {est['peak']:.1f} GiB allocated, ~{est['needs']:.1f}"
                                     f" of {gpu_gib:.0f} GiB with context, for {job.pairs} pairs x {job.seq_len} tokens)")


def apply(trainer, every: int, reentrant: bool) -> None:
    """Make the model checkpoint every `every`-th layer (0: none) for the whole run, whoever re-enables it."""
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    trainer.checkpoint_layers(every > 0)
    if every == 0:
        if model.is_gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.disable_input_require_grads()  # set for checkpointing by trl / peft: a backward into layer 0's input
        return
    original = type(model).gradient_checkpointing_enable

    # The Trainer enables checkpointing at train() and trl re-enables it after each eval reference forward, both
    # without every_n_layers (which would reset to all layers): pin it on this model.
    def enable(gradient_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        return original(model, gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, every_n_layers=every,
                        offload=offload)

    model.gradient_checkpointing_enable = enable
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
