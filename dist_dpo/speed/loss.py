"""The sigmoid DPO loss without trl's per-micro-step bookkeeping.

trl's `_compute_loss` (1.16) is the reference: the same log-probs, reference log-probs and loss, bit for bit the
same formula. What falls short in trl is around it: every micro-step it computes entropy, mean logits and top-1
over the vocabulary for the policy AND the reference, and turns ~15 metrics into Python floats through gathers
(~12 host syncs), though they are only read at logging steps. Here the per-step metrics stay on the device as sums,
the vocabulary-wide extras are computed on the micro-steps of logging steps only, and everything is gathered
once per log. The logged values mean what trl's mean (per micro-step global means, averaged by trl's `log`).

Any other configuration (other loss types, WPO weighting, f-divergences, LD-alpha, MoE aux loss) and evaluation
go to trl's `_compute_loss` unchanged, through the same forward.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

from dist_dpo.speed.head import EXTRAS

NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "ref_rows", "ref_rows_host"}
# Per micro-step sums, one row each, gathered once per log.
COLUMNS = ("pairs", "rewards_chosen", "rewards_rejected", "accuracies", "margins", "logps_chosen", "logps_rejected",
           "tokens", "has_extras", "entropy", "completion_tokens", "logits_chosen", "chosen_tokens",
           "logits_rejected", "rejected_tokens", "top1_chosen")


def unsupported_reason(trainer) -> str | None:
    if list(trainer.loss_types) != ["sigmoid"] or list(trainer.loss_weights) != [1.0]:
        return f"loss_type {trainer.loss_types}"
    if trainer.ld_alpha is not None or trainer.use_weighting or trainer.f_divergence_type != "reverse_kl":
        return "ld_alpha / use_weighting / f_divergence_type"
    if trainer.aux_loss_enabled or trainer._is_vision_dataset:
        return "MoE aux loss or vision data"
    return None


def is_logging_step(trainer) -> bool:
    """Whether the optimizer step now being accumulated will be logged (transformers' DefaultFlowCallback rule)."""
    step = trainer.state.global_step + 1
    every = trainer.state.logging_steps or trainer.args.logging_steps
    every = int(every) if every >= 1 else 1
    return step % every == 0 or (step == 1 and trainer.args.logging_first_step)


# model -> the PeftModel whose adapter is switched off for the reference forward (None: the reference is a model of
# its own). accelerate's is_peft_model / unwrap_model look up package metadata on every call (about a millisecond
# of host time each, several per micro-step): asked once per model object instead.
_PEFT_REFERENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def peft_reference(trainer, model=None):
    """The PeftModel to run with its adapter off as the reference of `model` (default: trainer.model), or None when
    trl keeps a reference model of its own."""
    from accelerate.utils import is_peft_model

    model = trainer.model if model is None else model
    if trainer.ref_model is not None:
        return None
    if model not in _PEFT_REFERENCE:
        _PEFT_REFERENCE[model] = trainer.accelerator.unwrap_model(model) if is_peft_model(model) else None
    return _PEFT_REFERENCE[model]


def reference_forward(trainer, model, **kwargs):
    """trl's reference forward (1.16 `_compute_loss`): the policy with its adapter off (or its "ref" adapter), or
    the reference model, without gradients and without the policy's recompute bookkeeping."""
    from trl.trainer.utils import use_adapter

    with torch.no_grad(), checkpointing_paused(model):
        unwrapped = peft_reference(trainer, model)
        if unwrapped is not None:
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                return model(**kwargs)
        return trainer.ref_model(**kwargs)


@contextlib.contextmanager
def checkpointing_paused(model):
    """No recompute bookkeeping for the no-grad reference forward. trl toggles it through
    gradient_checkpointing_disable/enable, which would reset a per-layer (every n-th layer) choice; this keeps it."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def compute_loss(trainer, model, inputs, num_items_in_batch=None):
    """A training micro-step's loss (DistDPOTrainer.compute_loss calls it where `trainer.speed.own_loss`; trl's
    compute_loss does evaluation and `return_outputs`)."""
    completion_mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
    kwargs["use_cache"] = False
    extras = EXTRAS if is_logging_step(trainer) else ()
    out = model(**kwargs, labels=labels, fused_lm_head=True, speed_outputs=extras)
    chosen_logps, rejected_logps = out.log_probs.sum(dim=1).chunk(2, dim=0)

    cache = trainer.speed.ref_cache
    cached = cache.lookup(inputs) if cache is not None else None
    if trainer.precompute_ref_logps:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    elif cached is not None:  # the values an earlier epoch's reference forward gave for these very pairs
        ref_chosen, ref_rejected = cached
    else:
        ref = reference_forward(trainer, trainer.model, **kwargs, labels=labels, fused_lm_head=True, speed_outputs=())
        ref_chosen, ref_rejected = ref.log_probs.sum(dim=1).chunk(2, dim=0)
        if cache is not None:
            cache.store(inputs, ref_chosen, ref_rejected)

    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    losses = -F.logsigmoid(trainer.beta * (chosen_logratios - rejected_logratios))
    nominal = trainer.speed.pairs_per_rank
    # Ranks hold unequal shares of a step under cost-balanced batches (batching.rebalanced_grouped_sampler): the sum
    # over the nominal count makes the average over ranks the mean over all the step's pairs, as with equal batches.
    loss = losses.sum() / nominal if nominal else losses.mean()

    with torch.no_grad():
        _record(trainer, inputs, out, chosen_logps, rejected_logps, trainer.beta * chosen_logratios,
                trainer.beta * rejected_logratios, completion_mask[:, 1:], bool(extras))
    return loss


def _record(trainer, inputs, out, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, shift_mask,
            with_extras: bool) -> None:
    zero = chosen_logps.new_zeros(())
    chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
    # torch.full, not new_tensor: a Python number copied to the GPU waits for the stream (the one host sync per
    # micro-step the sync probe found, benchmarks/sync_probe.py); a fill kernel does not
    row = [torch.full((), chosen_rewards.numel(), dtype=chosen_rewards.dtype, device=chosen_rewards.device),
           chosen_rewards.sum(), rejected_rewards.sum(),
           (chosen_rewards > rejected_rewards).float().sum(), (chosen_rewards - rejected_rewards).sum(),
           chosen_logps.sum(), rejected_logps.sum(), inputs["attention_mask"].sum().float()]
    if with_extras:
        m = shift_mask.float()
        mean_chosen, mean_rejected = out.mean_logits.chunk(2, dim=0)
        top1_chosen, _ = out.is_top1.chunk(2, dim=0)
        row += [zero + 1, (out.entropy * m).sum(), m.sum(), (mean_chosen * chosen_mask).sum(), chosen_mask.sum(),
                (mean_rejected * rejected_mask).sum(), rejected_mask.sum(), (top1_chosen & chosen_mask.bool()).sum()]
    else:
        row += [zero] * 8
    trainer.speed.pending.append(torch.stack([v.float().detach() for v in row]))


def flush_metrics(trainer) -> None:
    """Every rank, at a train log (a point every rank reaches): one gather, one host copy, then trl's metric lists
    get the values its own `_compute_loss` would have appended."""
    if not trainer.speed.pending:
        return
    local = torch.stack(trainer.speed.pending)  # [micro-steps, columns]
    trainer.speed.pending.clear()
    steps = local.size(0)
    sums = trainer.accelerator.gather(local).view(-1, steps, len(COLUMNS)).sum(0).cpu().tolist()
    metrics = trainer._metrics["train"]
    for s in sums:
        c = dict(zip(COLUMNS, s))
        n = max(c["pairs"], 1.0)
        metrics["rewards/chosen"].append(c["rewards_chosen"] / n)
        metrics["rewards/rejected"].append(c["rewards_rejected"] / n)
        metrics["rewards/accuracies"].append(c["accuracies"] / n)
        metrics["rewards/margins"].append(c["margins"] / n)
        metrics["logps/chosen"].append(c["logps_chosen"] / n)
        metrics["logps/rejected"].append(c["logps_rejected"] / n)
        trainer._total_train_tokens += int(c["tokens"]) // trainer._tp_size
        if c["has_extras"]:
            def ratio(a: str, b: str, c=c) -> float:
                return c[a] / c[b] if c[b] > 0 else 0.0  # trl's convention for zero tokens

            metrics["entropy"].append(ratio("entropy", "completion_tokens"))
            metrics["logits/chosen"].append(ratio("logits_chosen", "chosen_tokens"))
            metrics["logits/rejected"].append(ratio("logits_rejected", "rejected_tokens"))
            metrics["mean_token_accuracy"].append(ratio("top1_chosen", "chosen_tokens"))
    metrics["num_tokens"] = [trainer._total_train_tokens]
