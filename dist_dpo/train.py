"""`dist-dpo train`: parse -> resolve the runtime -> load tokenizer, model, data -> trl DPOTrainer -> train -> save."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from dist_dpo.config import Recipe, parse_recipe
from dist_dpo.errors import UserError
from dist_dpo.logs import add_rank_file, get_logger, setup_console
from dist_dpo.runtime import Runtime, resolve_runtime
from dist_dpo.strategies import strategy_for

RUN_MARKER = "dist_dpo_run.json"  # written last, when the adapter is saved and verified


def run(argv: list[str]) -> int:
    recipe = parse_recipe(argv)
    rt = resolve_runtime(recipe.train.deepspeed)
    log = setup_console(rt)
    strat = strategy_for(rt.strategy)
    check_combination(recipe, rt)
    out = Path(recipe.train.output_dir)
    resume = check_output_dir(recipe, out)

    from dist_dpo.dpo_args import build_dpo_config
    from dist_dpo.modeling import load_model, load_tokenizer, lora_config, resolve_model_path

    model_path = resolve_model_path(recipe.model.model_name_or_path)
    args = build_dpo_config(recipe, rt, strat)  # before the model: ZeRO-3 partitions while loading
    tokenizer = load_tokenizer(recipe.model, model_path)

    from dist_dpo.data import load_preference_data

    train_ds, eval_ds = load_preference_data(recipe.data, tokenizer, recipe.train.max_length, recipe.train.seed)
    if recipe.dry_run:
        return dry_run_report(recipe, rt, model_path, len(train_ds), len(eval_ds))
    model = load_model(recipe.model, model_path, rt, strat, recipe.train.gradient_checkpointing)
    peft_config = lora_config(recipe.lora, model)

    # Everything that can be wrong with the input has been checked: only now touch the output dir.
    add_rank_file(rt, out)
    log.info(
        "rank %d of %d | local rank %d | node %d of %d | %s | pid %d",
        rt.rank, rt.world_size, rt.local_rank, rt.node_rank, rt.num_nodes, model_device(model), os.getpid(),
    )
    if rt.is_main:
        recipe.write(out / "resolved_config.yaml")

    from trl import DPOTrainer
    from transformers.trainer_callback import ProgressCallback

    from dist_dpo.callbacks import RankZeroProgress
    from dist_dpo.precision import keep_logprobs_fp32
    from dist_dpo.run_stats import RunStats

    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if recipe.train.eval_steps > 0 else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    keep_logprobs_fp32(trainer, strat)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RankZeroProgress())
    stats = RunStats()
    trainer.add_callback(stats)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    log_header(log, recipe, rt, strat, trainer, len(train_ds), len(eval_ds))

    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out))  # gathers ZeRO-3 / FSDP shards as the strategy requires
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
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
        # REPORT HOOK (issue 4): plots + summary of the curves are written here, on rank 0.
        log.info("done. adapter: %s | logs: %s | metrics: %s", out, out / "logs", out / "train_results.json")
    trainer.accelerator.wait_for_everyone()
    log.info("rank %d finished at step %d", rt.rank, trainer.state.global_step)
    return 0


def model_device(model) -> str:
    devices = sorted({str(p.device) for p in model.parameters()})
    return "model on " + ", ".join(devices)


def dry_run_report(r: Recipe, rt: Runtime, model_path: str, n_train: int, n_eval: int) -> int:
    """The model's modules come from its config on the meta device: LoRA targets are checked without weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_dpo.modeling import lora_config

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=r.model.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=r.model.trust_remote_code)
    lora_config(r.lora, skeleton)
    params = sum(p.numel() for p in skeleton.parameters())
    get_logger().info(
        "dry run OK: %s (%.2fB params) | %d train / %d test pairs | output_dir %s | %s",
        model_path, params / 1e9, n_train, n_eval, r.train.output_dir, rt.describe(),
    )
    return 0


def check_combination(r: Recipe, rt: Runtime) -> None:
    """Strategy x quantization x device combinations that cannot work, refused before any heavy work."""
    quant = r.model.load_in_4bit or r.model.load_in_8bit
    if rt.strategy == "fsdp" and r.model.load_in_8bit:
        raise UserError("FSDP cannot shard 8-bit (LLM.int8) weights: use load_in_4bit (QLoRA) or a DeepSpeed/DDP config")
    if rt.device_type == "cpu" and not strategy_for(rt.strategy).runs_on_cpu:
        raise UserError(f"strategy {rt.strategy} needs GPUs and none is visible: use the ddp or cpu configs on CPU")
    if rt.device_type == "cpu" and quant:
        raise UserError("4/8-bit loading needs a CUDA GPU (bitsandbytes); drop load_in_4bit/load_in_8bit on CPU")
    if rt.device_type == "cuda":
        import torch

        if rt.local_world_size > torch.cuda.device_count():
            raise UserError(
                f"{rt.local_world_size} processes on this node but {torch.cuda.device_count()} visible GPU(s): "
                "lower --num_processes / NGPUS"
            )


def check_output_dir(r: Recipe, out: Path) -> str | None:
    """Refuse to clobber a finished run; pick the checkpoint to resume from."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file: choose a directory")
    if (out / RUN_MARKER).exists() and not r.train.overwrite_output_dir and r.train.resume != "never":
        raise UserError(
            f"output_dir '{out}' already holds a finished run: choose another output_dir or pass --overwrite_output_dir"
        )
    if r.train.resume == "never" or not out.is_dir():
        return None
    if r.train.resume != "auto":
        return r.train.resume
    from dist_dpo.checkpoints import last_complete_checkpoint

    ckpt = last_complete_checkpoint(out)
    if ckpt:
        get_logger().info("resuming from %s", ckpt)
    return str(ckpt) if ckpt else None


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
    t = r.train
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
