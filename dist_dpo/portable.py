"""Checkpoints that resume on another number of processes or under another strategy (LoRA / QLoRA).

transformers' own checkpoint is per layout: RNG files per rank, an optimizer state keyed by position (DDP), by flat
ZeRO partition (DeepSpeed: its universal checkpoint cannot be loaded by the Trainer, DeepSpeed#6470) or by FSDP shard.
A LoRA run's whole training state is small, so every checkpoint also holds it in one layout-free form, `portable/`:

  adapter_and_adam.safetensors  every trainable tensor in fp32, gathered whole, keyed by parameter NAME, with its two
                                AdamW moments (`param::NAME`, `exp_avg::NAME`, `exp_avg_sq::NAME`)
  state.json                    AdamW's step, the LR scheduler, every rank's RNG, and the data position: the pairs of
                                the epoch already trained, in the epoch's order, and the global batch that drew them

It is written inside the staged checkpoint before its marker (dist_dpo/checkpoints.py), so it is published
atomically with the rest. `train` uses it only when the world size or the strategy changed; otherwise it keeps
transformers' native resume. The global batch (per device x accumulation x processes) is kept by recomputing the
accumulation for the new process count, so the optimizer steps see the same pairs: the grouped and the random order
depend on the seed, the epoch and the global batch only (dist_dpo/speed/batching.py), and the Trainer skips
`global_step x global batch` pairs of the epoch on any layout.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from dist_dpo.errors import UserError
from dist_dpo.strategies import strategy_for

PORTABLE = "portable"  # inside checkpoint-N
TENSORS, STATE = "adapter_and_adam.safetensors", "state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's; an optimizer without them (8-bit, paged) writes no portable state


# ---- which path a resume takes (rank 0, in the preflight) -------------------------------------------------------


@dataclass
class ResumeChoice:
    path: str
    portable: bool  # world size or strategy changed: the portable state, not transformers' own files
    accumulation: int | None  # what keeps the checkpoint's global batch here; None: an older checkpoint, as is
    line: str  # what the log says about it


def _procs(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def choose(ckpt: Path, marker: dict, world: int, strategy: str, per_device: int, pairs: int | None) -> ResumeChoice:
    saved_world, saved_strategy = marker.get("world_size"), marker.get("strategy")
    batch = marker.get("global_batch")
    same = saved_world == world and saved_strategy == strategy
    written = f"{ckpt.name} written by {_procs(saved_world)} under {saved_strategy}"
    if batch is None:  # written before checkpoints recorded their global batch (and held no portable state)
        if same:
            return ResumeChoice(str(ckpt), False, None, f"resuming from {ckpt} (written by {saved_world} processes)")
        raise UserError(f"checkpoint '{ckpt}' was written by {_procs(saved_world)} under {saved_strategy} without "
                        f"portable state (an older dist-dpo) and this run has {_procs(world)} under {strategy}: "
                        f"relaunch that way to resume, or start over with --resume never (or a new output_dir)")
    if batch % (per_device * world):
        fits = [p for p in range(1, batch // world + 1) if batch % (p * world) == 0]
        what = (f"per_device_train_batch_size {', '.join(map(str, fits))} would keep it" if fits else
                f"no per-device batch splits {batch} pairs over {_procs(world)}: use a process count that divides "
                f"{batch}")
        raise UserError(f"checkpoint '{ckpt}' was trained with a global batch of {batch} pairs; "
                        f"{_procs(world)} x per_device_train_batch_size {per_device} cannot keep it: {what} "
                        "(the accumulation is recomputed)")
    accumulation = batch // (per_device * world)
    keeps = f"{per_device} x {accumulation} accumulation x {_procs(world)} keeps the global batch of {batch}"
    if same:
        return ResumeChoice(str(ckpt), False, accumulation,
                            f"resuming from {ckpt} (written by {saved_world} processes); {keeps}")
    state = read_state(ckpt)
    if state is None:
        raise UserError(f"checkpoint '{ckpt}' was written by {_procs(saved_world)} under {saved_strategy} without "
                        f"portable state (full fine-tuning, or an optimizer without AdamW moments) and this run has "
                        f"{_procs(world)} under {strategy}: relaunch that way to resume, or start over with "
                        "--resume never")
    data = state["data"]
    if pairs is not None and data["pairs"] != pairs:
        raise UserError(f"checkpoint '{ckpt}' was trained on {data['pairs']} preference pairs and this run has "
                        f"{pairs}: the data position would not carry over; use the same data, or --resume never")
    return ResumeChoice(str(ckpt), True, accumulation,
                        f"resuming {written} on {_procs(world)} under {strategy}: portable state (adapter and "
                        f"AdamW moments by name, scheduler, RNG; {data['pairs_trained_in_epoch']} of "
                        f"{data['pairs']} pairs of epoch {data['epoch']} trained); {keeps}")


def read_state(ckpt: Path) -> dict | None:
    try:
        return json.loads((Path(ckpt) / PORTABLE / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---- writing it (every rank: the gathers are collectives; the saving rank writes) -------------------------------


def trainable(model) -> dict:
    """Trainable parameters by a name every layout agrees on (wrappers' name parts dropped)."""
    def plain(name: str) -> str:
        for part in ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod."):
            name = name.replace(part, "")
        return name.removeprefix("module.")

    return {plain(n): p for n, p in model.named_parameters() if p.requires_grad}


def _whole(t):
    """FSDP2 DTensor -> the whole tensor on every rank (a collective); anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _base_optimizer(trainer):
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps torch's


def save(trainer, staged: Path) -> None:
    import torch
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    if not isinstance(model, PeftModel):
        return  # full fine-tuning: the optimizer state is the model's size, not small; resume keeps the layout
    deepspeed = strategy_for(trainer.checkpoint_meta.get("strategy", "single")).portable_state == "deepspeed"
    params = trainable(trainer.model)
    tensors = {}
    if deepspeed:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        for name, p in params.items():
            tensors[f"param::{name}"] = safe_get_full_fp32_param(p)
            for key in MOMENTS:
                tensors[f"{key}::{name}"] = safe_get_full_optimizer_state(p, key)
        base = trainer.model_wrapped.optimizer.optimizer  # engine -> ZeRO optimizer -> torch's, over flat partitions
        states = list(base.state.values())
    else:
        base = _base_optimizer(trainer)
        states = [base.state.get(p, {}) for p in params.values()]
        for name, p in params.items():
            tensors[f"param::{name}"] = _whole(p.detach())
            for key in MOMENTS:
                tensors[f"{key}::{name}"] = _whole(base.state[p][key]) if key in base.state.get(p, {}) else None
    rng = _gather_rng()
    if not trainer.args.should_save or any(t is None for t in tensors.values()) or not states:
        return
    step = float(next((s["step"] for s in states if "step" in s), trainer.state.global_step))
    a = trainer.args
    pairs = len(trainer.train_dataset) if hasattr(trainer.train_dataset, "__len__") else None
    batch = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
    per_epoch = math.ceil(pairs / batch) if pairs else None  # optimizer steps per epoch, the Trainer's count
    g = trainer.state.global_step
    data = {"pairs": pairs, "global_batch": batch, "seed": a.data_seed if a.data_seed is not None else a.seed,
            "epoch": g // per_epoch if per_epoch else None,
            "pairs_trained_in_epoch": min((g % per_epoch) * batch, pairs) if per_epoch else None}
    state = {"format": 1, "global_step": g, "adam_step": step, "written_by": dict(trainer.checkpoint_meta),
             "lr_scheduler": trainer.lr_scheduler.state_dict(), "data": data, "rng": rng}
    from safetensors.torch import save_file

    out = staged / PORTABLE
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(out / TENSORS))
    (out / STATE).write_text(json.dumps(state), encoding="utf-8")


def _rng_state() -> dict:
    import numpy as np
    import torch

    py, nump = random.getstate(), np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [nump[0], nump[1].tolist(), int(nump[2]), int(nump[3]), float(nump[4])],
             "cpu": torch.random.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _gather_rng() -> list[dict]:
    import torch.distributed as dist

    mine = _rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


# ---- loading it (every rank, after the model and optimizer are prepared) -----------------------------------------


def load(trainer, ckpt: Path) -> None:
    import torch
    from safetensors.torch import load_file

    state = read_state(ckpt)
    saved = load_file(str(Path(ckpt) / PORTABLE / TENSORS))
    params = trainable(trainer.model)
    names = {k.split("::", 1)[1] for k in saved if k.startswith("param::")}
    if names != set(params):
        raise UserError(f"checkpoint '{ckpt}' holds {len(names)} trainable tensors and this run has {len(params)} "
                        f"(first difference: {sorted(names ^ set(params))[0]}): resume with the same LoRA settings")
    step = state["adam_step"]
    if strategy_for(trainer.checkpoint_meta.get("strategy", "single")).portable_state == "deepspeed":
        _load_into_deepspeed(trainer, params, saved, step)
    else:
        base = _base_optimizer(trainer)
        on_device = any(g.get("fused") or g.get("capturable") for g in base.param_groups)  # torch keeps step there
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(_as(saved[f"param::{name}"], p))
                base.state[p] = {"step": torch.tensor(step, dtype=torch.float32,
                                                      device=p.device if on_device else "cpu"),
                                 **{key: _as(saved[f"{key}::{name}"], p) for key in MOMENTS}}
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    lrs = trainer.lr_scheduler.get_last_lr()  # the scheduler sets the groups' lr only when it steps
    for i, group in enumerate(trainer.optimizer.param_groups):
        group["lr"] = lrs[min(i, len(lrs) - 1)]


def _as(value, p):
    """A whole tensor in p's layout: its device and dtype, and under FSDP2 this rank's shard as a DTensor."""
    value = value.to(device=p.device, dtype=p.dtype)
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, p.device_mesh, p.placements)
    return value


def _load_into_deepspeed(trainer, params: dict, saved: dict, step: float) -> None:
    """Written against deepspeed 0.19.8. The ZeRO optimizer creates AdamW's moments at its first step (ZeRO-2 links
    them to each parameter's fragment only then), so a resumed engine has none yet: they are created (zeros, then
    overwritten) and linked first. `safe_set_full_*` write the fp32 masters and moments; the bf16 working weights
    are copied too (ZeRO-3: gathered for the copy, partitioned again after)."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = trainer.model_wrapped.optimizer
    base = zero.optimizer
    flats = getattr(zero, "single_partition_of_fp32_groups", None) or getattr(zero, "fp32_partitioned_groups_flat")
    for flat in flats:
        entry = base.state[flat]
        for key in MOMENTS:
            entry.setdefault(key, torch.zeros_like(flat))
        old = entry.get("step")
        entry["step"] = torch.tensor(step, dtype=torch.float32, device=old.device if torch.is_tensor(old) else "cpu")
    for group in base.param_groups:
        if "step" in group:  # DeepSpeed's FusedAdam counts per group
            group["step"] = int(step)
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, p in params.items():
        value = saved[f"param::{name}"].to(p.device)
        safe_set_full_fp32_param(p, value)
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, saved[f"{key}::{name}"].to(p.device), key)
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():  # no-op below ZeRO-3
            p.copy_(value.to(p.dtype).view_as(p))


def load_rng(trainer, ckpt: Path) -> None:
    """Rank r takes the RNG of the checkpoint's rank r (r modulo its world size: every rank starts from the same
    seed, so a new rank takes the state of the one it stands in for)."""
    import numpy as np
    import torch

    every = read_state(ckpt)["rng"]
    s = every[trainer.args.process_index % len(every)]
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.random.set_rng_state(torch.tensor(s["cpu"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(s["cuda"], dtype=torch.uint8))


class PortableResume:
    """Mixin for a transformers Trainer: with `portable_resume` on, a resume loads `portable/` instead of the
    checkpoint's per-layout files. Any resume also tells the data sampler its epoch (see `_epoch_on_resume`)."""

    portable_resume: bool = False

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            from transformers import TrainerCallback

            class EpochOnResume(TrainerCallback):
                # On a resume mid-epoch transformers wraps the loader to skip the trained batches, and accelerate's
                # set_epoch does not reach the sampler through that wrapper on several ranks (accelerate 1.15): the
                # epoch's order would be epoch 0's. Told here, before the first batch, on the prepared loader.
                def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
                    if state.global_step and hasattr(train_dataloader, "set_epoch"):
                        train_dataloader.set_epoch(int(state.epoch))

            self.add_callback(EpochOnResume)
        if resume_from_checkpoint and self.portable_resume:
            from dist_dpo.upstream.swaps import deepspeed_resume_load_off

            with deepspeed_resume_load_off():
                return super().train(resume_from_checkpoint, *args, **kwargs)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.portable_resume:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # the fp32 adapter comes with its AdamW moments, once the optimizer exists (_load_optimizer_and_scheduler)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if not self.portable_resume or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load(self, Path(checkpoint))

    def _load_rng_state(self, checkpoint):
        if not self.portable_resume or checkpoint is None:
            return super()._load_rng_state(checkpoint)
        load_rng(self, Path(checkpoint))
