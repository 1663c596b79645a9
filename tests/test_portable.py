"""Portable checkpoints on the real launcher (built-in tiny model, CPU, fp32): a run stopped after checkpoint-27 and
resumed on another process count continues the uninterrupted run's losses.

  two:          2 processes (ddp) x 8 pairs x 1 accumulation, 30 steps, checkpoint-27 (epoch 1: 25 steps per epoch)
  one:          1 process (single) x 8 pairs x 2 accumulation: the same global batch of 16
  one_from_two: two's checkpoint-27 alone in a new output_dir, resumed with 1 process (its recipe says accumulation
                1: the resume recomputes it); two_from_one: the reverse

The resumed steps add their gradients in another order (one process accumulates two micro-batches, two processes
all-reduce theirs), so they match within fp32 rounding, not bitwise.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from test_train_cpu import accelerate_cmd, run_env

STEPS, SAVE = 30, 27
ARGS = ["--config", "recipes/demo.yaml", "--max_steps", str(STEPS), "--save_steps", str(SAVE), "--logging_steps", "1",
        "--eval_steps", "0", "--lr_scheduler_type", "linear", "--warmup_ratio", "0.1", "--report_to", "none"]
ONE = [sys.executable, "-m", "dist_dpo", "train"]

pytestmark = pytest.mark.slow


def launch(cmd: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd + ARGS + ["--output_dir", str(out), *extra], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=600)


def steps(out: Path) -> dict[int, dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h for h in history if "loss" in h}


def stopped_after_checkpoint(run: Path, where: Path) -> Path:
    """What a run stopped after checkpoint-27 leaves: that checkpoint, nothing newer, no finished-run marker."""
    where.mkdir(parents=True)
    shutil.copytree(run / f"checkpoint-{SAVE}", where / f"checkpoint-{SAVE}")
    return where


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("portable")
    done = {}
    for name, cmd, extra in (("two", accelerate_cmd(), ["--gradient_accumulation_steps", "1"]),
                             ("one", ONE, ["--gradient_accumulation_steps", "2"])):
        proc = launch(cmd, base / name, *extra)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        done[name] = base / name
    for name, cmd, source in (("one_from_two", ONE, "two"), ("two_from_one", accelerate_cmd(), "one")):
        out = stopped_after_checkpoint(done[source], base / name)
        proc = launch(cmd, out, "--gradient_accumulation_steps", "1")  # the resume recomputes it
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        done[name] = out
        done[name + "_log"] = proc.stdout + proc.stderr
    return done


def test_every_checkpoint_holds_the_portable_state(runs):
    from dist_dpo.checkpoints import read_marker

    ckpt = runs["two"] / f"checkpoint-{SAVE}"
    marker = read_marker(ckpt)
    assert marker["global_batch"] == 16 and marker["world_size"] == 2 and marker["strategy"] == "ddp"
    assert {"portable/adapter_and_adam.safetensors", "portable/state.json"} <= set(marker["files"])  # published with it
    state = json.loads((ckpt / "portable" / "state.json").read_text())
    assert state["data"] == {"pairs": 400, "global_batch": 16, "seed": 42, "epoch": 1, "pairs_trained_in_epoch": 32}
    assert state["adam_step"] == SAVE and len(state["rng"]) == 2
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "portable" / "adapter_and_adam.safetensors"))
    assert len(tensors) == 3 * 56  # 7 LoRA targets x 4 layers x (A, B), each with its two moments
    assert all(k.split("::")[0] in ("param", "exp_avg", "exp_avg_sq") and ".lora_" in k for k in tensors)


@pytest.mark.parametrize("resumed, straight, line", [
    ("one_from_two", "two", f"resuming checkpoint-{SAVE} written by 2 processes under ddp on 1 process under single"),
    ("two_from_one", "one", f"resuming checkpoint-{SAVE} written by 1 process under single on 2 processes under ddp"),
])
def test_resume_on_another_process_count_continues_the_run(runs, resumed, straight, line):
    log = runs[resumed + "_log"]
    said = re.findall(r"resuming checkpoint-.*$", log, re.M)
    assert len(said) == 1 and said[0].startswith(line), log[-3000:]
    assert "32 of 400 pairs of epoch 1 trained" in said[0] and "keeps the global batch of 16" in said[0]
    assert not re.search(rf"step ([1-9]|1\d|2[0-7])/{STEPS} \|", log)  # steps 1..27 were not redone
    expected, got = steps(runs[straight]), steps(runs[resumed])
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, SAVE + 1):  # from the checkpoint's history, as written
        assert got[step]["loss"] == expected[step]["loss"]
    for step in range(SAVE + 1, STEPS + 1):
        a, b = expected[step], got[step]
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-12), step  # the scheduler went on
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (step, a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5, (step, a["grad_norm"], b["grad_norm"])
    accumulation = {"one_from_two": 2, "two_from_one": 1}[resumed]
    assert f"gradient_accumulation_steps: {accumulation}" in (runs[resumed] / "resolved_config.yaml").read_text()
    assert json.loads((runs[resumed] / "dist_dpo_run.json").read_text())["global_step"] == STEPS


def test_the_two_layouts_train_the_same_steps(runs):
    """The order of the pairs is the global batch's, not the process count's: the two straight runs agree too."""
    two, one = steps(runs["two"]), steps(runs["one"])
    assert max(abs(two[s]["loss"] - one[s]["loss"]) for s in two) <= 1e-5


def test_a_global_batch_that_cannot_be_kept_is_refused(runs, tmp_path):
    out = stopped_after_checkpoint(runs["two"], tmp_path / "run")
    before = sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*"))
    proc = launch(ONE, out, "--per_device_train_batch_size", "3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = re.findall(r"^dist-dpo: error: .*$", proc.stderr, re.M)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "global batch of 16 pairs; 1 process x per_device_train_batch_size 3 cannot keep it: " \
           "per_device_train_batch_size 1, 2, 4, 8, 16 would keep it" in lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # nothing written
