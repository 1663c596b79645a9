"""Before the first step: the speed path against trl's exact path, on this run's own model and data.

The architecture table (dist_dpo/architectures.py) lets a piece run only on the families where it was proven; this
check covers what no table can: the user's own checkpoint, config overrides, a new library version. On the first
training micro-step, every rank takes a few pairs of the training set (its own), runs them through the speed path and
through trl's forward on trl's rows (switch.paused: the same modules, every piece on the model's own code), and
compares the policy and reference log-probs of each pair and the gradient of the DPO loss in the LoRA weights. The
verdict is the same on every rank (one all-reduce). On disagreement the pieces are tried one by one to name the one
at fault; then one line, every piece off, and training goes on through trl's own compute_loss. A piece the recipe
forced (`prefix_sharing: true`, `packed_rows: true`) stops the run instead (exit 2).

What it compares is the forward each piece changes. The DPO loss formula over those log-probs (loss.py) is the
same for every family and is proven against trl's `_compute_loss` by tests/test_speed.py.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from dist_dpo.speed import switch
from dist_dpo.logs import get_logger

PAIRS = 2  # per rank: a slice small enough to leave the step's peak memory alone
CANDIDATE_ROWS = 16  # the pairs are the shortest of this many of the rank's rows
# Bounds on the relative differences, by compute dtype. fp32: the same numbers up to summation order (the tests see
# <= 1e-6). bf16/fp16: other kernels and layouts round differently; a per-pair sum of log-probs agrees to ~1e-3, a
# gradient vector to a few %. A broken piece is off by O(1): a zero gradient, a row reading the wrong tokens.
BOUNDS = {torch.float32: {"logps": 1e-4, "grads": 1e-3}, torch.bfloat16: {"logps": 1e-2, "grads": 0.2},
          torch.float16: {"logps": 1e-2, "grads": 0.2}}
CANDIDATES = ("shared_rows", "packed_rows", "fused_qkv", "torch_norm", "lora_cast")  # tried alone, then the head
FORCEABLE = {"shared_rows": "prefix_sharing", "packed_rows": "packed_rows"}


_RUNNING = [False]


def running() -> bool:
    """Whether the self-check is collating or computing now (a token counter must not count its pairs)."""
    return _RUNNING[0]


def install(trainer, recipe, rt, strategy) -> None:
    """Run the check on the first training call of `trainer.compute_loss` (the model is wrapped and sharded then):
    DistDPOTrainer.compute_loss calls `trainer.speed.self_check` once."""
    if not recipe.train.speed_self_check:
        return

    def check(trainer, model) -> dict:
        _RUNNING[0] = True
        try:
            verdict = run(trainer, model, recipe, rt, strategy)
        finally:
            _RUNNING[0] = False
        if not verdict["agrees"]:
            turn_off(trainer)
        return verdict

    trainer.speed.self_check = check


def turn_off(trainer) -> None:
    """Every piece off for the rest of the run: trl's compute_loss, trl's rows, the model's own modules."""
    switch.turn_off()
    collator = trainer.data_collator
    if hasattr(collator, "mode"):  # the DataLoader holds this very object: it stops building shared rows
        collator.mode, collator.packed = "false", False
    trainer.speed.own_loss = False


def run(trainer, model, recipe, rt, strategy) -> dict:
    start = time.perf_counter()
    module = trainer.accelerator.unwrap_model(model)
    batch = _pairs(trainer, rt)
    grads = strategy.self_check_gradients and any(p.requires_grad for p in module.parameters())
    bounds = BOUNDS[_compute_dtype(trainer, module)]

    timings = {}

    def differences(paused=()):
        with switch.paused(paused):
            fast = _timed(timings, "speed_path_s", _measure, trainer, module, batch, grads)
        return _worst(_compare(fast, reference), trainer)

    # Dropout off (eval mode): both paths must see the same function, and the check must draw no random numbers,
    # or the training after it (and a resumed run, which checks again) would get other dropout masks than a run
    # without it. fork_rng puts every generator back as it was.
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and trainer.args.device.type == "cuda" else []
    was_training = module.training
    with torch.random.fork_rng(devices=cuda):
        module.eval()
        try:
            with switch.paused():
                reference = _timed(timings, "trl_path_s", _measure, trainer, module, batch, grads)
            diff = differences()
            agrees = all(diff[k] <= bounds[k] for k in diff)
            culprit = None
            if not agrees:
                for piece in CANDIDATES:  # every rank tries the same pieces in the same order (same collectives)
                    d = differences((piece,))
                    if all(d[k] <= bounds[k] for k in d):
                        culprit = piece
                        break
        finally:
            module.train(was_training)
    seconds = time.perf_counter() - start
    shown = ", ".join(f"{k} {diff[k]:.2g} (bound {bounds[k]:g})" for k in diff)
    log = get_logger()
    verdict = {"agrees": agrees, "differences": diff, "bounds": {k: bounds[k] for k in diff}, "seconds": seconds,
               "culprit": culprit, "pairs_per_rank": PAIRS, "tokens_per_rank": int(batch["attention_mask"].sum()),
               **{k: round(v, 4) for k, v in timings.items()}}
    if agrees:
        if rt.is_main:
            log.info("speed-path self-check: agrees with trl on %d pairs per rank (%s%s) in %.1f s (trl's path %.1f s, "
                     "the speed path %.1f s)", verdict["pairs_per_rank"], shown,
                     "" if grads else "; log-probs only under " + rt.strategy, seconds,
                     timings.get("trl_path_s", 0.0), timings.get("speed_path_s", 0.0))
        return verdict
    piece = culprit or "the log-prob head (or several pieces together)"
    forced = FORCEABLE.get(culprit)
    if forced and getattr(recipe.train, forced) is True:
        from dist_dpo.errors import UserError

        raise UserError(f"speed-path self-check: {piece} disagrees with trl on this model ({shown}), and the recipe "
                        f"forces it ({forced}: true): set {forced}: auto")
    if rt.is_main:
        log.warning("speed-path self-check: %s disagrees with trl on this model (%s): training on trl's exact path",
                    piece, shown)
    return verdict


def _timed(timings: dict, key: str, fn, *args):
    """fn(*args), its seconds added to timings[key] (the device's queue drained at both ends)."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    start = time.perf_counter()
    result = fn(*args)
    synchronize()
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
    return result


def _pairs(trainer, rt) -> dict:
    """PAIRS pairs of the training set, this rank's own, collated as the speed path collates them (trl's keys plus
    the shared-row layout), on the device.

    The shortest PAIRS of this rank's first CANDIDATE_ROWS rows: on a GPU the check costs what its kernel launches
    cost, on a CPU what its tokens cost. (Sliding windows longer than these pairs go unexercised here; the family
    tests compare them with trl.) A collator that chooses its layout per batch ("auto") builds the shared
    layout here: the run may use it, so the check must see it."""
    from accelerate.utils import send_to_device

    ds = trainer.train_dataset
    candidates = [(rt.rank * CANDIDATE_ROWS + i) % len(ds) for i in range(min(CANDIDATE_ROWS, len(ds)))]
    rows = [ds[i] for i in candidates]
    size = [sum(len(r.get(k) or ()) for k in ("prompt_ids", "chosen_ids", "rejected_ids")) for r in rows]
    rows = [rows[i] for i in sorted(sorted(range(len(rows)), key=size.__getitem__)[:PAIRS])]
    collator = trainer.data_collator
    if dataclasses.is_dataclass(collator):  # a fresh copy: the run's token counters stay the run's
        collator = dataclasses.replace(collator, tokens_real=0, tokens_run=0,
                                       batches={"packed": 0, "shared": 0, "pairs": 0},
                                       **({"mode": "true"} if getattr(collator, "mode", None) == "auto" else {}))
    return send_to_device(collator(rows), trainer.args.device)


def _measure(trainer, module, batch, grads: bool) -> dict:
    """Policy and reference log-probs per pair, and the DPO loss's gradient in the trainable weights."""
    from dist_dpo.speed.loss import NON_MODEL_KEYS, reference_forward

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    kwargs["use_cache"] = False
    with torch.set_grad_enabled(grads):
        out = module(**kwargs, labels=labels, fused_lm_head=True, speed_outputs=())
        chosen, rejected = out.log_probs.float().sum(dim=1).chunk(2)
    ref = reference_forward(trainer, module, **kwargs, labels=labels, fused_lm_head=True, speed_outputs=())
    ref_chosen, ref_rejected = ref.log_probs.float().sum(dim=1).chunk(2)
    result = {"logps": torch.stack([chosen, rejected, ref_chosen, ref_rejected]).detach()}
    if grads:
        params = [p for p in module.parameters() if p.requires_grad]
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        loss = -F.logsigmoid(trainer.beta * margin).mean()
        if getattr(out, "aux_loss", None) is not None and trainer.aux_loss_enabled:
            loss = loss + trainer.router_aux_loss_coef * out.aux_loss
        g = torch.autograd.grad(loss, params, allow_unused=True)
        result["grads"] = torch.cat([(x if x is not None else torch.zeros_like(p)).float().reshape(-1)
                                     for x, p in zip(g, params)])
    return result


def _compare(fast: dict, reference: dict) -> dict:
    """Relative differences: per pair and sum, |fast - trl| / max(|trl|, 1); the gradient vector's
    |g_fast - g_trl| / |g_trl| (a zero gradient where trl has one is 1)."""
    out = {"logps": ((fast["logps"] - reference["logps"]).abs() / reference["logps"].abs().clamp_min(1)).max()}
    if "grads" in reference:
        norm = reference["grads"].norm()
        out["grads"] = (fast["grads"] - reference["grads"]).norm() / norm.clamp_min(1e-12) if norm > 0 else \
            fast["grads"].norm()
    return out


def _worst(diff: dict, trainer) -> dict:
    """The largest difference over every rank (one all-reduce), as floats; NaN counts as the worst."""
    import torch.distributed as dist

    values = torch.stack([torch.nan_to_num(v.float(), nan=math.inf) for v in diff.values()])
    if dist.is_available() and dist.is_initialized():
        values = values.to(trainer.args.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(diff, values.cpu().tolist()))


def _compute_dtype(trainer, module) -> torch.dtype:
    a = trainer.args
    if a.bf16:
        return torch.bfloat16
    if a.fp16:
        return torch.float16
    dtype = module.get_input_embeddings().weight.dtype
    return dtype if dtype in BOUNDS else torch.float32
