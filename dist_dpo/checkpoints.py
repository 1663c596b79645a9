"""Checkpoints that are either complete or invisible, and the choice of which one a run resumes from.

transformers' Trainer writes `checkpoint-N` in place, file after file, then rotates old checkpoints away. A job killed
mid-save leaves a `checkpoint-N` that looks resumable and is not (a missing optimizer.pt, a half-written adapter),
and a kill between its rotation and the next save can leave no good checkpoint at all. The Trainer has no hook for
this (callbacks run after the save; `save_only_model` etc. don't change where files go), so `AtomicCheckpoints`
overrides `_save_checkpoint` around the library's own saving code:

  1. the Trainer saves into `<output_dir>/.incomplete/checkpoint-N` (it asks `_get_output_dir` where to write);
  2. every rank adds the checkpoint's portable state (dist_dpo/portable.py: gathered from the shards, so all take
     part) and fsyncs what it wrote (ZeRO/FSDP ranks write their own shards), then all meet at a barrier;
  3. the saving rank writes `dist_dpo_checkpoint.json` (step, world size, strategy, global batch, every file with its
     size), fsyncs it,
     renames the directory to `<output_dir>/checkpoint-N` (atomic within one file system) and fsyncs output_dir;
  4. only then are old complete checkpoints rotated away, and all ranks meet again.

Resume takes the newest `checkpoint-N` whose marker is present and whose every listed file exists with its size,
so a save cut off at any point is never picked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from dist_dpo.errors import UserError
from dist_dpo.logs import get_logger

_CKPT = re.compile(r"^checkpoint-(\d+)$")
MARKER = "dist_dpo_checkpoint.json"  # written last, inside the staging dir, just before the rename
RUN_MARKER = "dist_dpo_run.json"  # in output_dir, written last by `train` when the adapter is saved and verified
STAGING = ".incomplete"  # never matches checkpoint-N, so neither we nor transformers ever resume from it


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root to disk (clean pages cost nothing, so every rank may do it)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _listing(ckpt: Path) -> dict[str, int]:
    return {
        str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MARKER
    }


def publish(staged: Path, final: Path, meta: dict) -> None:
    """Marker, fsync, atomic rename: `final` appears complete or not at all."""
    marker = staged / MARKER
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({**meta, "files": _listing(staged)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync(staged)
    if final.exists():  # the same step saved again (or a torn dir from an older writer): replace it
        old = staged.parent / f"{final.name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, final)
    _fsync(final.parent)


def read_marker(ckpt: Path) -> dict | None:
    try:
        return json.loads((Path(ckpt) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def why_incomplete(ckpt: Path) -> str | None:
    """None if the checkpoint is complete, else what is wrong with it."""
    meta = read_marker(ckpt)
    if meta is None:
        return f"no {MARKER} (the save was cut off, or an older dist-dpo wrote it)"
    for rel, size in meta.get("files", {}).items():
        p = Path(ckpt) / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {size} were written"
    return None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint dirs, oldest step first."""
    found = []
    if not Path(output_dir).is_dir():
        return []
    for d in Path(output_dir).iterdir():
        m = _CKPT.match(d.name)
        if m and d.is_dir() and why_incomplete(d) is None:
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    out = Path(output_dir)
    if not out.is_dir():
        return None
    for d in sorted((d for d in out.iterdir() if _CKPT.match(d.name) and d.is_dir()),
                    key=lambda d: int(_CKPT.match(d.name).group(1)), reverse=True):
        problem = why_incomplete(d)
        if problem is None:
            return d
        get_logger().warning("skipping %s: %s", d, problem)
    return None


def check_resumable(ckpt: Path) -> dict:
    """The checkpoint's marker, if it is complete. Whether this run's layout can resume it is portable.choose."""
    problem = why_incomplete(ckpt)
    if problem:
        raise UserError(
            f"checkpoint '{ckpt}' is incomplete ({problem}); pass --resume auto to use the last complete one"
        )
    return read_marker(ckpt)


def discard_staging(output_dir: Path) -> None:
    """Leftovers of a save that was cut off (rank 0, before training: nobody writes there before a barrier)."""
    shutil.rmtree(Path(output_dir) / STAGING, ignore_errors=True)


def rotate(output_dir: Path, keep: int | None, protect: str | None) -> None:
    """Delete the oldest COMPLETE checkpoints beyond `keep`. transformers' rotate_checkpoints counts torn dirs too
    (it could delete the last good one to keep a torn one), so we rotate ourselves."""
    if not keep or keep <= 0:
        return
    ckpts = complete_checkpoints(output_dir)
    for d in ckpts[:-keep]:
        if protect and Path(protect).resolve() == d.resolve():
            continue
        shutil.rmtree(d, ignore_errors=True)


class AtomicCheckpoints:
    """Mixin for a transformers Trainer (put it before the Trainer class): atomic, marked, fsynced checkpoints.
    `checkpoint_meta` (world size, strategy) is recorded in each marker."""

    checkpoint_meta: dict = {}
    _staging_root: Path | None = None

    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:  # only while _save_checkpoint runs
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging_root = run_dir / STAGING
        staged, final = staging_root / name, run_dir / name
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)  # everything transformers saves: model, optimizer, RNG, state
        finally:
            self._staging_root = None
        from dist_dpo import portable

        portable.save(self, staged)  # the same state in a form any world size and strategy can resume from
        if staged.is_dir():
            fsync_tree(staged)
        self.accelerator.wait_for_everyone()  # every rank's shards are on disk
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == staging_root:  # transformers named the staging path
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                self.state.save_to_json(str(staged / "trainer_state.json"))
            a = self.args
            batch = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
            publish(staged, final, {"global_step": self.state.global_step, "global_batch": batch, **self.checkpoint_meta})
            try:
                staging_root.rmdir()  # only if empty: never hide what is left of another save
            except OSError:
                pass
            rotate(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        # transformers loads the optimizer state with map_location=args.device; accelerate names a multi-process CPU
        # rank's device "cpu:0", which torch.load cannot map to ("don't know how to restore data location"), so a
        # CPU run could not resume at all. Plain "cpu" is the same memory.
        device = self.args.device
        if device.type != "cpu" or device.index is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from dist_dpo.upstream.swaps import torch_load_on_cpu

        with torch_load_on_cpu():
            return super()._load_optimizer_and_scheduler(checkpoint)


class WholeAdapterSaves:
    """Mixin for a transformers Trainer: under DeepSpeed ZeRO-1/2 a PEFT model saves its adapter as under DDP.

    Those stages keep every parameter whole on every rank, yet transformers' `save_model` takes the whole model's
    state dict through `accelerate.get_state_dict`, which copies it to CPU memory on every rank
    (`clone_tensors_for_torch_save`) for peft to keep only the adapter: at 1.5B, 3 GB per rank and 4.5 s of a 66 s
    ZeRO-2 epoch on 2 GPUs; at 7B, 15 GB of host memory per rank, per save.
    ZeRO-3 keeps transformers' gathering path (the parameters are sharded there)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from peft import PeftModel

        engine = getattr(self, "deepspeed", None) if self.is_deepspeed_enabled else None
        if engine is None or not isinstance(self.model, PeftModel) or engine.zero_optimization_stage() >= 3:
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir)  # peft's save_pretrained: the adapter, from the model
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
