"""Reference log-probs kept across epochs (dist_dpo/speed/ref_cache.py): later epochs read the first epoch's values
instead of running the reference forward, with trl's losses; a resumed run reads them from its checkpoint; values
written for another model or data are not taken; where the reference is not fixed the cache is off, with the reason.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, apply_speed_path, lora_b_nonzero

sys.path.insert(0, str(ROOT / "benchmarks"))

PAIRS, BATCH, EPOCHS = 24, 6, 3  # 4 steps an epoch


@pytest.fixture(scope="module")
def pairs():
    import datasets
    import preference_sets

    rows = preference_sets.variable_rows(PAIRS, seed=4, cap=60)
    return datasets.Dataset.from_list([preference_sets.conversational(r) for r in rows])


def build(pairs, fast, dropout=0.0, cuda=False, **train_keys):
    """A 3-epoch run on the built-in tiny model (fp32 on CPU, or bf16 on GPU 0 with `cuda`; SGD, LoRA B non-zero);
    trl's own class unless `fast`."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dist_dpo.model_zoo import ensure_builtin_model
    from dist_dpo.trainer import DistDPOTrainer

    path = ensure_builtin_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa", attention_dropout=dropout)
    args = DPOConfig(output_dir="/tmp/dist_dpo_test_ref_cache", per_device_train_batch_size=BATCH, max_length=256,
                     report_to=[], use_cpu=not cuda, bf16=cuda, logging_steps=1, gradient_checkpointing=False, seed=0,
                     num_train_epochs=EPOCHS, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
                     save_strategy="no", dataloader_num_workers=0)
    cls = DistDPOTrainer if fast else DPOTrainer
    trainer = cls(model=model, args=args, train_dataset=pairs, processing_class=AutoTokenizer.from_pretrained(path),
                  peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                         target_modules="all-linear"))
    lora_b_nonzero(trainer)
    if fast:
        apply_speed_path(trainer, "cuda" if cuda else "cpu", group_by_length=False, **train_keys)
    return trainer


def losses(trainer) -> list[float]:
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_later_epochs_read_the_first_epochs_reference_with_trls_losses(pairs):
    trl = losses(build(pairs, fast=False))
    cached = build(pairs, fast=True)
    assert cached.speed.report["reference"].startswith("log-probs kept from the first epoch")
    got = losses(cached)
    plain = build(pairs, fast=True, ref_logps_cache=False)
    assert plain.speed.report["reference"] == "computed every step (ref_logps_cache: false)"
    without = losses(plain)
    steps = EPOCHS * PAIRS // BATCH
    assert len(trl) == len(got) == len(without) == steps
    assert got == pytest.approx(trl, abs=1e-5) and got == pytest.approx(without, abs=1e-5)
    cache = cached.speed.ref_cache
    assert (cache.computed, cache.used) == (PAIRS // BATCH, steps - PAIRS // BATCH)  # the reference ran in epoch 1 only
    assert cache.complete and plain.speed.ref_cache is None


def test_a_fixed_reference_is_required(pairs):
    from dist_dpo.errors import UserError

    noisy = build(pairs, fast=True, dropout=0.1)
    assert noisy.speed.ref_cache is None
    assert "attention_dropout=0.1" in noisy.speed.report["reference"]
    with pytest.raises(UserError, match="ref_logps_cache: true, but the reference log-probs cannot be kept here"):
        build(pairs, fast=True, dropout=0.1, ref_logps_cache=True)


def test_values_are_shared_across_ranks_and_keyed(pairs, tmp_path):
    from dist_dpo.speed import ref_cache

    trainer = build(pairs, fast=True)
    cache = trainer.speed.ref_cache
    rows = torch.tensor([3, 5])
    cache.store({"ref_rows": rows}, torch.tensor([-1.5, -2.5]), torch.tensor([-3.0, -4.0]))
    assert cache.lookup({"ref_rows": rows, "ref_rows_host": [3, 5]}) is None  # not shared yet
    cache.share()
    chosen, rejected = cache.lookup({"ref_rows": rows, "ref_rows_host": [3, 5]})
    assert chosen.tolist() == [-1.5, -2.5] and rejected.tolist() == [-3.0, -4.0] and not cache.complete
    assert cache.lookup({"ref_rows": torch.tensor([3, 4]), "ref_rows_host": [3, 4]}) is None
    cache.save(tmp_path)
    fresh = build(pairs, fast=True).speed.ref_cache
    assert fresh.load(tmp_path) is None and bool(fresh.held[3]) and not bool(fresh.held[4])
    other = build(pairs.select(range(PAIRS - 1)).add_item(pairs[0]), fast=True).speed.ref_cache  # another last row
    assert other.load(tmp_path) == "they were computed for another model, data or truncation"
    state = torch.load(tmp_path / ref_cache.FILE)
    assert state["key"] == cache.key and state["values"].shape == (PAIRS, 2)


# ---- the real launcher: a resumed run reads the checkpoint's values; two processes share theirs -------------------

CLI = ["--config", "recipes/demo.yaml", "--max_train_samples", "48", "--per_device_train_batch_size", "8",
       "--num_train_epochs", "2", "--max_steps", "-1", "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "6",
       "--report_to", "none", "--group_by_length", "false"]


def cli(out, *extra, processes=1):
    from test_train_cpu import accelerate_cmd, run_env

    cmd = accelerate_cmd() if processes == 2 else [sys.executable, "-m", "dist_dpo", "train"]
    proc = subprocess.run(cmd + CLI + ["--output_dir", str(out), *extra], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}, proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_resumed_run_reads_the_reference_from_its_checkpoint(tmp_path):
    straight, _ = cli(tmp_path / "straight")
    assert (tmp_path / "straight" / "checkpoint-6" / "ref_logps.pt").is_file()
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-6", resumed_dir / "checkpoint-6")
    resumed, log = cli(resumed_dir)
    assert "reference log-probs: 48 pairs read from the checkpoint" in log
    assert all(s in resumed for s in range(7, 13))  # 1-6 come with the checkpoint's trainer state
    assert [resumed[s] for s in range(7, 13)] == pytest.approx([straight[s] for s in range(7, 13)], abs=1e-5)
    # values written for other data are not taken: the run computes them again and says why
    from dist_dpo.speed import ref_cache

    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-6", other / "checkpoint-6")
    state = torch.load(other / "checkpoint-6" / ref_cache.FILE)
    torch.save({**state, "key": "another model"}, other / "checkpoint-6" / ref_cache.FILE)
    marker = other / "checkpoint-6" / "dist_dpo_checkpoint.json"  # lists every file with its size: keep it true
    meta = json.loads(marker.read_text())
    meta["files"][ref_cache.FILE] = (other / "checkpoint-6" / ref_cache.FILE).stat().st_size
    marker.write_text(json.dumps(meta))
    recomputed, log = cli(other)
    assert "reference log-probs: computed again (they were computed for another model, data or truncation)" in log
    assert [recomputed[s] for s in range(7, 13)] == pytest.approx([straight[s] for s in range(7, 13)], abs=1e-5)


@pytest.mark.slow
def test_two_processes_share_the_reference_with_the_losses_of_no_cache(tmp_path):
    cached, log = cli(tmp_path / "cached", processes=2)
    assert "reference: log-probs kept from the first epoch" in log
    plain, _ = cli(tmp_path / "plain", "--ref_logps_cache", "false", processes=2)
    assert sorted(cached) == sorted(plain) == list(range(1, 7))  # 48 pairs / (2 x 8) = 3 steps an epoch
    assert [cached[s] for s in sorted(cached)] == pytest.approx([plain[s] for s in sorted(plain)], abs=1e-5)


@pytest.mark.gpu
def test_on_a_gpu_the_cached_epochs_train_as_the_uncached_ones(pairs):
    """bf16 on GPU 0, packed rows: the values read in epochs 2-3 were computed in other micro-batches of epoch 1, so
    they may differ from a fresh reference forward by bf16 rounding, no more."""
    cached = build(pairs, fast=True, cuda=True)
    got = losses(cached)
    without = losses(build(pairs, fast=True, cuda=True, ref_logps_cache=False))
    print(f"cached {got}\nwithout {without}")
    assert len(got) == len(without) == EPOCHS * PAIRS // BATCH
    assert max(abs(a - b) for a, b in zip(got, without)) < 2e-3
    assert cached.speed.ref_cache.used == (EPOCHS - 1) * PAIRS // BATCH


def test_a_damaged_values_file_is_a_reason_not_a_crash(pairs, tmp_path):
    from dist_dpo.speed import ref_cache

    cache = build(pairs, fast=True).speed.ref_cache
    (tmp_path / ref_cache.FILE).write_bytes(b"not a torch file")
    assert cache.load(tmp_path).startswith("ref_logps.pt cannot be read")
    torch.save({"key": cache.key}, tmp_path / ref_cache.FILE)
    assert cache.load(tmp_path) == "ref_logps.pt holds no values"
    assert not cache.held.any()
