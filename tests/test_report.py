"""`dist-dpo report` and trackers, on ONE real 2-process CPU demo run shared by this file's tests.

The shared run (`shared_run`) is the demo recipe under `accelerate launch` (2 ranks, gloo), with fake API keys in
the environment and wandb offline when it is installed: it also shows that `train` writes the report itself, that
only global rank 0 writes tracker files, and that no key lands in any file.
"""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

FAKE_WANDB_KEY = "wandbFAKEKEY" + "0123456789abcdef" * 2  # looks like a 40-char key
FAKE_HF_TOKEN = "hf_FAKEtoken" + "Zq7" * 9
HAS_WANDB = importlib.util.find_spec("wandb") is not None
STEPS = 30  # the demo recipe's length: enough for the tuned model to beat the base on the test split


def _launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "WANDB_"))}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", WANDB_MODE="offline",
               WANDB_API_KEY=FAKE_WANDB_KEY, HF_TOKEN=FAKE_HF_TOKEN)
    return env


def shared_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess | None]:
    """The demo trained once per test run (the first test file that asks trains it, the others reuse it)."""
    out = tmp_path_factory.getbasetemp() / "issue4_demo_run"
    log = out.parent / "issue4_demo_run.log"
    if (out / "dist_dpo_run.json").is_file():
        return out, None
    trackers = "tensorboard,wandb" if HAS_WANDB else "tensorboard"
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           "accelerate_configs/cpu.yaml", "-m", "dist_dpo", "train", "--config", "recipes/demo.yaml",
           "--output_dir", str(out), "--max_steps", str(STEPS), "--report_to", trackers]
    proc = subprocess.run(cmd, cwd=ROOT, env=_launch_env(), capture_output=True, text=True, timeout=600)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory)[0]


@pytest.fixture(autouse=True)
def fresh_console_logger():
    """In-process commands bind dist_dpo's console handler to the test's captured stdout: drop it afterwards."""
    yield
    logger = logging.getLogger("dist_dpo")
    for h in list(logger.handlers):
        logger.removeHandler(h)


def cli(*args) -> int:
    from dist_dpo.cli import main

    return main(list(map(str, args)))


# --- report written by train, and the command ---------------------------------------------------------------------

def test_train_wrote_report_and_plots(run):
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "Verdict: **nothing looks wrong**" in report, report
    for line in ("loss falls", "rewards/chosen rises", "rewards/rejected falls", "rewards/margins grow"):
        assert line in report, line
    names = {p.name for p in (run / "plots").glob("*.png")}
    assert names == {"overview.png", "loss.png", "rewards_chosen.png", "rewards_rejected.png", "rewards_margins.png",
                     "rewards_accuracies.png", "logps_chosen.png", "logps_rejected.png", "grad_norm.png",
                     "learning_rate.png"}
    for p in (run / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000, p


def test_trl_logs_the_keys_we_plot(run):
    from dist_dpo.report import METRICS

    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    train_keys = set().union(*(h for h in history if "loss" in h))
    eval_keys = set().union(*(h for h in history if "eval_loss" in h))
    assert set(METRICS) <= train_keys, set(METRICS) - train_keys
    assert {f"eval_{k}" for k in METRICS if k not in ("grad_norm", "learning_rate")} <= eval_keys


def test_report_command_into_other_dir(run, tmp_path, capsys):
    assert cli("report", run, "--out", tmp_path / "r", "--smoothing", "0.3") == 0
    assert (tmp_path / "r" / "report.md").is_file() and len(list((tmp_path / "r" / "plots").glob("*.png"))) == 10
    assert capsys.readouterr().out.strip().endswith("report.md")


def _state(tmp_path, rows, where="trainer_state.json") -> Path:
    run = tmp_path / "run"
    (run / where).parent.mkdir(parents=True, exist_ok=True)
    (run / where).write_text(json.dumps({"log_history": rows}))
    return run


def _rows(loss, chosen, rejected, grad=None, logps=None):
    rows = []
    for i, (lo, c, r) in enumerate(zip(loss, chosen, rejected)):
        row = {"step": i + 1, "loss": lo, "rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
               "rewards/accuracies": float(c > r), "grad_norm": (grad or [1.0] * len(loss))[i], "learning_rate": 1e-5,
               "logps/chosen": -100 + (logps or 0) * i, "logps/rejected": -120 + (logps or 0) * i}
        rows.append(row)
    return rows


def test_reading_rules_flag_what_looks_wrong(tmp_path):
    from dist_dpo.report import write_report

    n = 20
    bad = _rows(loss=[0.69] * n, chosen=[-0.05 * i for i in range(n)], rejected=[-0.05 * i - 0.001 for i in range(n)],
                grad=[1.0] * 10 + [9.0] + [1.0] * 9)
    text = write_report(_state(tmp_path, bad)).read_text()
    for flag in ("loss is not decreasing", "rewards/chosen **falls**", "rewards/margins are flat",
                 "both log-probs fall", "grad_norm spikes", "at step(s) 11"):
        assert flag in text, flag
    assert "thing(s) look wrong" in text


def test_reading_rules_flag_overconfidence(tmp_path):
    from dist_dpo.report import write_report

    n = 20
    rows = _rows(loss=[0.69 - 0.01 * i for i in range(n)], chosen=[0.05 * i for i in range(n)],
                 rejected=[0.05 * i - 0.001 for i in range(n)], logps=1.0)
    text = write_report(_state(tmp_path, rows)).read_text()
    assert "rise together without a widening margin" in text


def test_report_of_a_running_job_uses_its_newest_checkpoint(tmp_path):
    from dist_dpo.report import write_report

    rows = _rows(loss=[0.69, 0.5, 0.3], chosen=[0, 0.2, 0.4], rejected=[0, -0.2, -0.5])
    run = _state(tmp_path, rows, "checkpoint-3/trainer_state.json")
    text = write_report(run).read_text()
    assert "checkpoint-3" in text and "nothing looks wrong" in text


def test_report_bad_inputs_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    no_steps = _state(tmp_path, [{"step": 0, "train_runtime": 1.0}])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{not json")
    cases = [
        ((tmp_path / "missing",), "is not a directory"),
        ((tmp_path / "empty",), "has no training logs"),
        ((no_steps,), "no logged training step"),
        ((broken,), "not valid JSON"),
        ((no_steps, "--smoothing", "1.5"), "--smoothing must be in [0, 1)"),
        ((no_steps, "--bogus"), "unrecognized arguments"),
    ]
    for args, message in cases:
        assert cli("report", *args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (args, err)
    assert not (tmp_path / "empty" / "report.md").exists()


# --- trackers: tensorboard by default, wandb offline, rank 0 only, no secrets in files -----------------------------

def test_tensorboard_events_from_rank0_only(run):
    events = list((run / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events  # two ranks, one writer


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install wandb to test offline W&B logging)")
def test_wandb_offline_run_in_the_run_dir_from_rank0_only(run):
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # inside the run dir (WANDB_DIR), one per job, not one per rank
    assert list(runs[0].glob("*.wandb")), "no wandb log file"


def test_no_api_key_in_any_file(run, tmp_path_factory):
    log = tmp_path_factory.getbasetemp() / "issue4_demo_run.log"
    leaks = []
    for path in [*run.rglob("*"), log]:
        if path.is_file():
            data = path.read_bytes()
            if FAKE_WANDB_KEY.encode() in data or FAKE_HF_TOKEN.encode() in data:
                leaks.append(str(path.relative_to(run.parent)))
    assert not leaks, leaks
    assert sum(1 for p in run.rglob("*") if p.is_file()) > 20  # the search did cover the run
