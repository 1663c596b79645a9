"""Portable resume on ONE GPU: QLoRA checkpoints written under DeepSpeed resumed without it, and the reverse.

    source .whl/install.sh; export PYTHONPATH=$PWD:$PYTHONPATH; python3 benchmarks/gpu_portable_resume.py --out $OUT

On a random-weight Qwen2.5-0.5B shape (dist_dpo build-model), QLoRA, 8 steps of 4 pairs x 2 accumulation, a
checkpoint at step 4, no dropout:
  zero3     8 steps under ZeRO-3 on one process (accelerate launch --num_processes 1): the uninterrupted run
  single    8 steps on one process without DeepSpeed: how far the two layouts drift apart on their own
  zero3->single   zero3's checkpoint-4 alone in a new dir, resumed without DeepSpeed (the portable state: fp32 masters
                  and AdamW moments gathered through deepspeed.utils.safe_get_full_*): steps 5-8 vs zero3's
  single->zero2   single's checkpoint-4 resumed under ZeRO-2 on one process (safe_set_full_*): steps 5-8 vs single's
The layouts differ in precision (DeepSpeed trains bf16 working copies of the adapter, the single GPU fp32 adapters),
so the bound is bf16-sized: 3 x the two straight runs' largest loss difference over steps 1-4, at least 2e-3 (the
kill-and-resume benchmark's tolerance). Two runs share the GPU at a time, to keep the whole check short.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import ROOT, environment  # noqa: E402

FLOOR = 2e-3
ARGS = ["--config", "recipes/demo.yaml", "--max_steps", "8", "--save_steps", "4", "--logging_steps", "1",
        "--eval_steps", "0", "--load_in_4bit", "--lora_dropout", "0", "--lr_scheduler_type", "linear",
        "--warmup_ratio", "0.25", "--learning_rate", "2e-4", "--max_length", "512", "--report_to", "none",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--collective_timeout_s", "120"]


def cmd(layout: str, port: int) -> list[str]:
    if layout == "single":
        return [sys.executable, "-m", "dist_dpo", "train"]
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
            f"accelerate_configs/{layout}.yaml", "--num_processes", "1", "--main_process_port", str(port),
            "-m", "dist_dpo", "train"]


def run(name: str, layout: str, out: Path, model: Path, work: Path, port: int) -> dict:
    with open(work / f"{name}.log", "w") as f:
        rc = subprocess.run(cmd(layout, port) + ARGS + ["--model_name_or_path", str(model), "--output_dir", str(out)],
                            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=420).returncode
    text = (work / f"{name}.log").read_text(errors="replace")
    said = re.search(r"resuming checkpoint-.*", text)
    res = {"name": name, "layout": layout, "exit_code": rc, "resume_line": said[0] if said else None}
    if rc != 0:
        res["log_tail"] = text[-2500:]
        return res
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    res["losses"] = {h["step"]: h["loss"] for h in history if "loss" in h}
    return res


def stopped_at_4(source: Path, where: Path) -> Path:
    where.mkdir(parents=True)
    shutil.copytree(source / "checkpoint-4", where / "checkpoint-4")
    return where


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default="/tmp/dist_dpo_portable")
    p.add_argument("--shape", default="qwen2.5-0.5b")
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = work / "model"
    subprocess.run([sys.executable, "-m", "dist_dpo", "build-model", "--shape", a.shape, "--out", str(model),
                    "--device", "cuda", "--dtype", "bfloat16"], cwd=ROOT, check=True)
    with cf.ThreadPoolExecutor(2) as pool:  # one GPU, two runs at a time
        zero3, single = pool.map(lambda x: run(*x), [("zero3", "zero3", work / "zero3", model, work, 29710),
                                                     ("single", "single", work / "single", model, work, 29720)])
        rows = [zero3, single]
        if zero3["exit_code"] == 0 and single["exit_code"] == 0:
            rows += list(pool.map(lambda x: run(*x), [
                ("zero3->single", "single", stopped_at_4(work / "zero3", work / "zero3-single"), model, work, 29730),
                ("single->zero2", "zero2", stopped_at_4(work / "single", work / "single-zero2"), model, work, 29740)]))
    noise = None
    if len(rows) == 4:
        noise = max(abs(zero3["losses"][s] - single["losses"][s]) for s in range(1, 5))
        tolerance = max(3 * noise, FLOOR)
        for resumed, straight in ((rows[2], zero3), (rows[3], single)):
            if resumed["exit_code"] != 0:
                resumed["status"] = "failed"
                continue
            diffs = {s: abs(resumed["losses"][s] - straight["losses"][s]) for s in range(5, 9)}
            resumed["compared_to"] = straight["name"]
            resumed["max_loss_diff_steps_5_8"] = max(diffs.values())
            resumed["tolerance"] = tolerance
            resumed["status"] = "ok" if max(diffs.values()) <= tolerance and resumed["resume_line"] else "failed"
    doc = {"what": "QLoRA on one GPU resumed from a checkpoint of another strategy (benchmarks/gpu_portable_resume.py)",
           "command": "python3 benchmarks/gpu_portable_resume.py --out $OUT", "environment": environment(),
           "shape": a.shape, "args": ARGS, "layout_noise_steps_1_4": noise, "rows": rows}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gpu_portable_resume.json").write_text(json.dumps(doc, indent=1, default=str))
    for r in rows:
        print(f"{r['name']:14} exit {r['exit_code']} {r.get('status', '')} | max |loss diff| steps 5-8 "
              f"{r.get('max_loss_diff_steps_5_8')} (tolerance {r.get('tolerance')}) | {r.get('resume_line') or ''}")
    return 0 if len(rows) == 4 and all(r.get("status") == "ok" for r in rows[2:]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
