"""Preflight: what can be wrong with a run, checked before any heavy work, with ONE verdict for the whole job.

`train` runs it after joining the process group (building the DPOConfig does that) and before loading the model:
  - every rank: model path, tokenizer and preference data (every node must be able to read them);
  - global rank 0: LoRA targets on a weightless (meta-device) skeleton of the model, trackers, and the output dir:
    a finished run there? writable? room for the checkpoints? which complete checkpoint to resume from?
Then every rank learns every other's outcome (one all_gather_object). Either all go on, with rank 0's resume choice,
or all raise the same UserError: rank 0 prints it as one line and every rank exits 2 together, so no rank is left
waiting in a collective for a peer that has already quit.

Checks that must come BEFORE the process group exists are `check_combination`: the recipe x strategy rules
(strategies.COMBINATION_RULES: every optimizer, quantization and precision setting against the strategy), then
strategy x device (a GPU strategy on a CPU machine must not even try NCCL). They read only the recipe and the launch
environment, so every rank of a node gives the same answer; the launch scripts' one-process check before the
launcher asks them for the strategy it is about to start (runtime.planned_runtime).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_dpo.checkpoints import RUN_MARKER, check_resumable, last_complete_checkpoint
from dist_dpo.config import Recipe
from dist_dpo.errors import UserError
from dist_dpo.logs import get_logger
from dist_dpo.runtime import Runtime
from dist_dpo.strategies import COMBINATION_RULES, OPTIMIZER_FAMILIES, Rule, strategy_for

# Bytes a checkpoint holds per trainable parameter: fp32 weights (PEFT keeps adapters in fp32) + AdamW's two fp32
# moments; a full fine-tune under ZeRO/FSDP also keeps fp32 master weights. Plus tokenizer, RNG and trainer state.
_CKPT_BYTES_LORA, _CKPT_BYTES_FULL, _CKPT_EXTRA = 12, 16, 2**20


@dataclass
class Checked:
    """What the preflight read and decided, the same on every rank (not the memory plan: that is dist_dpo/plan.py)."""
    model_path: str
    tokenizer: Any
    train_ds: Any
    eval_ds: Any
    model_type: str | None = None  # the config's (text part's): the architecture table's key; rank 0's, shared
    resume: str | None = None  # rank 0's choice, shared with every rank
    resume_portable: bool = False  # from the checkpoint's portable state (another world size or strategy)
    resume_accumulation: int | None = None  # the accumulation that keeps the checkpoint's global batch here
    params: int = 0  # rank 0 only, from the skeleton
    trainable: int = 0
    disk_need: int = 0
    disk_free: int = 0


def check_combination(r: Recipe, rt: Runtime, say: bool = True) -> None:
    """What cannot work for this recipe under this strategy on this machine, refused (or fixed and said, where the
    fix changes no result the user asked for) before the process group and before anything loads."""
    check_rules(r, rt, say)
    t = r.train
    if t.merge_micro_batches is True and not (t.fast_path and strategy_for(rt.strategy).merges_micro_batches):
        raise UserError(
            "merge_micro_batches: true needs fast_path: true and a strategy that can change its micro-batch "
            f"({rt.strategy}: DeepSpeed fixes it in its config): set per_device_train_batch_size and "
            "gradient_accumulation_steps instead, or merge_micro_batches: auto")
    if t.packed_rows is True and not (t.fast_path and t.prefix_sharing is not False):
        raise UserError("packed_rows: true packs the shared-prompt rows of the speed path: it needs fast_path: true "
                        "and prefix_sharing auto/true (or set packed_rows: auto)")
    if t.packed_rows is True and rt.device_type == "cpu":
        raise UserError("packed_rows: true needs a CUDA GPU (flash attention's variable-length kernel): set "
                        "packed_rows: auto, which uses masked rows on CPU")
    if rt.device_type == "cpu" and not strategy_for(rt.strategy).runs_on_cpu:
        raise UserError(f"strategy {rt.strategy} needs GPUs and none is visible: use the ddp or cpu configs on CPU")
    if rt.device_type == "cpu" and (r.model.load_in_4bit or r.model.load_in_8bit):
        raise UserError("4/8-bit loading needs a CUDA GPU (bitsandbytes); drop load_in_4bit/load_in_8bit on CPU")
    if rt.device_type == "cpu":
        # Each CPU rank is a "device": with fewer cores than ranks, gloo ranks starve each other (collectives crawl
        # until they hit the timeout) and the launcher's 1 thread per rank is already the floor.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if rt.local_world_size > cores:
            raise UserError(
                f"{rt.local_world_size} processes on this node but {cores} CPU core(s) and no GPU: "
                f"launch at most {cores} CPU processes (--num_processes)"
            )
    if rt.device_type == "cuda":
        import torch

        if rt.local_world_size > torch.cuda.device_count():
            raise UserError(
                f"{rt.local_world_size} processes on this node but {torch.cuda.device_count()} visible GPU(s): "
                "lower --num_processes / NGPUS"
            )


def optimizer_family(optim: str) -> tuple[str, str | None, str | None]:
    """(family, python module it needs, pip package) of a transformers optimizer name."""
    for family, (module, pip, names) in OPTIMIZER_FAMILIES.items():
        if optim in names:
            return family, module, pip
    return "unknown", None, None  # a name newer than the table: the rules hold nothing against it


def combination_facts(r: Recipe, rt: Runtime) -> dict[str, Any]:
    """What the rules of strategies.COMBINATION_RULES read: the recipe's settings, the strategy, the machine."""
    import importlib.util

    from dist_dpo.modeling import resolve_dtype

    m, t = r.model, r.train
    family, module, pip = optimizer_family(t.optim)
    ds = _deepspeed_json(rt)
    fixed = lambda key: ds.get(key, {}).get("enabled") is True  # noqa: E731 - "auto" leaves it to the recipe
    extra = t.dpo_extra
    on_gpu = rt.device_type == "cuda"
    bf16_ok = None
    if on_gpu:
        import torch

        bf16_ok = torch.cuda.is_bf16_supported()
    return {
        "strategy": rt.strategy,
        "device": rt.device_type,
        "world": "several" if rt.world_size > 1 else "one",
        "optim": t.optim,
        "optim_family": family,
        "optim_installed": module is None or importlib.util.find_spec(module) is not None,
        "optim_pip": pip,
        "optim_layerwise": t.optim.endswith("layerwise"),
        "optim_targets": extra.get("optim_target_modules") is not None,
        "optim_adamw": t.optim in ("adamw_torch", "adamw_torch_fused"),
        "accumulates": t.gradient_accumulation_steps > 1,
        "quant": "4bit" if m.load_in_4bit else "8bit" if m.load_in_8bit else "none",
        "dtype": str(resolve_dtype(m, rt)).removeprefix("torch."),
        "bf16_supported": bf16_ok,
        "tf32": extra.get("tf32"),
        "extra_precision": next((k for k in ("bf16", "fp16") if extra.get(k)), None),
        "ds_config": rt.deepspeed_config,
        "ds_precision": "bf16" if fixed("bf16") else "fp16" if fixed("fp16") else None,
        "ds_optimizer": "set" if "optimizer" in ds else None,
        "ds_scheduler": "set" if "scheduler" in ds else None,
        "lr_scheduler_type": t.lr_scheduler_type,
        "scheduler_default": t.lr_scheduler_type == "linear",
    }


def _deepspeed_json(rt: Runtime) -> dict:
    if not rt.deepspeed_config:
        return {}
    import json

    return json.loads(Path(rt.deepspeed_config).read_text())  # runtime.py has read and checked it already


def matching_rules(facts: dict[str, Any]) -> list[Rule]:
    return [rule for rule in COMBINATION_RULES if all(facts.get(k) in v for k, v in rule.when.items())]


def check_rules(r: Recipe, rt: Runtime, say: bool = True) -> None:
    """Refuse the first refusing rule that holds; make and say (rank 0, once) the fixes of the applying ones."""
    facts = combination_facts(r, rt)
    rules = matching_rules(facts)
    for rule in rules:
        if rule.action == "refuse":
            raise UserError(rule.says.format(**facts))
    for rule in rules:
        for key, value in (rule.sets or {}).items():
            section, _, name = key.partition(".")
            if section == "dpo_extra" and value is None:
                r.train.dpo_extra.pop(name, None)
            else:
                setattr(r.train, key, value)
        if say and rt.is_main:
            get_logger().warning("%s", rule.says.format(**facts))


def run(r: Recipe, rt: Runtime) -> Checked:
    checked, error, bug = None, None, None
    try:
        checked = checks(r, rt)
    except UserError as e:
        error = str(e)
    except Exception as e:  # a bug on this rank must not leave the others waiting either
        error, bug = f"{type(e).__name__}: {e}".splitlines()[0], e
    shared = (checked.resume, checked.resume_portable, checked.resume_accumulation, checked.model_type) \
        if checked is not None and rt.is_main else None
    reports = agree(rt, error, shared)
    if bug is not None:
        raise bug  # its traceback, on this rank; the others exit 2 with the line below
    failed = [(rank, host, err) for rank, host, err, _ in reports if err]
    if failed:
        rank, host, err = failed[0]
        raise UserError(err if rank == rt.rank or rank == 0 else f"rank {rank} on {host}: {err}")
    checked.resume, checked.resume_portable, checked.resume_accumulation, checked.model_type = reports[0][3]
    return checked


def checks(r: Recipe, rt: Runtime) -> Checked:
    """This rank's share of the checks (all of them on rank 0), without the agreement: `doctor` uses it too."""
    checked = _every_rank(r)
    if rt.is_main:
        _rank_zero(r, rt, checked)
    return checked


def agree(rt: Runtime, error: str | None, shared: Any) -> list[tuple]:
    """[(rank, host, error or None, shared)] from every rank; one collective, nothing more."""
    report = (rt.rank, rt.hostname, error, shared)
    if rt.world_size == 1:
        return [report]
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("preflight needs the process group: build the DPOConfig first")
    reports: list = [None] * rt.world_size
    dist.all_gather_object(reports, report)
    return reports


def _every_rank(r: Recipe) -> Checked:
    from dist_dpo.data import load_preference_data
    from dist_dpo.modeling import load_tokenizer, resolve_model_path

    model_path = resolve_model_path(r.model.model_name_or_path)
    tokenizer = load_tokenizer(r.model, model_path)
    train_ds, eval_ds = load_preference_data(r.data, tokenizer, r.train.max_length, r.train.seed)
    return Checked(model_path, tokenizer, train_ds, eval_ds)


def _rank_zero(r: Recipe, rt: Runtime, checked: Checked) -> None:
    checked.params, checked.trainable, checked.model_type = skeleton_counts(r, checked.model_path)
    check_trackers(r.train.report_to)
    out = Path(r.train.output_dir)
    choice = check_output_dir(r, rt, out, len(checked.train_ds) if hasattr(checked.train_ds, "__len__") else None)
    if choice is not None:
        checked.resume, checked.resume_portable, checked.resume_accumulation = choice.path, choice.portable, choice.accumulation
    check_writable(out)
    checked.disk_need = checkpoint_disk_need(r, checked.trainable)
    checked.disk_free = free_bytes(out)
    if checked.disk_free < checked.disk_need:
        raise UserError(
            f"output_dir '{out}' has {human(checked.disk_free)} free but the checkpoints need about "
            f"{human(checked.disk_need)} "
            f"({r.train.save_total_limit} kept + 1 being written, {checked.trainable:,} trainable params): free space, "
            "lower save_total_limit or choose another output_dir"
        )


def skeleton_counts(r: Recipe, model_path: str) -> tuple[int, int, str]:
    """(params, trainable params, model_type) from the model's config on the meta device: LoRA targets are checked
    and counted without loading a single weight."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_dpo.modeling import lora_config
    from dist_dpo.upstream.swaps import zero3_init_off

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=r.model.trust_remote_code)
        check_forced_speed_path(r, config)
        with torch.device("meta"), zero3_init_off():  # rank 0 alone builds it: no collective init
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=r.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot build model '{model_path}' from its config.json: {str(e).splitlines()[0]}") from None
    params = sum(p.numel() for p in skeleton.parameters())
    model_type = config.get_text_config().model_type
    peft_config = lora_config(r.lora, skeleton)
    if peft_config is None:
        return params, params, model_type
    from peft import get_peft_model

    adapted = get_peft_model(skeleton, peft_config)
    return params, sum(p.numel() for p in adapted.parameters() if p.requires_grad), model_type


def check_forced_speed_path(r: Recipe, config) -> None:
    """A speed-path option the recipe forces (`true`) that this model cannot take, refused before anything loads.
    (speed.apply refuses what only the loaded model and the GPU show: the variable-length kernel's probe.)"""
    from dist_dpo.architectures import family_for
    from dist_dpo.speed import aux_loss_on, layout_reasons, ref_cache, refuse_forced

    t = r.train
    layouts = layout_reasons(family_for(config.get_text_config().model_type), config, r.model.attn_implementation,
                             aux_loss_on(config, t.dpo_extra.get("router_aux_loss_coef")))
    if t.fast_path and t.prefix_sharing is True and layouts["shared_rows"]:
        raise refuse_forced("shared_rows", layouts["shared_rows"])
    if t.fast_path and t.packed_rows is True and layouts["packed_rows"]:
        raise refuse_forced("packed_rows", layouts["packed_rows"])
    why = ref_cache.recipe_reason(r, config) if t.ref_logps_cache is True else None
    if why:
        raise refuse_forced("reference", why)


def check_trackers(report_to: list[str]) -> None:
    """The trackers start on rank 0 after the model is loaded; a missing package or key would fail there."""
    import importlib.util

    if "tensorboard" in report_to and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise UserError("report_to tensorboard but tensorboard is not installed: pip install tensorboard "
                        "(or --report_to none)")
    if "wandb" not in report_to:
        return
    if importlib.util.find_spec("wandb") is None:
        raise UserError("report_to wandb but wandb is not installed: pip install wandb (or --report_to tensorboard)")
    # wandb's own lookup: WANDB_API_KEY, then ~/.netrc (what `wandb login` writes); offline/disabled need none.
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc().authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise UserError(
        "report_to wandb but no W&B API key is configured: set WANDB_API_KEY or run `wandb login` "
        "(WANDB_MODE=offline logs locally without one)"
    )


def check_output_dir(r: Recipe, rt: Runtime, out: Path, pairs: int | None = None):
    """Refuse to clobber a finished run; pick the complete checkpoint to resume from and how (portable.choose):
    a `portable.ResumeChoice`, or None to start afresh."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file: choose a directory")
    if (out / RUN_MARKER).exists() and not r.train.overwrite_output_dir and r.train.resume != "never":
        raise UserError(
            f"output_dir '{out}' already holds a finished run: choose another output_dir or pass --overwrite_output_dir"
        )
    if r.train.resume == "never":
        return None
    if r.train.resume != "auto":
        ckpt = Path(r.train.resume)
    elif out.is_dir():
        ckpt = last_complete_checkpoint(out)
    else:
        ckpt = None
    if ckpt is None:
        return None
    from dist_dpo.portable import ResumeChoice, choose

    marker = check_resumable(ckpt)
    if r.dry_run and not rt.distributed:  # a one-process dry run before the launcher cannot know the job's size
        choice = ResumeChoice(str(ckpt), False, None, f"resuming from {ckpt} (written by "
                                                      f"{marker.get('world_size')} processes under {marker.get('strategy')})")
    else:
        choice = choose(ckpt, marker, rt.world_size, rt.strategy, r.train.per_device_train_batch_size, pairs)
    get_logger().info("%s", choice.line)
    return choice


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not os.path.exists(p):  # False for what cannot be stat-ed too: the mkdir below then names the reason
        p = p.parent
    return p


def check_writable(out: Path) -> None:
    """Create output_dir and write a probe file in it: as root, permission bits say nothing, so we try for real.
    Directories this check creates are removed again: nothing is left behind if another rank's check fails (or on a
    dry run); training creates output_dir itself once the whole job agreed to go."""
    base = _existing_ancestor(out)
    if not base.is_dir():
        raise UserError(f"output_dir '{out}' cannot be created: '{base}' is a file, not a directory")
    created: list[Path] = []
    missing = []
    p = out.absolute()
    while p != base:
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".dist-dpo-write-test-")
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"output_dir '{out}' is not writable ({e.strerror or e}): choose a directory you can write to"
        ) from None
    finally:
        for d in reversed(created):  # deepest first; rmdir: never more than the empty dirs made here
            try:
                d.rmdir()
            except OSError:
                break


def checkpoint_disk_need(r: Recipe, trainable: int) -> int:
    per_param = _CKPT_BYTES_LORA if r.lora.use_peft else _CKPT_BYTES_FULL
    per_checkpoint = trainable * per_param + _CKPT_EXTRA
    final_weights = trainable * 4 + _CKPT_EXTRA
    return per_checkpoint * (r.train.save_total_limit + 1) + final_weights


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing_ancestor(path)).free


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
