"""Recipe + runtime + strategy -> trl `DPOConfig`. The one place where training arguments are decided.

It must run BEFORE the model is loaded: under ZeRO-3 the DPOConfig registers DeepSpeed's config so that
`from_pretrained` partitions weights while loading instead of materializing the full model on every rank.
"""

from __future__ import annotations

import os

import torch

from dist_dpo.config import Recipe
from dist_dpo.errors import UserError
from dist_dpo.modeling import resolve_dtype
from dist_dpo.runtime import Runtime
from dist_dpo.strategies import Strategy


def build_dpo_config(r: Recipe, rt: Runtime, strat: Strategy, model_type: str | None = None):
    """`model_type`: the model's (its config's text part), once the preflight has read it; liger's kernels are
    then decided for its family (before it is known, they are left as the recipe asks)."""
    from trl import DPOConfig

    t = r.train
    dtype = resolve_dtype(r.model, rt)
    on_gpu = rt.device_type == "cuda"
    evaluate = t.eval_steps > 0
    kwargs = dict(
        output_dir=t.output_dir,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        beta=t.beta,
        loss_type=[t.loss_type],
        max_length=t.max_length,
        # auto: on until dist_dpo.speed.apply has planned it against the tokenized data (trl and peft set up the
        # model for checkpointing at build time; apply turns it down or off)
        gradient_checkpointing=t.gradient_checkpointing is not False,
        gradient_checkpointing_kwargs={"use_reentrant": strat.checkpointing_reentrant},
        ddp_find_unused_parameters=strat.ddp_find_unused_parameters,
        ddp_broadcast_buffers=strat.ddp_broadcast_buffers,
        # batches are pinned (dataloader_pin_memory): copy them to the GPU without making the host wait for the
        # previous step to finish, so the next step's launches overlap its tail
        accelerator_config={"non_blocking": on_gpu},
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps if evaluate else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[] if t.report_to == ["none"] else t.report_to,
        run_name=t.run_name,
        deepspeed=t.deepspeed if rt.launcher != "accelerate" else None,  # accelerate passes its own plugin
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,  # also makes accelerate pick gloo for a multi-process CPU run
        dataloader_num_workers=t.dataloader_num_workers,
        ddp_timeout=t.collective_timeout_s,
        log_level="warning" if rt.is_main else "error",  # our run header replaces transformers' info dump
        log_level_replica="error",
        disable_tqdm=not rt.is_main,
        save_only_model=False,  # optimizer/scheduler/RNG in every checkpoint: resume must not lose state
        # The Trainer checks every micro-step's loss for NaN/Inf on the host (a device sync) only to filter the
        # logged average; the speed path logs a NaN as a NaN instead.
        logging_nan_inf_filter=not t.fast_path,
    )
    kwargs.update(liger_settings(t, on_gpu, model_type))
    kwargs.update(t.dpo_extra)
    if "wandb" in t.report_to:  # read by transformers' WandbCallback (rank 0): offline runs land in the run dir
        os.environ.setdefault("WANDB_DIR", os.path.abspath(os.path.expanduser(t.output_dir)))
        os.environ.setdefault("WANDB_PROJECT", "dist-dpo")
    try:
        return DPOConfig(**kwargs)
    except ValueError as e:  # transformers/trl check names (optim, scheduler) and combinations here, on every rank
        raise UserError(f"invalid training arguments: {str(e).strip().splitlines()[0][:300]}") from None


def liger_settings(t, on_gpu: bool, model_type: str | None) -> dict:
    """use_liger_kernel and liger_kernel_config: liger's layer kernels where the recipe asks and (for `auto`) the
    architecture table has no reason against them; liger's RMSNorm left out where the speed path runs the family's
    norms as torch's fused op (speed/rms_norm.py). Decided here, before the trainer exists: trl applies them at
    train()."""
    from dist_dpo.architectures import family_for
    from dist_dpo.speed import rms_norm

    use = use_liger_kernels(t, on_gpu)
    if not use or model_type is None:
        return {"use_liger_kernel": use}
    family = family_for(model_type)
    if t.liger_kernels == "auto" and family.reason("liger"):
        return {"use_liger_kernel": False}
    if rms_norm.planned(t, family):
        return {"use_liger_kernel": True, "liger_kernel_config": {"rms_norm": False}}
    return {"use_liger_kernel": True}


def use_liger_kernels(t, on_gpu: bool) -> bool:
    """liger's layer kernels (trl applies them at train(); its fused LM head stays trl's)."""
    import importlib.util

    installed = importlib.util.find_spec("liger_kernel") is not None
    if t.liger_kernels is True and not installed:
        raise UserError("liger_kernels: true but liger-kernel is not installed: pip install liger-kernel, or set it "
                        "to auto / false")
    if t.liger_kernels is True:
        return True
    return t.liger_kernels == "auto" and t.fast_path and on_gpu and installed
