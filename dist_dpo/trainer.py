"""`DistDPOTrainer`: trl's DPOTrainer with every change dist-dpo makes to how it trains, in one class.

Each concern is a mixin in the module that owns it; each override names the upstream method it mirrors, and calls
it wherever dist-dpo has nothing to add. Nothing is replaced on an instance.

  AtomicCheckpoints  (checkpoints.py)  transformers.Trainer._save_checkpoint / _get_output_dir /
                                       _load_optimizer_and_scheduler: complete-or-invisible checkpoints
  PortableResume     (portable.py)     Trainer.train / _load_from_checkpoint / _load_optimizer_and_scheduler /
                                       _load_rng_state: resume on another world size or strategy
  WholeAdapterSaves  (checkpoints.py)  Trainer.save_model: ZeRO-1/2 adapters saved as under DDP
  TokenizeAcrossRanks (data.py)        DPOTrainer._prepare_dataset: every rank tokenizes its part at once
  SpeedPathHooks     (below)           Trainer._get_train_sampler, DPOTrainer.compute_loss, Trainer.log,
                                       DPOTrainer._set_signature_columns_if_needed, Trainer._save_checkpoint,
                                       Trainer.train: the speed path (dist_dpo/speed), as `speed.apply` configured it
                                       for this run; and the two training arguments it settles before train()
                                       (run_micro_batches_of, checkpoint_layers): nothing else writes `args`
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from trl import DPOTrainer

from dist_dpo.checkpoints import AtomicCheckpoints, WholeAdapterSaves
from dist_dpo.data import TokenizeAcrossRanks
from dist_dpo.portable import PortableResume
from dist_dpo.speed import loss, ref_cache


@dataclass
class SpeedPathState:
    """What `dist_dpo.speed.apply` decided for this run: read by the trainer's hooks, benchmarks and tests."""
    applied: bool = False  # speed.apply ran: a second call returns the first one's report and changes nothing
    report: dict = field(default_factory=dict)  # the `speed path:` log line, as a dict
    sampler: object = None  # callable(trainer, dataset) -> sampler or None (trl's); pairs grouped by length
    pairs_per_rank: int | None = None  # the speed path's loss divides each rank's sum by it (ranks split by cost)
    own_loss: bool = False  # the speed path computes the loss (speed/loss.py: trl's loss, fewer host syncs)
    pending: list = field(default_factory=list)  # the speed path's loss's per-micro-step metrics, gathered at each log
    self_check: object = None  # callable(trainer, model) -> verdict dict, run before the first training loss
    self_check_verdict: dict | None = None
    ref_cache: object = None  # speed/ref_cache.RefLogpsCache: reference log-probs kept across epochs


class SpeedPathHooks:
    """Mixin for trl's DPOTrainer: where the speed path plugs into training. With `speed` at its defaults (no
    `speed.apply`, `fast_path: false`, or after the self-check turned it off) every hook is trl's own."""

    speed: SpeedPathState

    def _get_train_sampler(self, train_dataset=None):  # mirrors transformers.Trainer._get_train_sampler
        sampler = self.speed.sampler and self.speed.sampler(self, train_dataset)
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # mirrors trl.DPOTrainer.compute_loss
        if self.speed.self_check is not None and self.model.training:
            check, self.speed.self_check = self.speed.self_check, None  # once, even if it raises
            self.speed.self_check_verdict = check(self, model)  # may turn the speed path off for the run
        if self.speed.own_loss and self.model.training and not return_outputs:
            return loss.compute_loss(self, model, inputs, num_items_in_batch)
        inputs = {k: v for k, v in inputs.items() if k not in ref_cache.BATCH_KEYS}  # trl hands the rest to the model
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _set_signature_columns_if_needed(self):  # mirrors trl.DPOTrainer._set_signature_columns_if_needed
        super()._set_signature_columns_if_needed()
        if self.speed.ref_cache is not None and ref_cache.COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ref_cache.COLUMN]  # the rows reach the collator

    def _save_checkpoint(self, model, trial):  # mirrors transformers.Trainer._save_checkpoint
        super()._save_checkpoint(model, trial)
        cache = self.speed.ref_cache
        if cache is not None:  # every rank saves a checkpoint at the same step: they share, then one writes
            cache.share()
            if self.args.should_save:
                cache.save(Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}")

    def train(self, resume_from_checkpoint=None, *args, **kwargs):  # mirrors transformers.Trainer.train
        cache = self.speed.ref_cache
        if cache is not None and isinstance(resume_from_checkpoint, (str, os.PathLike)):
            why = cache.load(Path(resume_from_checkpoint))
            if self.is_world_process_zero():
                from dist_dpo.logs import get_logger

                get_logger().info("reference log-probs: %s", f"{int(cache.held.sum())} pairs read from the checkpoint"
                                  if why is None else f"computed again ({why})")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def run_micro_batches_of(self, pairs: int) -> None:
        """Run `pairs` per micro-batch, keeping the pairs per optimizer step (speed/microbatch.py decides it, before
        train()). What transformers.Trainer.__init__ and accelerate derived from the recipe's batch follows: the
        Trainer's copy of the batch size and accelerate's accumulation count."""
        a = self.args
        if pairs == a.per_device_train_batch_size:
            return
        step = a.per_device_train_batch_size * a.gradient_accumulation_steps
        a.per_device_train_batch_size, a.gradient_accumulation_steps = pairs, step // pairs
        self._train_batch_size = a.train_batch_size  # mirrors Trainer.__init__
        self.accelerator.gradient_accumulation_steps = a.gradient_accumulation_steps

    def checkpoint_layers(self, on: bool) -> None:
        """Whether train() enables gradient checkpointing (speed/checkpointing.py plans it against the tokenized
        pairs, before train(); the layers it recomputes are set on the model there)."""
        self.args.gradient_checkpointing = on

    def log(self, logs, start_time=None):  # mirrors transformers.Trainer.log
        if (self.speed.own_loss or self.speed.pending) and self.model.training:  # every rank gets here: the Trainer
            # gathered the loss first
            loss.flush_metrics(self)
        return super().log(logs, start_time)


class DistDPOTrainer(AtomicCheckpoints, PortableResume, WholeAdapterSaves, TokenizeAcrossRanks, SpeedPathHooks,
                     DPOTrainer):
    """trl's DPOTrainer as `dist-dpo train` runs it. `checkpoint_meta` (world size, strategy) goes into every
    checkpoint's marker; `portable_resume` makes a resume load the checkpoint's portable state."""

    def __init__(self, *args, checkpoint_meta: dict | None = None, portable_resume: bool = False, **kwargs):
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.portable_resume = portable_resume
        self.speed = SpeedPathState()
        super().__init__(*args, **kwargs)
