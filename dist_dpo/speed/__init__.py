"""dist-dpo's speed path over trl's DPOTrainer: `apply(trainer, recipe, rt)` right after the trainer is built.

Each piece computes the same loss as trl on the same pairs (tests/test_speed.py checks loss and gradients against
trl's `_compute_loss` on one batch); what changes is how much work a step does:
  batching.py       pairs grouped by length (less padding), split across ranks by cost on several GPUs; one row
                    per pair sharing the prompt when cheaper
  head.py           trl's fused log-prob head, fed those rows, computing logging-only outputs only when asked
  logprob.py        that head for the policy's training forward: the hidden-state gradient taken in the forward
                    (one vocabulary matmul fewer than trl's recompute in the backward)
  loss.py           sigmoid DPO without per-micro-step host syncs; logging extras on logging steps only
  checkpointing.py  `gradient_checkpointing: auto`: the least recompute the memory plan says fits
  microbatch.py     `merge_micro_batches: auto`: 4 x 4 accumulation as 16 x 1 when that fits (same loss)
  attention.py      packed shared-prompt rows through flash attention's variable-length kernel (no mask)
  lora_inputs.py    LoRA layers skip peft's fp32 copy of their input where autocast recasts it anyway
  rms_norm.py       the decoder's RMSNorm as torch's one fused op
  fused_qkv.py      each layer's q/k/v projections as one matmul where weights are whole
  compiled.py       decoder layers through torch.compile (an A/B switch until measured)
The benchmark measures each piece against its alternative through dist_dpo/ab_switches.py.
Recipe keys: fast_path, group_by_length, prefix_sharing, packed_rows, gradient_checkpointing (config.py documents them);
liger_kernels is a DPOConfig flag (dpo_args.py).
"""

from __future__ import annotations

from dist_dpo import ab_switches
from dist_dpo.architectures import PIECES, family_of
from dist_dpo.dpo_args import use_liger_kernels
from dist_dpo.errors import UserError
from dist_dpo.speed import (attention, batching, checkpointing, compiled, fused_qkv, head, lora_inputs, loss,
                           microbatch, ref_cache, rms_norm, self_check, switch)
from dist_dpo.logs import get_logger

MOE_AUX = "the MoE router's auxiliary loss averages over every token of trl's rows"
# A piece the recipe forces on (`true`) that cannot run: its recipe key and what cannot be done, for one wording
# before anything loads (the preflight) and after the model is built (apply).
FORCED = {"shared_rows": ("prefix_sharing", "the prompt cannot be shared here"),
          "packed_rows": ("packed_rows", "packed rows cannot run here"),
          "reference": ("ref_logps_cache", "the reference log-probs cannot be kept here")}


def refuse_forced(piece: str, why: str) -> UserError:
    key, what = FORCED[piece]
    return UserError(f"{key}: true, but {what}: {why}. Set {key}: auto")


def layout_reasons(family, config, attn_implementation: str, aux_loss: bool) -> dict[str, str | None]:
    """Why each of the speed path's row layouts stays off for a model (None: it can run), from what is known before
    any weight loads: the architecture table, the MoE router's auxiliary loss, the attention kernel and the config.
    The preflight refuses a forced layout and the speed-path line says why with these same words; whether the GPU
    serves the packed rows' kernel is asked once the model is on it (attention.packed_rows_reason)."""
    off = family.reason("head")
    aux = MOE_AUX if aux_loss else None
    return {"shared_rows": off or family.reason("shared_rows") or aux or head.mask_reason(attn_implementation),
            "packed_rows": off or family.reason("packed_rows") or aux or
            attention.config_reason(config, attn_implementation)}


def aux_loss_on(config, coef: float | None = None) -> bool:
    """Whether trl will add the MoE router's auxiliary loss, as its DPOTrainer decides aux_loss_enabled (1.16): the
    config declares router logits and the coefficient (`coef`, the recipe's router_aux_loss_coef, else the config's)
    is not 0."""
    cfg = config.get_text_config()
    coef = getattr(cfg, "router_aux_loss_coef", 0.0) if coef is None else coef
    return hasattr(cfg, "output_router_logits") and coef != 0.0


def apply(trainer, recipe, rt) -> dict:
    """Switch `trainer` (a DistDPOTrainer, not yet training) to dist-dpo's speed path as the recipe says: the model's
    pieces and collator here, the trainer's hooks through `trainer.speed` (dist_dpo/trainer.py).
    Returns what was decided, also logged once by rank 0."""
    import datasets

    from dist_dpo.strategies import strategy_for

    t = recipe.train
    check_switches()
    if trainer.speed.applied:
        return trainer.speed.report
    trainer.speed.applied = True
    if not isinstance(trainer.train_dataset, datasets.Dataset):  # streaming: no lengths to plan or group by
        report = trainer.speed.report
        report["speed path"] = "off (streaming dataset)"
        _log(rt, report)
        return report
    lengths = batching.pair_lengths(trainer.train_dataset, trainer.args.max_length)
    report = trainer.speed.report
    if t.fast_path:  # before checkpointing: that plans for the micro-batch that will run
        pairs, report["micro-batches"] = microbatch.decide(trainer, recipe, rt, lengths)
        trainer.run_micro_batches_of(pairs)
    every, why = checkpointing.decide(trainer, recipe, rt, lengths)
    checkpointing.apply(trainer, every, strategy_for(rt.strategy).checkpointing_reentrant)
    report["checkpointing"] = why
    if not t.fast_path:
        report["fast_path"] = "off (plain trl)"
        _log(rt, report)
        return report

    sharing = {True: "true", False: "false"}.get(t.prefix_sharing, "auto")
    if t.group_by_length:
        p, c, r = lengths
        keys = [a + b + d for a, b, d in zip(p, c, r)] if sharing != "false" else \
            [a + max(b, d) for a, b, d in zip(p, c, r)]
        # the global batch: the grouped order is then the same on any number of processes (a resume on another count)
        batch = trainer.args.train_batch_size * trainer.args.gradient_accumulation_steps * trainer.args.world_size
        seed = trainer.args.data_seed if trainer.args.data_seed is not None else trainer.args.seed

        def grouped_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            if ds is None or len(ds) != len(keys):
                return None  # not the training set: trl's sampler
            a = self.args
            if self.speed.pairs_per_rank:  # set below with the speed path's loss, which weights by it
                return batching.rebalanced_grouped_sampler(keys, a.per_device_train_batch_size,
                                                           a.gradient_accumulation_steps, a.world_size,
                                                           a.process_index, seed, a.dataloader_drop_last)
            return batching.length_grouped_sampler(keys, batch, seed, a.per_device_train_batch_size, a.world_size)

        trainer.speed.sampler = grouped_sampler
        report["batches"] = "grouped by length"

    base = _head_model(trainer)
    family = family_of(base)
    report["family"] = family.name
    # piece -> why it stays off here: the architecture table's reason (every one, also for pieces that another one
    # being off already rules out), or this run's. liger only where trl would apply it.
    wants_liger = use_liger_kernels(t, trainer.args.device.type == "cuda")
    off = {p: family.reason(p) for p in PIECES if family.reason(p) and (p != "liger" or wants_liger)}

    def allowed(piece: str, run_reason: str | None = None) -> bool:
        why = family.reason(piece) or run_reason
        if why:
            off[piece] = why
        return why is None

    if not allowed("head", head.unsupported_reason(base)):
        report["head"] = "trl's"
        return _finish(rt, report, off)
    switch.reset()
    state = head.HeadState(head.EXTRAS + (("log_sum_sq_probs",) if trainer.use_weighting else ()))
    for m in _with_reference(trainer, base):
        head.install(m, state)

    # The MoE router's auxiliary loss averages over every token of trl's rows: other rows give another number.
    layouts = layout_reasons(family, base.config, base.config._attn_implementation, trainer.aux_loss_enabled)
    if sharing != "false" and not allowed("shared_rows", layouts["shared_rows"]):
        if t.prefix_sharing is True:
            raise refuse_forced("shared_rows", off["shared_rows"])
        sharing = "false"
    not_packed = _not_packed_because(trainer, base, t, sharing, layouts["packed_rows"])
    if not_packed is not None and sharing != "false" and not_packed != "off":
        off["packed_rows"] = not_packed
    trainer.data_collator = batching.SharedPromptCollator(
        trainer.data_collator, mode=sharing, cost=batching.LayoutCost.for_config(base.config.get_text_config()),
        packed=not_packed is None)
    report["prompt"] = {"auto": "shared by chosen and rejected when cheaper", "true": "shared by chosen and rejected",
                        "false": "computed twice (trl's rows)"}[sharing]
    if sharing != "false":
        report["prompt"] += ", pairs packed in one row (flash, variable length)" if not_packed is None else \
            ", padded rows with a mask"

    compile_layers = ab_switches.value("COMPILE") == "layers"
    if compile_layers and strategy_for(rt.strategy).engine not in ("none", "ddp"):  # sharded weights: not proven
        compile_layers = False
        report["decoder layers"] = f"not compiled (compiled layers are proven without sharding, not under {rt.strategy})"
    # q/k/v as one matmul where every rank holds whole weights (the strategy table); compiled layers leave the three
    # matmuls to the compiler (compiled.py)
    if allowed("fused_qkv", None if strategy_for(rt.strategy).fuses_qkv else f"weights sharded under {rt.strategy}") \
            and ab_switches.flag("FUSED_QKV") and not compile_layers:
        n = [fused_qkv.install(m) for m in _with_reference(trainer, base)][0]
        if n:
            report["q/k/v"] = f"one matmul ({n} layers)"

    # liger keeps SwiGLU, RoPE
    if allowed("torch_norm", rms_norm.off_reason(family)) and rms_norm.planned(t, family):
        # liger's RMSNorm was left out for it when the training arguments were built (dpo_args.liger_settings)
        n = [rms_norm.install(m, family.norm_classes) for m in _with_reference(trainer, base)][0]
        report["RMSNorm"] = f"torch's fused rms_norm ({n} norms)" if n else \
            f"the model's own (no {'/'.join(family.norm_classes)} module found)"

    if allowed("lora_cast") and not ab_switches.flag("LORA_INPUT_CAST"):
        n = lora_inputs.install(trainer.model)  # inert without autocast: fp32 runs, DeepSpeed's bf16 engine
        a = trainer.args
        if n and (a.bf16 or a.fp16) and not getattr(trainer, "is_deepspeed_enabled", False):
            report["LoRA inputs"] = f"kept in the compute dtype under autocast ({n} layers; peft copies them to fp32)"

    own_loss_off = loss.unsupported_reason(trainer)  # why trl computes the loss (None: the speed path does)
    if own_loss_off is None:
        trainer.speed.own_loss = True
        report["metrics"] = "on device, gathered once per log; entropy/logits/top-1 on logging steps only"
        if t.group_by_length and t.balance_ranks and trainer.args.world_size > 1:
            trainer.speed.pairs_per_rank = trainer.args.per_device_train_batch_size
            report["batches"] += ", split across ranks by cost (transformers' BatchRebalanceSampler)"
    else:
        report["metrics"] = f"trl's per micro-step ({own_loss_off})"
    _keep_reference(trainer, recipe, rt, base, own_loss_off, report)
    if compile_layers:  # last: the graphs are traced through every piece installed above
        n = [compiled.install(m) for m in _with_reference(trainer, base)][0]
        report["decoder layers"] = f"compiled ({n} layers, torch.compile, dynamic shapes)"
    if trainer.args.use_liger_kernel:  # trl patches the model with them when train() starts
        kept = {k for k, v in (trainer.args.liger_kernel_config or {}).items() if v is False}
        report["liger"] = "kernels on" + (f" (not {', '.join(sorted(kept))})" if kept else "")
    self_check.install(trainer, recipe, rt, strategy_for(rt.strategy))
    return _finish(rt, report, off)


def _keep_reference(trainer, recipe, rt, base, own_loss_off: str | None, report: dict) -> None:
    """Reference log-probs kept across epochs where the reference is fixed (ref_cache.py)."""
    from dist_dpo.strategies import strategy_for

    why = ref_cache.unsupported_reason(trainer, recipe, base) if own_loss_off is None else f"trl's loss: {own_loss_off}"
    if why is not None:
        if recipe.train.ref_logps_cache is True:
            raise refuse_forced("reference", why)
        report["reference"] = f"computed every step ({why})"
        return
    trainer.train_dataset = ref_cache.add_rows(trainer.train_dataset)
    # Under a wrapper whose forward may talk to the other ranks (FSDP2 and ZeRO-3 gather weights in it; a DeepSpeed
    # engine is left no room to differ), every rank must run the reference forward or none: only a complete cache is
    # read there. Plain processes and DDP (no collective in a no-grad forward) decide per micro-batch.
    per_batch = strategy_for(rt.strategy).engine in ("none", "ddp")
    cache = ref_cache.RefLogpsCache(len(trainer.train_dataset), trainer.args.device, per_batch,
                                    ref_cache.key_parts(trainer, base), trainer.train_dataset)
    trainer.speed.ref_cache = cache
    trainer.data_collator.ref_rows = True
    trainer.add_callback(ref_cache.share_at_epoch_end(cache))
    report["reference"] = "log-probs kept from the first epoch: later epochs and resumes skip the reference forward"


def _finish(rt, report: dict, off: dict) -> dict:
    if off:
        report["off"] = "; ".join(f"{piece}: {why}" for piece, why in off.items())
    _log(rt, report)
    return report


def check_switches() -> None:
    """The benchmark's A/B switches and the test-only break switch: a mistyped one stops the run with one line (a
    UserError) before any heavy work. train.py calls it before the process group; apply again."""
    ab_switches.check()
    switch.check_break()


def _not_packed_because(trainer, base, t, sharing: str, config_reason: str | None) -> str | None:
    """Why the shared rows stay padded and masked; None: they go packed (attention.py, installed here).
    `config_reason`: layout_reasons' word for the packed rows."""
    import torch

    if sharing == "false" or t.packed_rows is False:
        return "off"
    a = trainer.args
    dtype = torch.bfloat16 if a.bf16 else torch.float16 if a.fp16 else base.get_input_embeddings().weight.dtype
    why = config_reason or attention.packed_rows_reason(base, a.device, dtype)
    if why and t.packed_rows is True:
        raise refuse_forced("packed_rows", why)
    if why:
        return why
    for m in _with_reference(trainer, base):
        attention.install(m)
    return None


def _with_reference(trainer, base) -> list:
    """The models a piece of the speed path goes on: the policy's base, and under full fine-tuning the reference,
    a model of its own (already wrapped for inference: a DeepSpeed engine's .module)."""
    ref = trainer.ref_model
    return [base] if ref is None else [base, getattr(ref, "module", ref)]


def _head_model(trainer):
    """The bare CausalLM trl patched its fused head onto (under PEFT, the base model)."""
    m = trainer.model
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def _log(rt, report: dict) -> None:
    if rt.is_main:
        get_logger().info("speed path: %s", " | ".join(f"{k}: {v}" for k, v in report.items()))
