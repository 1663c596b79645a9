"""`dist-dpo train`: parse -> resolve the runtime -> load tokenizer, model, data -> DistDPOTrainer -> train -> save.

Whatever launched it (accelerate_configs/*.yaml, ds_configs/*.json, torchrun, plain python), the runtime names the
strategy once and every per-strategy setting comes from its row of the table in dist_dpo/strategies.py."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import signal
import sys
import time
from pathlib import Path

from dist_dpo.checkpoints import RUN_MARKER, complete_checkpoints, discard_staging
from dist_dpo.config import Recipe, parse_recipe
from dist_dpo.errors import UserError
from dist_dpo.logs import add_rank_file, get_logger, log_to_rank_file, setup_console
from dist_dpo.runtime import Runtime, planned_runtime, resolve_runtime
from dist_dpo.strategies import strategy_for

EXIT_JOB_LOST = 3  # the job lost a rank or was terminated: rerun the same command to resume
STOPPED = "stopped by SIGTERM (a launcher stops every rank when one fails; a scheduler may have preempted the job)"
RANK0_FIRST_S = 5.0  # on a user error, the longest the other ranks wait for rank 0 to print and exit first


def run(argv: list[str]) -> int:
    try:
        return _train(argv)
    except UserError:
        _leave_together()
        raise


def _leave_together() -> None:
    """Every rank hits a user error together (same input, or the preflight's shared verdict) and rank 0 prints it.
    torchrun SIGTERMs the other workers as soon as ONE exits, so from here on SIGTERM is ignored: nobody is killed
    before rank 0's line is out, and every rank exits 2. After the preflight's all_gather the ranks are in step; an
    error found before the process group exists is not, so there the other ranks wait until the launcher's SIGTERM
    says a worker (rank 0, normally) has exited, or RANK0_FIRST_S at most."""
    from dist_dpo.cli import _global_rank  # the rank that speaks, known even before the runtime is resolved

    dist = sys.modules.get("torch.distributed")  # not imported yet: certainly no process group
    in_step = dist is not None and dist.is_available() and dist.is_initialized()
    if _global_rank() != 0 and not in_step:
        signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            time.sleep(RANK0_FIRST_S)
        except _Terminated:
            pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _train(argv: list[str]) -> int:
    from dist_dpo.run_stats import StartUp

    startup = StartUp()
    startup.mark("python imports")
    recipe = parse_recipe(argv)
    rt = resolve_runtime(recipe.train.deepspeed)
    log = setup_console(rt)
    strat = strategy_for(rt.strategy)
    from dist_dpo import preflight

    # Before the process group (a GPU strategy without GPUs must not reach NCCL) and before anything loads. The
    # launch scripts' one-process check asks it for the job they are about to start; that job says its fixes.
    planned = planned_runtime(recipe.train.deepspeed) if recipe.dry_run else None
    preflight.check_combination(recipe, planned or rt, say=planned is None)
    from dist_dpo.speed import check_switches

    check_switches()  # the benchmark's A/B environment switches: a typo stops here, not after tokenization
    pinned = pin_cpus(recipe, rt)  # before any worker thread starts: they inherit it
    out = Path(recipe.train.output_dir)

    from dist_dpo.dpo_args import build_dpo_config
    from dist_dpo.modeling import load_model, lora_config

    args = build_dpo_config(recipe, rt, strat)  # joins the process group; before the model: ZeRO-3 partitions at load
    startup.mark("process group")
    checked = preflight.run(recipe, rt)  # data, model, output dir, disk: one verdict for every rank, before heavy work
    startup.mark("preflight (data read and checked)")
    if recipe.dry_run:
        return dry_run_report(recipe, rt, checked)
    if checked.resume_accumulation not in (None, recipe.train.gradient_accumulation_steps):
        recipe.train.gradient_accumulation_steps = checked.resume_accumulation  # the checkpoint's global batch, here
    # Again, now that the preflight knows the model's family (its liger kernels) and the checkpoint's batch; still
    # before the model loads, as ZeRO-3 needs.
    args = build_dpo_config(recipe, rt, strat, checked.model_type)
    if rt.device_type == "cuda":
        from dist_dpo.plan import cap_gpu_memory

        cap_gpu_memory(recipe.train.gpu_memory_gib, rt.local_rank)  # before any weight lands on the GPU
    model = load_model(recipe.model, checked.model_path, rt, strat, recipe.train.gradient_checkpointing)
    startup.mark("model load")
    peft_config = lora_config(recipe.lora, model)
    tokenizer, train_ds, eval_ds = checked.tokenizer, checked.train_ds, checked.eval_ds

    # Everything that can be wrong with the input has been checked: only now touch the output dir.
    add_rank_file(rt, out)
    if rt.is_main:
        recipe.write(out / "resolved_config.yaml")
        discard_staging(out)  # a save cut off by an earlier crash; no rank writes there before the next barrier

    from transformers.trainer_callback import ProgressCallback

    from dist_dpo.callbacks import RankZeroProgress
    from dist_dpo import speed
    from dist_dpo.precision import keep_logprobs_fp32, keep_qlora_adapters_fp32, refuse_float_gathered_4bit
    from dist_dpo.run_stats import RunStats
    from dist_dpo.trainer import DistDPOTrainer

    trainer = DistDPOTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if recipe.train.eval_steps > 0 else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        checkpoint_meta={"world_size": rt.world_size, "strategy": rt.strategy},
        portable_resume=checked.resume_portable,
    )
    startup.mark("trainer (tokenization)")
    startup.part("of which tokenizing", trainer.tokenize_seconds)  # the rest: trl, peft, accelerate
    ddp_gradients_in_buckets(trainer, strat)
    keep_qlora_adapters_fp32(trainer, strat)  # dist_dpo/precision.py: what trl / FSDP2 would get wrong, in order
    refuse_float_gathered_4bit(trainer.model, strat)
    keep_logprobs_fp32(trainer, strat)
    speed.apply(trainer, recipe, rt)  # the speed path, same loss as trl's (dist_dpo/speed/__init__.py)
    startup.mark("speed path")
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RankZeroProgress())
    stats = RunStats(startup)
    trainer.add_callback(stats)
    if recipe.train.same_model_check:
        from dist_dpo.same_model import SameModelCheck

        m = recipe.model
        trainer.add_callback(SameModelCheck(rt, rt.strategy, "4-bit" if m.load_in_4bit else
                                            "8-bit" if m.load_in_8bit else "unquantized"))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    log.info(  # every rank, into its own file: proves where each rank's (4-bit) model lives
        "rank %d of %d | local rank %d | node %d of %d | %s | pid %d | %s",
        rt.rank, rt.world_size, rt.local_rank, rt.node_rank, rt.num_nodes, model_device(trainer.model), os.getpid(),
        f"pinned to CPUs {_ranges(pinned)}" if pinned else "CPUs not pinned",
    )
    log_header(log, recipe, rt, strat, trainer, len(train_ds), len(eval_ds))

    result = train_or_explain(trainer, checked.resume, rt, out)
    trainer.save_model(str(out))  # gathers ZeRO-3 / FSDP shards as the strategy requires
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    stuck = not_learning(trainer.state.log_history)  # the same history on every rank: one verdict
    if stuck:
        trainer.accelerator.wait_for_everyone()
        raise UserError(f"training finished but learned nothing: {stuck}. The adapter and logs are in {out}; "
                        "check learning_rate, lora_target_modules and the model (set fast_path: false to compare "
                        "with plain trl)")
    if rt.is_main:
        tokenizer.save_pretrained(out)
        if recipe.lora.use_peft:
            summary = verify_adapter(out, len(trainable))
            log.info("adapter verified: %d tensors, %.2f MiB", summary["tensors"], summary["bytes"] / 2**20)
        else:
            summary = {}
        (out / RUN_MARKER).write_text(
            json.dumps({"status": "complete", "strategy": rt.strategy, "world_size": rt.world_size,
                        "global_step": trainer.state.global_step, "adapter": summary, **stats.summary}, indent=2)
        )
        log.info("start-up: %s", " | ".join(f"{k} {v:.1f} s" for k, v in stats.summary.get("startup_s", {}).items()))
        from dist_dpo.report import report_after_training
        report_after_training(out)  # plots + report.md reading the curves; never fails the finished run
        log.info("done. adapter: %s | logs: %s | metrics: %s", out, out / "logs", out / "train_results.json")
    trainer.accelerator.wait_for_everyone()
    log.info("rank %d finished at step %d", rt.rank, trainer.state.global_step)
    return 0


def ddp_gradients_in_buckets(trainer, strat) -> None:
    """The strategy table's ddp_gradient_as_bucket_view, on the DDP settings accelerate wraps the model with at
    train() (transformers builds them from TrainingArguments, which have no such field)."""
    from dist_dpo import ab_switches

    handler = getattr(trainer.accelerator, "ddp_handler", None)
    copies = ab_switches.flag("DDP_GRAD_COPY")
    if strat.ddp_gradient_as_bucket_view and handler is not None and not copies:
        handler.gradient_as_bucket_view = True


def pin_cpus(recipe: Recipe, rt: Runtime) -> list[int] | None:
    """cpu_affinity: true/auto pin when several processes share a machine's GPUs (dist_dpo/cpu_pinning.py)."""
    want = recipe.train.cpu_affinity
    if want is False or rt.device_type != "cuda" or (want == "auto" and rt.local_world_size < 2):
        return None
    from dist_dpo.cpu_pinning import pin_this_rank

    return pin_this_rank(rt.local_rank)


def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    parts, start = [], cpus[0]
    for a, b in zip(cpus, cpus[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}-{a}" if a > start else str(a))
            start = b
    return ",".join(parts)


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated()


def train_or_explain(trainer, resume: str | None, rt: Runtime, out: Path):
    """trainer.train, where the two ways a job dies from outside - a peer rank gone (killed, crashed, node lost) or
    SIGTERM (the launcher tearing the job down after a failure, or a scheduler preempting it) - end this rank with
    ONE line saying what happened and where it can resume, instead of a gloo/NCCL traceback or silence."""
    from dist_dpo.stuck_signal import StuckSignalWatch

    def say(what: str) -> None:
        ckpts = complete_checkpoints(out)
        where = f"rerun the same command to resume from {ckpts[-1].name}" if ckpts else "no complete checkpoint yet"
        message = f"dist-dpo: rank {rt.rank}: {what}; {where} (logs: {out / 'logs'})"
        print(message, file=sys.stderr, flush=True)
        log_to_rank_file(logging.ERROR, message)

    # A rank stuck in a collective cannot run the handler below: this says the line for it and ends it.
    watch = StuckSignalWatch(lambda: say(STOPPED + " while blocked in a collective"), EXIT_JOB_LOST)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return trainer.train(resume_from_checkpoint=resume)
    except _Terminated:
        what = STOPPED
    except Exception as e:
        if not (rt.distributed and _is_peer_loss(e)):
            raise
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip()).splitlines()[0][:160]  # drop gloo's "[file:line]"
        what = f"lost contact with the other ranks ({reason}): a process of the job died or hung"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while we exit just ends the process
        watch.close()
    watch.say_once(lambda: say(what))
    # SystemExit skips destroy_process_group: with a dead peer it can block (NCCL) and there is nothing to flush.
    raise SystemExit(EXIT_JOB_LOST)


def _is_peer_loss(e: BaseException) -> bool:
    """A collective failed because a peer is gone or timed out (gloo and NCCL word it differently)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe",
                                   "timed out", "timeout"))


def model_device(model) -> str:
    devices = sorted({str(p.device) for p in model.parameters()})
    return "model on " + ", ".join(devices)


def dry_run_report(r: Recipe, rt: Runtime, checked) -> int:
    from dist_dpo.preflight import human

    get_logger().info(
        "dry run OK: %s (%.2fB params, %s trainable) | %d train / %d test pairs | output_dir %s (%s free, ~%s for "
        "checkpoints)%s | %s",
        checked.model_path, checked.params / 1e9, f"{checked.trainable:,}", len(checked.train_ds), len(checked.eval_ds),
        r.train.output_dir, human(checked.disk_free), human(checked.disk_need),
        f" | resumes from {checked.resume}" if checked.resume else "", rt.describe(),
    )
    return 0


def not_learning(history: list[dict]) -> str | None:
    """Why a finished run learned nothing (None: it moved). DPO starts with the policy equal to the reference, the
    loss at log 2 and every reward 0; a run whose gradient norm was 0 at every logged step, or whose rewards never
    left 0 after the first step, trained nothing, whatever its exit code would say."""
    logged = [h for h in history if "loss" in h and "step" in h]
    norms = [h["grad_norm"] for h in logged if h.get("grad_norm") is not None]
    if norms and all(float(n) == 0.0 for n in norms):
        return f"the gradient norm was 0 at all {len(norms)} logged steps"
    later = [h for h in logged if h["step"] > 1 and "rewards/chosen" in h]
    if later and all(h["rewards/chosen"] == 0 and h.get("rewards/rejected", 0) == 0 for h in later):
        return f"the policy never left the reference (rewards 0, loss log 2) in {len(later)} logged steps after the first"
    return None


def verify_adapter(out: Path, expected_tensors: int) -> dict:
    """The saved adapter must hold every trainable tensor, none empty (ZeRO-3/FSDP saves can silently be empty)."""
    from safetensors import safe_open

    path = out / "adapter_model.safetensors"
    if not path.is_file():
        raise RuntimeError(f"no adapter was written to {path}")
    n, size = 0, 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.numel() == 0:
                raise RuntimeError(f"saved adapter tensor {key} is EMPTY: the sharded weights were not gathered")
            n += 1
            size += t.numel() * t.element_size()
    if n != expected_tensors:
        raise RuntimeError(f"saved adapter has {n} tensors, expected {expected_tensors} trainable ones")
    return {"tensors": n, "bytes": size}


def log_header(log, r: Recipe, rt: Runtime, strat, trainer, n_train: int, n_eval: int) -> None:
    if not rt.is_main:
        return
    if r.model.load_in_4bit and strat.qlora_caveat:  # here, not before the preflight: said once per job
        log.warning("%s", strat.qlora_caveat)
    import importlib.metadata as md

    import torch

    names = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes"]
    versions = " ".join(f"{n}={_version(md, n)}" for n in names)
    devices = (
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if rt.device_type == "cuda" else "CPU"
    )
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # ZeRO-3 params are empty placeholders until gathered
    trainable = sum(numel(p) for p in trainer.model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in trainer.model.parameters())
    t = trainer.args  # what runs: merge_micro_batches may have turned the recipe's 4 x 4 into 16 x 1
    global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * rt.world_size
    quant = "4-bit NF4 (QLoRA)" if r.model.load_in_4bit else "8-bit" if r.model.load_in_8bit else "none"
    for line in (
        f"strategy: {rt.describe()} — {strat.summary}",
        f"devices: {devices} per node | host {platform.node()}",
        f"versions: {versions}",
        f"model: {r.model.model_name_or_path} | quantization: {quant} | "
        f"trainable params: {trainable:,} of {total:,} (local view)",
        f"data: {r.data.dataset_name} | {n_train} train / {n_eval} test pairs",
        f"effective global batch: {t.per_device_train_batch_size} per device x {t.gradient_accumulation_steps} "
        f"accumulation x {rt.world_size} processes = {global_batch} pairs per optimizer step",
    ):
        log.info(line)


def _version(md, name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"
