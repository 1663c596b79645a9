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


def test_resume_refuses_another_process_count_and_torn_checkpoints(tmp_path):
    ckpt = make_ckpt(tmp_path, 4, world_size=2)
    check_resumable(ckpt, 2)
    check_resumable(ckpt, None)  # a one-process dry run before the launcher: it cannot know the job's size
    with pytest.raises(UserError, match="written by 2 processes and this run has 4: relaunch with 2 processes"):
        check_resumable(ckpt, 4)
    torn = make_ckpt(tmp_path, 6, complete=False)
    with pytest.raises(UserError, match="is incomplete"):
        check_resumable(torn, 2)


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
