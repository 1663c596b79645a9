"""Kill-and-resume on GPUs: DDP and ZeRO-3, both with QLoRA, through launch/accelerate.sh.

    python3 benchmarks/gpu_resume.py --out benchmarks/results      (>= 2 GPUs; 4 run both strategies at once)

Per strategy: (1) 8 steps straight; (2) the same run, rank 1 SIGKILLed right after checkpoint-4 is published:
every process of the job must be gone within 60 s; (3) the same command again in that dir: it must resume from
checkpoint-4 and log steps 5-8 with the straight run's losses. GPU kernels are not bitwise deterministic, so the
comparison reports the max difference next to the tolerance of the matrix (3 x layout noise, floor 2e-3); the
bitwise check is the CPU test (tests/test_faults.py).

Then the portable checkpoints (dist_dpo/portable.py) across layouts: DDP's checkpoint-4 (2 processes) resumed on ONE
GPU, and under ZeRO-3 on two. Steps 5-8 are held to the DDP straight run's: within TOLERANCE on one GPU (the same
arithmetic, the global batch kept by accumulation), and under ZeRO-3 within 3 x how far the DDP and ZeRO-3 straight
runs drift apart over steps 1-4 (DeepSpeed trains bf16 working copies of the adapter), at least TOLERANCE.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import ROOT, environment  # noqa: E402

TOLERANCE = 2e-3
ARGS = ["--max_steps", "8", "--save_steps", "4", "--logging_steps", "1", "--eval_steps", "0", "--load_in_4bit",
        "--lora_dropout", "0.1", "--dpo_extra", "{disable_dropout: false}", "--lr_scheduler_type", "linear",
        "--warmup_ratio", "0.25", "--learning_rate", "2e-4", "--max_length", "512", "--report_to", "none",
        "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--collective_timeout_s", "60"]


def cmd(strategy: str, model: Path, out: Path) -> list[str]:
    return ["bash", "launch/accelerate.sh", strategy, "recipes/demo.yaml", "--model_name_or_path", str(model),
            "--output_dir", str(out), *ARGS]


def losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def one_strategy(strategy: str, model: Path, work: Path, gpus: str, port: int) -> dict:
    env = dict(os.environ, NGPUS="2", CUDA_VISIBLE_DEVICES=gpus, MASTER_PORT=str(port), PYTHON=sys.executable,
               PREFLIGHT="0", DIST_DPO_STACKS_AFTER_S="200")
    res: dict = {"strategy": strategy, "quant": "qlora", "gpus": gpus}
    straight, killed = work / f"{strategy}-straight", work / f"{strategy}-killed"
    with open(work / f"{strategy}-straight.log", "w") as f:
        rc = subprocess.run(cmd(strategy, model, straight), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                            timeout=300).returncode
    if rc != 0:
        return {**res, "status": "failed", "reason": f"straight run exit {rc}"}
    res["straight_losses"] = losses(straight)  # also what the portable resumes below are held to
    log = open(work / f"{strategy}-killed.log", "w")
    job = subprocess.Popen(cmd(strategy, model, killed), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    marker = killed / "checkpoint-4" / "dist_dpo_checkpoint.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        os.killpg(job.pid, signal.SIGKILL)
        return {**res, "status": "failed", "reason": "checkpoint-4 never appeared"}
    pids = [int(re.search(rf"rank {r} of 2 .*\| pid (\d+)", (killed / "logs" / f"rank{r}.log").read_text())[1])
            for r in (0, 1)]
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    try:
        job.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
    while any(alive(p) for p in pids) and time.monotonic() - start < 90:
        time.sleep(0.1)
    res["exit_after_kill_s"] = round(time.monotonic() - start, 1)
    res["job_exit_code"] = job.returncode
    text = (work / f"{strategy}-killed.log").read_text(errors="replace")
    res["rank0_line"] = next((ln for ln in text.splitlines() if "dist-dpo: rank 0:" in ln), None)
    with open(work / f"{strategy}-resumed.log", "w") as f:
        rc = subprocess.run(cmd(strategy, model, killed), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                            timeout=300).returncode
    if rc != 0:
        return {**res, "status": "failed", "reason": f"resumed run exit {rc}"}
    a, b = losses(straight), losses(killed)
    res["straight_losses"], res["resumed_losses"] = a, b
    res["max_loss_diff_steps_5_8"] = max(abs(a[s] - b[s]) for s in range(5, 9))
    said = re.search(r"resuming from (\S+)", (work / f"{strategy}-resumed.log").read_text(errors="replace"))
    res["resumed_from"] = Path(said[1]).name if said else None
    ok = (res["exit_after_kill_s"] <= 60 and res["resumed_from"] == "checkpoint-4"
          and res["max_loss_diff_steps_5_8"] <= TOLERANCE)
    return {**res, "status": "ok" if ok else "failed", "tolerance": TOLERANCE}


# (name, the straight run whose checkpoint-4 is resumed, the strategy that resumes it, its GPUs)
PORTABLE = (("ddp->1gpu", "ddp", "ddp", 1), ("ddp->zero3", "ddp", "zero3", 2))


def portable(name: str, source: str, strategy: str, ngpus: int, model: Path, work: Path, gpus: str, port: int,
             straight: dict[str, dict[int, float]]) -> dict:
    res: dict = {"strategy": name, "quant": "qlora", "gpus": ",".join(gpus.split(",")[:ngpus])}
    src = work / f"{source}-straight" / "checkpoint-4"
    if not (src / "dist_dpo_checkpoint.json").is_file() or source not in straight:
        return {**res, "status": "failed", "reason": f"no straight {source} run to take checkpoint-4 from"}
    out = work / f"portable-{name.replace('->', '-to-')}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out / "checkpoint-4")
    env = dict(os.environ, NGPUS=str(ngpus), CUDA_VISIBLE_DEVICES=res["gpus"], MASTER_PORT=str(port),
               PYTHON=sys.executable, PREFLIGHT="0", DIST_DPO_STACKS_AFTER_S="200")
    log = work / f"{out.name}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd(strategy, model, out), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                            timeout=300).returncode
    text = log.read_text(errors="replace")
    res["resume_line"] = next((ln.split("INFO dist_dpo: ")[-1] for ln in text.splitlines() if "resuming from" in ln),
                              None)
    if rc != 0:
        return {**res, "status": "failed", "reason": f"resumed run exit {rc}"}
    a, b = straight[source], losses(out)
    res["resumed_losses"] = b
    res["max_loss_diff_steps_5_8"] = max(abs(a[s] - b[s]) for s in range(5, 9))
    bound = TOLERANCE
    if strategy != source and strategy in straight:  # another precision: the two straight runs' own drift
        res["straight_drift_steps_1_4"] = max(abs(a[s] - straight[strategy][s]) for s in range(1, 5))
        bound = max(TOLERANCE, 3 * res["straight_drift_steps_1_4"])
    res["tolerance"] = bound
    ok = res["resume_line"] is not None and "checkpoint-4" in res["resume_line"] and \
        res["max_loss_diff_steps_5_8"] <= bound
    return {**res, "status": "ok" if ok else "failed"}


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default="/tmp/dist_dpo_resume")
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--lanes", default="", help="GPU pairs, e.g. '0,1 2,3' (both strategies at once) or '2,3' (one "
                                               "after the other); default: two pairs when there are 4 GPUs")
    a = p.parse_args()
    work = Path(a.work)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    model = work / "model"
    subprocess.run([sys.executable, "-m", "dist_dpo", "build-model", "--shape", a.shape, "--out", str(model),
                    "--device", "cuda", "--dtype", "bfloat16"], cwd=ROOT, check=True)
    lanes = a.lanes.split() or (["0,1", "2,3"] if torch.cuda.device_count() >= 4 else ["0,1"])
    lanes = (lanes * 2)[:2]
    with cf.ThreadPoolExecutor(2 if lanes[0] != lanes[1] else 1) as pool:
        rows = list(pool.map(lambda i: one_strategy(["ddp", "zero3"][i], model, work, lanes[i], 29800 + 17 * i),
                             range(2)))
    straight = {r["strategy"]: r["straight_losses"] for r in rows if r.get("straight_losses")}
    for i, (name, source, strategy, ngpus) in enumerate(PORTABLE):
        rows.append(portable(name, source, strategy, ngpus, model, work, lanes[0], 29900 + 7 * i, straight))
    doc = {"what": "kill -9 one rank after checkpoint-4, then resume (benchmarks/gpu_resume.py)",
           "command": "python3 benchmarks/gpu_resume.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
           "environment": environment(), "shape": a.shape, "rows": rows}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gpu_resume.json").write_text(json.dumps(doc, indent=1, default=str))
    for r in rows:
        print(f"{r['strategy']:6} {r['status']:7} exit after kill {r.get('exit_after_kill_s')} s | "
              f"max |loss diff| steps 5-8 {r.get('max_loss_diff_steps_5_8')} | {r.get('reason', '')}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
