"""Checkpoints are complete or invisible, and resume picks the right one (fast, in-process).

The 2-process kill -> resume -> bitwise-equal-loss test is in test_faults.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dist_dpo.checkpoints import (
    MARKER,
    STAGING,
    AtomicCheckpoints,
    check_resumable,
    complete_checkpoints,
    last_complete_checkpoint,
    publish,
    read_marker,
    rotate,
    why_incomplete,
)
from dist_dpo.errors import UserError


def make_ckpt(root: Path, step: int, world_size: int = 2, complete: bool = True) -> Path:
    staged = root / STAGING / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / "optimizer.pt").write_bytes(os.urandom(1000 + step))
    (staged / "sub").mkdir()
    (staged / "sub" / "shard.bin").write_bytes(b"x" * step)
    final = root / f"checkpoint-{step}"
    if complete:
        publish(staged, final, {"global_step": step, "world_size": world_size})
    else:
        staged.rename(final)  # what an in-place writer leaves: everything but the marker
    return final


def test_publish_renames_a_marked_dir_into_place(tmp_path):
    ckpt = make_ckpt(tmp_path, 4)
    assert not (tmp_path / STAGING / "checkpoint-4").exists()
    meta = read_marker(ckpt)
    assert meta["global_step"] == 4 and meta["world_size"] == 2
    assert meta["files"] == {"optimizer.pt": 1004, "sub/shard.bin": 4}
    assert why_incomplete(ckpt) is None


def test_publish_replaces_an_existing_dir_of_the_same_step(tmp_path):
    torn = make_ckpt(tmp_path, 4, complete=False)
    (torn / "stale").write_text("from the cut-off save")
    ckpt = make_ckpt(tmp_path / "again", 4)
    staged = tmp_path / STAGING / "checkpoint-4"
    ckpt.rename(staged)
    (staged / MARKER).unlink()
    publish(staged, tmp_path / "checkpoint-4", {"global_step": 4, "world_size": 1})
    assert not (tmp_path / "checkpoint-4" / "stale").exists() and why_incomplete(tmp_path / "checkpoint-4") is None
    assert not list((tmp_path / STAGING).iterdir())


@pytest.mark.parametrize("damage, reason", [
    (lambda c: (c / MARKER).unlink(), "no dist_dpo_checkpoint.json"),
    (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda c: (c / "sub" / "shard.bin").write_bytes(b"x"), "sub/shard.bin has 1 bytes, 6 were written"),
    (lambda c: (c / MARKER).write_text("{truncated"), "no dist_dpo_checkpoint.json"),
])
def test_a_damaged_checkpoint_is_incomplete_and_never_picked(tmp_path, damage, reason):
    good = make_ckpt(tmp_path, 4)
    bad = make_ckpt(tmp_path, 6)
    damage(bad)
    assert reason in why_incomplete(bad)
    assert last_complete_checkpoint(tmp_path) == good


def test_last_complete_checkpoint_ignores_staging_and_other_names(tmp_path):
    assert last_complete_checkpoint(tmp_path) is None
    assert last_complete_checkpoint(tmp_path / "missing") is None
    make_ckpt(tmp_path, 2)
    ten = make_ckpt(tmp_path, 10)  # numeric order, not text order (10 > 9 > 2)
    make_ckpt(tmp_path, 9)
    make_ckpt(tmp_path, 12, complete=False)
    (tmp_path / STAGING / "checkpoint-14").mkdir(parents=True)  # a save cut off before its rename
    (tmp_path / "checkpoint-final").mkdir()
    assert last_complete_checkpoint(tmp_path) == ten
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]


def test_rotation_counts_complete_checkpoints_only(tmp_path):
    for step in (2, 4, 6):
        make_ckpt(tmp_path, step)
    torn = make_ckpt(tmp_path, 8, complete=False)
    rotate(tmp_path, keep=2, protect=None)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert torn.is_dir()  # not ours to judge, and never counted as one of the kept
    rotate(tmp_path, keep=1, protect=str(tmp_path / "checkpoint-4"))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]


def test_resume_refuses_torn_checkpoints_and_another_layout_without_portable_state(tmp_path):
    from dist_dpo.portable import choose

    ckpt = make_ckpt(tmp_path, 4, world_size=2)  # an older marker: no global batch, no portable state
    marker = check_resumable(ckpt)
    same = choose(ckpt, {**marker, "strategy": "ddp"}, 2, "ddp", per_device=8, pairs=400)
    assert not same.portable and same.accumulation is None and same.line.startswith(f"resuming from {ckpt}")
    with pytest.raises(UserError, match="written by 2 processes under ddp without portable state .* this run has "
                                        "4 processes under ddp: relaunch that way"):
        choose(ckpt, {**marker, "strategy": "ddp"}, 4, "ddp", per_device=8, pairs=400)
    torn = make_ckpt(tmp_path, 6, complete=False)
    with pytest.raises(UserError, match="is incomplete"):
        check_resumable(torn)


def test_the_global_batch_is_kept_or_the_resume_is_refused_with_what_would_work(tmp_path):
    from dist_dpo.portable import PORTABLE, STATE, choose

    ckpt = make_ckpt(tmp_path, 40, world_size=2)
    marker = {"world_size": 2, "strategy": "ddp", "global_batch": 32}
    same = choose(ckpt, marker, 2, "ddp", per_device=4, pairs=400)  # the same layout, a smaller micro-batch
    assert (same.portable, same.accumulation) == (False, 4)
    with pytest.raises(UserError, match="without portable state"):  # another layout needs it
        choose(ckpt, marker, 1, "single", per_device=8, pairs=400)
    (ckpt / PORTABLE).mkdir()
    (ckpt / PORTABLE / STATE).write_text(json.dumps(
        {"data": {"pairs": 400, "global_batch": 32, "epoch": 3, "pairs_trained_in_epoch": 160}}))
    moved = choose(ckpt, marker, 1, "single", per_device=8, pairs=400)
    assert (moved.portable, moved.accumulation) == (True, 4)
    assert moved.line.startswith("resuming checkpoint-40 written by 2 processes under ddp on 1 process under single")
    assert "160 of 400 pairs of epoch 3" in moved.line
    with pytest.raises(UserError, match="1 process x per_device_train_batch_size 5 cannot keep it: "
                                        "per_device_train_batch_size 1, 2, 4, 8, 16, 32 would keep it"):
        choose(ckpt, marker, 1, "single", per_device=5, pairs=400)
    with pytest.raises(UserError, match="no per-device batch splits 32 pairs over 3 processes"):
        choose(ckpt, marker, 3, "ddp", per_device=2, pairs=400)
    with pytest.raises(UserError, match="trained on 400 preference pairs and this run has 399"):
        choose(ckpt, marker, 1, "single", per_device=8, pairs=399)


def test_the_library_internals_portable_resume_relies_on_are_there():
    """dist_dpo/portable.py: transformers 5.17's Trainer loads a DeepSpeed checkpoint through the module-level
    deepspeed_load_checkpoint (swapped out for a portable resume), and the three loading methods it overrides."""
    import inspect

    import transformers.trainer as hf

    assert callable(hf.deepspeed_load_checkpoint)
    assert "deepspeed_load_checkpoint(" in inspect.getsource(hf.Trainer._prepare_for_training)
    for name in ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_rng_state"):
        assert name in inspect.getsource(hf.Trainer._prepare_for_training) + inspect.getsource(hf.Trainer.train) + \
            inspect.getsource(hf.Trainer._run_epoch), name
    import deepspeed.utils as ds

    for name in ("safe_get_full_fp32_param", "safe_get_full_optimizer_state", "safe_set_full_fp32_param",
                 "safe_set_full_optimizer_state"):
        assert callable(getattr(ds, name)), name
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert hasattr(DeepSpeedZeroOptimizer, "_lazy_init_hp_params_optimizer_state")


@pytest.mark.parametrize("world", [1, 2])
def test_the_grouped_order_is_drawn_per_epoch_through_accelerates_loader(world):
    """A resumed run builds a fresh sampler: epoch e's order must come from (seed, e), reached by set_epoch through
    accelerate's loader, with or without the dealing-out across ranks."""
    import random

    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard
    from torch.utils.data import BatchSampler

    from dist_dpo.speed.batching import length_grouped_sampler

    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(200)]

    def order(epoch: int) -> list[int]:
        sampler = length_grouped_sampler(lengths, 16, 42, per_device=8, world=world)
        batches = BatchSampler(sampler, 8, False)
        shard = BatchSamplerShard(batches, world, 0) if world > 1 else batches
        loader = DataLoaderShard(list(range(200)), batch_sampler=shard)
        loader.set_epoch(epoch)
        return [i for b in loader for i in b.tolist()]

    assert order(0) != order(1) and order(1) == order(1)  # each epoch its own, and the same on every build


def test_a_save_cut_off_midway_leaves_no_checkpoint(tmp_path, builtin_model):
    """The real Trainer save path with our override: a crash after the model and optimizer were written (the RNG
    save raises) leaves the previous checkpoint as the last complete one and nothing named checkpoint-2."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class Trainer(AtomicCheckpoints, DPOTrainer):
        checkpoint_meta = {"world_size": 1, "strategy": "single"}
        crash_at_step = 2

        def _save_rng_state(self, output_dir):
            if self.state.global_step == self.crash_at_step:
                raise KeyboardInterrupt("killed mid-save")
            return super()._save_rng_state(output_dir)

    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]} for i in range(8)]

    def trainer(max_steps):
        args = DPOConfig(max_steps=max_steps, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                         output_dir=str(tmp_path), max_length=64, logging_steps=1, save_steps=1, save_total_limit=2)
        return Trainer(model=AutoModelForCausalLM.from_pretrained(builtin_model), args=args,
                       train_dataset=Dataset.from_list(rows),
                       processing_class=AutoTokenizer.from_pretrained(builtin_model),
                       peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))

    with pytest.raises(KeyboardInterrupt):
        trainer(3).train()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert not (tmp_path / "checkpoint-2").exists()
    cut = tmp_path / STAGING / "checkpoint-2"
    assert (cut / "adapter_model.safetensors").is_file() and (cut / "optimizer.pt").is_file()
    assert not (cut / MARKER).exists()

    again = trainer(3)
    again.crash_at_step = None
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not (tmp_path / STAGING).exists()  # the stale half-save of step 2 was replaced, then the dir removed
    assert json.loads((tmp_path / "checkpoint-3" / MARKER).read_text())["global_step"] == 3
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


@pytest.fixture(scope="module")
def builtin_model():
    from dist_dpo.model_zoo import ensure_builtin_model

    return str(ensure_builtin_model())


@pytest.mark.parametrize("stage,peft", [(2, True), (1, True), (3, True), (2, False), (None, True)])
def test_zero12_saves_the_adapter_without_the_whole_models_state_dict(tmp_path, builtin_model, stage, peft):
    """Under ZeRO-1/2 a PEFT model's save goes straight to peft (no whole-model copy to CPU on every rank); ZeRO-3,
    a plain model and no DeepSpeed keep transformers' save_model."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dist_dpo.checkpoints import WholeAdapterSaves

    model = AutoModelForCausalLM.from_pretrained(builtin_model)
    if peft:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    calls = []

    class Library:  # stands in for transformers.Trainer
        def save_model(self, output_dir=None, _internal_call=False):
            calls.append(("transformers", output_dir))

        def _save(self, output_dir, state_dict=None):
            calls.append(("peft", output_dir, state_dict))

    class Trainer(WholeAdapterSaves, Library):
        pass

    t = Trainer()
    t.model = model
    t.is_deepspeed_enabled = stage is not None
    t.deepspeed = SimpleNamespace(zero_optimization_stage=lambda: stage) if stage is not None else None
    t.args = SimpleNamespace(should_save=True, output_dir=str(tmp_path), push_to_hub=False)
    t.save_model(str(tmp_path / "ckpt"), _internal_call=True)
    direct = stage in (1, 2) and peft
    assert calls == ([("peft", str(tmp_path / "ckpt"), None)] if direct else [("transformers", str(tmp_path / "ckpt"))])
    calls.clear()
    t.args.should_save = False  # a rank that does not write: no copy at all under ZeRO-1/2
    t.save_model()
    assert calls == ([] if direct else [("transformers", None)])
