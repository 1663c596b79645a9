"""Faults on the real 2-process CPU job (accelerate launch -> torchrun -> 2 gloo ranks), shared by the tests below:

  straight: 8 steps uninterrupted;
  killed:   the same run, rank 1 killed with SIGKILL right after checkpoint-4 is published;
  resumed:  the same command again in the killed run's dir, after planting torn checkpoints next to checkpoint-4.

Every run has fake W&B / HF tokens in its environment and W&B logging on (offline): none may show up anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import LAUNCH_ENV, ROOT

# Dropout on (trl turns it off by default): the RNG state must be restored, or steps 5-8 differ (checked: a
# resume with other RNG states changes the step-5 loss in the 3rd digit). Linear decay after warmup: so must the
# scheduler. Adam: so must the optimizer.
ARGS = ["--config", "recipes/demo.yaml", "--max_steps", "8", "--save_steps", "4", "--logging_steps", "1",
        "--eval_steps", "0", "--lora_dropout", "0.1", "--dpo_extra", "{disable_dropout: false}",
        "--lr_scheduler_type", "linear", "--warmup_ratio", "0.25", "--collective_timeout_s", "30",
        "--report_to", "tensorboard,wandb"]
SECRETS = {"WANDB_API_KEY": "wandb" + uuid.uuid4().hex + uuid.uuid4().hex[:8],  # 40 characters, like a real key
           "HF_TOKEN": "hf_" + uuid.uuid4().hex}
EXIT_WITHIN_S = 60

pytestmark = pytest.mark.slow


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    e.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", WANDB_MODE="offline", **SECRETS)
    return e


def launch_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
            "accelerate_configs/cpu.yaml", "-m", "dist_dpo", "train", *ARGS, "--output_dir", str(out)]


def launch(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(out), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def step_logs(out: Path) -> list[dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h]


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has exited
    except FileNotFoundError:
        return False


def rank_pid(out: Path, rank: int) -> int:
    m = re.search(rf"rank {rank} of 2 .*\| pid (\d+)", (out / "logs" / f"rank{rank}.log").read_text())
    assert m, f"no pid line in rank{rank}.log"
    return int(m.group(1))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = launch(out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, out


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    base = tmp_path_factory.mktemp("killed")
    out, log = base / "run", base / "launcher.log"
    with open(log, "w") as f:
        job = subprocess.Popen(launch_cmd(out), cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        marker = out / "checkpoint-4" / "dist_dpo_checkpoint.json"
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "checkpoint-4 never appeared"
            time.sleep(0.05)
        pids = rank_pid(out, 0), rank_pid(out, 1)
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        job.wait(timeout=EXIT_WITHIN_S + 30)
        while any(alive(p) for p in pids) and time.monotonic() - start < EXIT_WITHIN_S + 30:
            time.sleep(0.1)
        seconds = time.monotonic() - start
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    pristine = base / "pristine"  # as the kill left it, for the tests that must not see the resumed run
    shutil.copytree(out, pristine)
    return {"out": out, "pristine": pristine, "log": log.read_text(), "seconds": seconds, "pids": pids,
            "rc": job.returncode}


@pytest.fixture(scope="module")
def resumed(killed):
    out = killed["out"]
    good = out / "checkpoint-4"
    # Torn saves next to the good one, each newer, each fatal if it were loaded:
    torn_old_writer = out / "checkpoint-6"  # transformers' in-place writer cut off: no marker, half an optimizer.pt
    shutil.copytree(good, torn_old_writer)
    (torn_old_writer / "dist_dpo_checkpoint.json").unlink()
    opt = torn_old_writer / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    damaged = out / "checkpoint-7"  # marked, then a file lost bytes (a full disk, a bad copy)
    shutil.copytree(good, damaged)
    adapter = damaged / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])
    staged = out / ".incomplete" / "checkpoint-8"  # our own save cut off before its rename
    shutil.copytree(good, staged)
    proc = launch(out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, out


def test_kill9_one_rank_every_process_exits_with_a_clear_line(killed):
    assert killed["seconds"] < EXIT_WITHIN_S, f"the job needed {killed['seconds']:.1f} s to go away"
    assert not any(alive(p) for p in killed["pids"])
    assert killed["rc"] != 0
    text = killed["log"]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s+:\s*-9", text), text[-3000:]  # the kill we did
    lines = re.findall(r"^dist-dpo: rank 0: .*$", text, re.M)
    assert len(lines) == 1, text[-3000:]
    assert re.search(r"stopped by SIGTERM|lost contact with the other ranks", lines[0])
    assert "rerun the same command to resume from checkpoint-4" in lines[0]
    assert not re.search(r'File ".*dist_dpo/', text), text[-4000:]  # no traceback from our code


def test_the_kill_left_one_complete_checkpoint(killed):
    from dist_dpo.checkpoints import last_complete_checkpoint, read_marker

    out = killed["pristine"]
    assert last_complete_checkpoint(out) == out / "checkpoint-4"
    marker = read_marker(out / "checkpoint-4")
    assert marker["global_step"] == 4 and marker["world_size"] == 2 and marker["strategy"] == "ddp"
    assert {"optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors",
            "trainer_state.json"} <= set(marker["files"])
    assert not (out / "dist_dpo_run.json").exists()


def test_resume_continues_bitwise_equal(straight, resumed):
    proc, out = resumed
    _, reference = straight
    combined = proc.stdout + proc.stderr
    assert f"resuming from {out / 'checkpoint-4'}" in combined
    assert "skipping" in combined and "checkpoint-7" in combined and "checkpoint-6" in combined
    expected, got = step_logs(reference), step_logs(out)
    assert [h["step"] for h in got] == list(range(1, 9))
    for a, b in zip(expected, got):  # exact float equality: same optimizer, scheduler, RNG and data position
        assert (a["loss"], a["grad_norm"], a["learning_rate"]) == (b["loss"], b["grad_norm"], b["learning_rate"]), (a, b)
    assert len(re.findall(r"step [5-8]/8 \|", combined)) == 4  # steps 5..8 were trained, 1..4 were not redone
    assert not re.search(r"step [1-4]/8 \|", combined)
    assert json.loads((out / "dist_dpo_run.json").read_text())["global_step"] == 8


def test_resume_published_atomically(resumed):
    from dist_dpo.checkpoints import complete_checkpoints, why_incomplete

    _, out = resumed
    assert not (out / ".incomplete").exists()
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-4", "checkpoint-8"]
    assert why_incomplete(out / "checkpoint-6") and why_incomplete(out / "checkpoint-7")


def test_resume_on_another_process_count_that_cannot_keep_the_global_batch_is_refused(killed, tmp_path):
    """Another process count resumes from the portable state (tests/test_portable.py) when the global batch can be
    kept; 8 pairs x 1 x 2 processes cannot be kept by 1 process with 3 pairs per micro-batch."""
    out = tmp_path / "run"
    shutil.copytree(killed["pristine"], out)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    cmd = [sys.executable, "-m", "dist_dpo", "train", *ARGS, "--output_dir", str(out),
           "--per_device_train_batch_size", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = re.findall(r"^dist-dpo: error: .*$", proc.stderr, re.M)
    assert len(lines) == 1 and "global batch of 16 pairs; 1 process x per_device_train_batch_size 3 cannot keep " \
        "it" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_tokens_from_the_environment_are_written_nowhere(straight, killed, resumed):
    proc, out = straight
    assert (out / "wandb").is_dir(), "W&B (offline) did not run: the test would prove less"
    texts = {"straight stdout/stderr": proc.stdout + proc.stderr, "killed launcher": killed["log"],
             "resumed stdout/stderr": resumed[0].stdout + resumed[0].stderr}
    files = [p for d in (out, killed["out"], killed["pristine"]) for p in d.rglob("*") if p.is_file()]
    assert len(files) > 50
    for name, value in SECRETS.items():
        for where, text in texts.items():
            assert value not in text, f"{name} in {where}"
        leaked = [str(p) for p in files if value.encode() in p.read_bytes()]
        assert not leaked, f"{name} written to {leaked}"


STUCK_RANK = """
import signal, sys, time
from dist_dpo.stuck_signal import StuckSignalWatch
watch = StuckSignalWatch(lambda: print("dist-dpo: rank 0: STUCK LINE", file=sys.stderr, flush=True), 3, grace_s=0.5)
if sys.argv[1] == "stuck":  # like a main thread blocked in a NCCL call: its Python handler never ends the rank
    signal.signal(signal.SIGTERM, lambda *a: None)
else:  # the main path speaks first but its exit hangs (e.g. tearing down NCCL with a dead peer)
    signal.signal(signal.SIGTERM, lambda *a: watch.say_once(lambda: print("MAIN LINE", file=sys.stderr, flush=True)))
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("case", ["stuck", "slow-exit"])
def test_a_rank_that_cannot_answer_sigterm_still_says_one_line_and_exits(case):
    """On GPUs a rank blocked in a ZeRO-3 all-gather never ran its SIGTERM handler; the watch speaks for it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", STUCK_RANK, case], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 3 and time.monotonic() - start < 5
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == (["dist-dpo: rank 0: STUCK LINE"] if case == "stuck" else ["MAIN LINE"])
