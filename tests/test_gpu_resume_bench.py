"""benchmarks/gpu_resume.py's portable rows on CPU, with the training runs stubbed: which checkpoint is resumed,
and the bound each resumed run is held to. (The runs themselves need 2 GPUs.)"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_resume  # noqa: E402


def _fake_training(monkeypatch, resumed: dict[int, float], said: str = "resuming from {out}/checkpoint-4"):
    def run(command, cwd, env, stdout, stderr, timeout):
        out = command[command.index("--output_dir") + 1]
        (gpu_resume.Path(out) / "trainer_state.json").write_text(json.dumps(
            {"log_history": [{"step": s, "loss": v} for s, v in resumed.items()]}))
        stdout.write(f"10:00:00 [h rank0] INFO dist_dpo: {said.format(out=out)} (written by 2 processes)\n")
        stdout.flush()
        return subprocess.CompletedProcess(command, 0)
    monkeypatch.setattr(gpu_resume.subprocess, "run", run)


def test_portable_rows_resume_ddps_checkpoint_and_are_held_to_their_bound(tmp_path, monkeypatch):
    ckpt = tmp_path / "ddp-straight" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "dist_dpo_checkpoint.json").write_text("{}")
    ddp = {s: 0.69 - 0.01 * s for s in range(1, 9)}
    zero3 = {s: v + 0.002 for s, v in ddp.items()}  # bf16 working copies: 0.002 of drift
    straight = {"ddp": ddp, "zero3": zero3}
    _fake_training(monkeypatch, {s: v + 0.001 for s, v in ddp.items()})
    one = gpu_resume.portable("ddp->1gpu", "ddp", "ddp", 1, tmp_path / "model", tmp_path, "0,1", 29900, straight)
    assert one["status"] == "ok" and one["gpus"] == "0" and one["tolerance"] == gpu_resume.TOLERANCE
    assert (tmp_path / "portable-ddp-to-1gpu" / "checkpoint-4" / "dist_dpo_checkpoint.json").is_file()
    _fake_training(monkeypatch, {s: v + 0.005 for s, v in ddp.items()})
    z = gpu_resume.portable("ddp->zero3", "ddp", "zero3", 2, tmp_path / "model", tmp_path, "0,1", 29907, straight)
    assert z["status"] == "ok" and abs(z["tolerance"] - 0.006) < 1e-9 and z["gpus"] == "0,1"
    one = gpu_resume.portable("ddp->1gpu", "ddp", "ddp", 1, tmp_path / "model", tmp_path, "0,1", 29900, straight)
    assert one["status"] == "failed"  # 0.005 is outside the same-precision bound
    _fake_training(monkeypatch, ddp, said="starting fresh in {out}")
    fresh = gpu_resume.portable("ddp->1gpu", "ddp", "ddp", 1, tmp_path / "model", tmp_path, "0,1", 29900, straight)
    assert fresh["status"] == "failed" and fresh["resume_line"] is None  # trained from scratch: not a resume
    missing = gpu_resume.portable("ddp->1gpu", "zero2", "ddp", 1, tmp_path / "model", tmp_path, "0,1", 29900, straight)
    assert missing["status"] == "failed" and "no straight zero2 run" in missing["reason"]
