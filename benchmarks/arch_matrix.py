"""The architecture matrix on one GPU: every family of dist_dpo/architectures.py x LoRA / QLoRA, bf16, the speed path
against plain trl on the same pairs in the same order.

    python3 benchmarks/arch_matrix.py --out $OUT              (one GPU, ~5 minutes; table printed last)
    python3 benchmarks/arch_matrix.py --only llama,gemma3 --quant lora --out /tmp/a

Per cell (a tiny random-weight model of the family, `builtin:tiny-<model_type>`, all-linear LoRA, 4 steps of SGD
at a learning rate that moves the policy, the bundled pairs, one process), three real `dist-dpo train` runs in this
process:
  trl       --fast_path false, 8 pairs x 1 micro-step
  trl-4x2   --fast_path false, 4 pairs x 2 micro-steps: the same arithmetic in another order, i.e. what bf16
            rounding alone moves (the noise the bound is derived from)
  dist-dpo  the default speed path (its first-batch self-check and liger's kernels included), 8 x 1
The cell agrees when at every step the speed path's loss and gradient norm are within the bound of trl's:
max(4 x the trl / trl-4x2 difference at that step, a floor of 2e-3 on the loss and 2 % on the gradient norm). A
piece that is wrong is off by O(1): a zero gradient, a loss stuck at log 2, rows reading the wrong tokens.
Results: <out>/arch_matrix.json (card, versions, commit, command; per cell family, quant, status, agrees, the
differences and the speed-path line), written after every cell.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_env import ROOT, environment  # noqa: E402

sys.path.insert(0, str(ROOT))

STEPS = 4
COMMON = ["--lora_target_modules", "all-linear", "--lora_dropout", "0", "--group_by_length", "false",
          "--max_steps", str(STEPS), "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "1000",
          "--optim", "sgd", "--learning_rate", "0.1", "--lr_scheduler_type", "constant", "--gradient_checkpointing",
          "false", "--overwrite_output_dir", "true", "--same_model_check", "false"]  # liger: auto (the speed path's)
RUNS = {"trl": ["--fast_path", "false", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1"],
        "trl-4x2": ["--fast_path", "false", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"],
        "dist-dpo": ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1"]}
FLOOR = {"loss": 2e-3, "grad_norm": 0.02}  # absolute on the loss, relative on the gradient norm


def train(model: str, out: Path, extra: list[str]) -> dict:
    """One `dist-dpo train` in this process: exit code, logged steps, the speed-path and self-check lines."""
    from dist_dpo.train import run

    shutil.rmtree(out, ignore_errors=True)  # a fresh run: an earlier one there would be resumed
    start = time.perf_counter()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = run(["--model_name_or_path", model, "--output_dir", str(out), *COMMON, *extra])
        error = None
    except SystemExit as e:
        code, error = e.code, None
    except BaseException as e:  # noqa: BLE001 - a crash is a cell's result
        code, error = 1, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        traceback.print_exc()
    result = {"exit": code, "seconds": round(time.perf_counter() - start, 1)}
    if error:
        result["error"] = error
    state = out / "trainer_state.json"
    if state.is_file():
        history = json.loads(state.read_text())["log_history"]
        result["steps"] = [{"step": h["step"], "loss": h["loss"], "grad_norm": h.get("grad_norm")}
                           for h in history if "loss" in h]
    log = out / "logs" / "rank0.log"
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            for key, marker in (("speed_path", "speed path: "), ("self_check", "speed-path self-check: ")):
                if marker in line:
                    result[key] = line.split(marker, 1)[1]
    return result


def compare(runs: dict) -> dict:
    """Per step: |dist-dpo - trl| against the bound from |trl-4x2 - trl|."""
    a, b, c = (runs[k].get("steps") or [] for k in ("trl", "trl-4x2", "dist-dpo"))
    if not (len(a) == len(b) == len(c) == STEPS):
        return {"agrees": False, "why": "a run did not log every step"}
    worst = {"loss": 0.0, "grad_norm": 0.0}
    bound_at_worst = dict(FLOOR)
    agrees = True
    for x, y, z in zip(a, b, c):
        for key in ("loss", "grad_norm"):
            scale = 1.0 if key == "loss" else max(abs(x[key]), 1e-12)
            diff, noise = abs(z[key] - x[key]) / scale, abs(y[key] - x[key]) / scale
            bound = max(4 * noise, FLOOR[key])
            if not math.isfinite(diff) or diff > bound:
                agrees = False
            if not math.isfinite(diff) or diff >= worst[key]:
                worst[key], bound_at_worst[key] = diff, bound
    moved = abs(a[-1]["loss"] - a[0]["loss"]) > 1e-3
    return {"agrees": agrees and moved, "loss_diff": worst["loss"], "loss_bound": bound_at_worst["loss"],
            "grad_norm_rel_diff": worst["grad_norm"], "grad_norm_bound": bound_at_worst["grad_norm"],
            "trl_losses": [s["loss"] for s in a], "dist_dpo_losses": [s["loss"] for s in c],
            **({} if moved else {"why": "trl's loss did not move: nothing was compared"})}


def main() -> int:
    from dist_dpo.model_zoo import FAMILY_SHAPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default="/tmp/dist_dpo_arch_matrix")
    p.add_argument("--only", default="", help="comma-separated tiny shapes (tiny-qwen3) or substrings (gemma)")
    p.add_argument("--quant", default="lora,qlora")
    p.add_argument("--commit", default=None)
    a = p.parse_args()
    only = [o for o in a.only.split(",") if o]  # a whole shape name matches itself only, else a substring
    shapes = [s for s in FAMILY_SHAPES if not only or any(o == s or (o not in FAMILY_SHAPES and o in s) for o in only)]
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**environment(a.commit), "command": "python3 benchmarks/arch_matrix.py " + " ".join(
        shlex.quote(x) for x in sys.argv[1:]), "steps": STEPS, "common_args": COMMON, "runs": RUNS, "cells": []}
    for shape in shapes:
        for quant in a.quant.split(","):
            runs = {}
            for name, extra in RUNS.items():
                runs[name] = train(f"builtin:{shape}", work / f"{shape}-{quant}-{name}",
                                   extra + (["--load_in_4bit", "true"] if quant == "qlora" else []))
            crashed = [n for n, r in runs.items() if r["exit"] != 0]
            cell = {"family": FAMILY_SHAPES[shape]["config"]["model_type"], "shape": shape, "quant": quant,
                    "status": "crash" if crashed else "ok", "runs": runs}
            cell.update(compare(runs) if not crashed else {"agrees": False, "why": f"exit != 0: {crashed}"})
            doc["cells"].append(cell)
            (out / "arch_matrix.json").write_text(json.dumps(doc, indent=1) + "\n")
            print(f"CELL {shape:18s} {quant:5s} {cell['status']:5s} agrees={cell['agrees']} "
                  f"loss {cell.get('loss_diff', float('nan')):.2g}/{cell.get('loss_bound', float('nan')):.2g} "
                  f"gn {cell.get('grad_norm_rel_diff', float('nan')):.2g}/{cell.get('grad_norm_bound', float('nan')):.2g}"
                  f" {cell.get('why', '')}", flush=True)
    print()
    print(f"{'family':18s} {'quant':5s} {'status':6s} {'agrees':6s} {'loss diff/bound':>18s} {'grad-norm diff/bound':>22s}  "
          "self-check")
    for c in doc["cells"]:
        sc = (c["runs"]["dist-dpo"].get("self_check") or "-")[:60]
        print(f"{c['shape']:18s} {c['quant']:5s} {c['status']:6s} {str(c['agrees']):6s} "
              f"{c.get('loss_diff', float('nan')):8.2g}/{c.get('loss_bound', float('nan')):<8.2g} "
              f"{c.get('grad_norm_rel_diff', float('nan')):10.2g}/{c.get('grad_norm_bound', float('nan')):<10.2g}  {sc}")
    bad = [c for c in doc["cells"] if not c["agrees"]]
    print(f"\n{len(doc['cells']) - len(bad)} of {len(doc['cells'])} cells agree -> {out / 'arch_matrix.json'}")
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
