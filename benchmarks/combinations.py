"""Every shipped recipe x every strategy path of the Makefile, on ONE GPU, each launched exactly as a user runs it:

    make <target> RECIPE=recipes/<recipe>.yaml NGPUS=1 ARGS="--max_steps 2 ..."

The recipes' model and data are swapped for a random-weight model of a real shape (built here, dist_dpo/model_zoo.py)
and the built-in preference set, so nothing is downloaded; everything else (optimizer, quantization, LoRA targets,
learning rate) is the recipe's. Each cell ends as one of:
  trained  the run finished, its adapter was verified by `train` (every trainable tensor saved, none empty);
  refused  exit 2 with one `dist-dpo: error:` line (recorded) before the launcher started or before any load;
  failed   anything else (the first error line and the log's tail are recorded).
Cells run one after another (or --share N at once, each on its own rendezvous port), each under a timeout. Results: <out>/combinations.json (card, versions, commit, the
command of each cell), written after every cell, so a cut-off run keeps what it finished.

    python3 benchmarks/combinations.py --out benchmarks/results [--recipes seed_qlora] [--paths fsdp,zero3] [--share 4]
    python3 benchmarks/combinations.py --dry --out /tmp/c      # the cell list and the JSON writer, no GPU
    python3 benchmarks/combinations.py --merge a.json b.json --out benchmarks/results   # parts of one matrix
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import ROOT, environment  # noqa: E402

RECIPES = ("demo", "seed_lora", "seed_qlora")
# path name -> the make words a user types (NGPUS=1 and RECIPE are added per cell)
PATHS: dict[str, list[str]] = {
    "ddp": ["train-ddp"],
    "fsdp": ["train-fsdp"],
    "zero2": ["train-zero2"],
    "zero3": ["train-zero3"],
    "zero3-offload": ["train-zero3-offload"],
    "deepspeed-zero2": ["train-deepspeed", "STAGE=zero2"],
    "deepspeed-zero3": ["train-deepspeed", "STAGE=zero3"],
    "torchrun": ["train-torchrun"],
}
STEPS = 2
CELL_TIMEOUT_S = 150  # a 1-GPU cell is ~20 s of imports per process plus a few seconds of work; past this it hangs
ERROR = re.compile(r"dist-dpo: error: (.+)")


@dataclass
class Cell:
    recipe: str
    path: str
    target: str = ""  # the make words, e.g. "train-deepspeed STAGE=zero3"
    command: str = ""
    status: str = "pending"  # trained | refused | failed | pending
    line: str | None = None  # the one line of a refusal, or the first error of a failure
    wall_s: float | None = None
    losses: list = field(default_factory=list)
    peak_mem_gib: float | None = None
    adapter: dict | None = None  # train's own verification: {"tensors": n, "bytes": b}
    strategy_seen: str | None = None
    log_tail: str | None = None

    @property
    def name(self) -> str:
        return f"{self.recipe}-{self.path}"


def cells(recipes=RECIPES, paths=tuple(PATHS)) -> list[Cell]:
    return [Cell(r, p, " ".join(PATHS[p])) for r in recipes for p in paths]


def train_args(model: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset_name", "builtin:bad-boy", "--output_dir", str(out),
            "--max_steps", str(STEPS), "--logging_steps", "1", "--save_steps", str(STEPS), "--eval_steps", "0",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--max_length", "256",
            "--max_train_samples", "64", "--max_eval_samples", "8", "--report_to", "none", "--seed", "7"]


def command(cell: Cell, model: Path, out: Path) -> list[str]:
    return ["make", "--no-print-directory", *PATHS[cell.path], f"RECIPE=recipes/{cell.recipe}.yaml", "NGPUS=1",
            f"PYTHON={sys.executable}", "ARGS=" + shlex.join(train_args(model, out))]


def run_cell(cell: Cell, model: Path, work: Path, port: int | None = None, timeout_s: float = CELL_TIMEOUT_S) -> None:
    """One cell; `port`: its own rendezvous port (MASTER_PORT, read by launch/env.sh), for cells that share the GPU."""
    out = work / "runs" / cell.name
    log = work / "logs" / f"{cell.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(cell, model, out)
    cell.command = shlex.join(cmd)
    env = dict(os.environ, PYTHONUNBUFFERED="1", DIST_DPO_STACKS_AFTER_S=str(int(timeout_s) - 20))
    if port is not None:
        env["MASTER_PORT"] = str(port)
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:  # the whole tree (make, launcher, ranks): the GPU must be free again
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
    cell.wall_s = round(time.time() - start, 1)
    read_cell(cell, rc, log.read_text(errors="replace"), out)


def read_cell(cell: Cell, rc: int, text: str, out: Path) -> None:
    """trained / refused / failed from the exit code, the log and the run's own files."""
    errors = ERROR.findall(text)
    marker = out / "dist_dpo_run.json"
    if rc == 0 and marker.is_file():
        run = json.loads(marker.read_text())
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        cell.status = "trained"
        cell.losses = [h["loss"] for h in history if "loss" in h and "eval_loss" not in h]
        cell.peak_mem_gib = max(run.get("peak_mem_gib_per_rank") or [0]) or None
        cell.adapter = run.get("adapter") or None
        cell.strategy_seen = run.get("strategy")
        if not cell.adapter:
            cell.status, cell.line = "failed", "finished without a verified adapter"
        return
    if rc == 2 and len(set(errors)) == 1:
        cell.status, cell.line = "refused", errors[0].strip()
        return
    cell.status = "failed"
    first = next((l for l in text.splitlines() if "Error" in l or "error:" in l), None)
    cell.line = f"exit {rc}" + (f": {first.strip()[:300]}" if first else "")
    cell.log_tail = "\n".join(text.splitlines()[-15:])


def write(out_dir: Path, env: dict, all_cells: list[Cell], wall_s: float) -> Path:
    doc = {"what": "every shipped recipe x every strategy path of the Makefile on one GPU (NGPUS=1)",
           "environment": env, "setup": {"steps": STEPS, "shape": env.get("shape"), "args": "see each command"},
           "wall_s": round(wall_s, 1), "cells": [{"name": c.name, **asdict(c)} for c in all_cells]}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "combinations.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    return path


def print_table(all_cells: list[Cell]) -> None:
    print(f"{'cell':32} {'status':8} {'s':>6} {'GiB':>6} {'loss':>8}  line")
    for c in all_cells:
        loss = f"{c.losses[-1]:.4f}" if c.losses else "-"
        mem = f"{c.peak_mem_gib:.2f}" if c.peak_mem_gib else "-"
        print(f"{c.name:32} {c.status:8} {c.wall_s or 0:6.1f} {mem:>6} {loss:>8}  {(c.line or '')[:100]}")


def merge(parts: list[str], out_dir: Path) -> int:
    """Cells of several runs into one file (a later part's cell replaces an earlier one's)."""
    docs = [json.loads(Path(p).read_text()) for p in parts]
    by_name = {}
    for d in docs:
        for c in d["cells"]:
            if c["status"] != "pending":
                by_name[c["name"]] = c
    order = [c.name for c in cells()]
    merged = dict(docs[-1], cells=[by_name[n] for n in order if n in by_name],
                  parts=[{"environment": d["environment"], "cells": [c["name"] for c in d["cells"]
                                                                     if c["status"] != "pending"]} for d in docs])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "combinations.json").write_text(json.dumps(merged, indent=2))
    print(f"{len(merged['cells'])} cells -> {out_dir / 'combinations.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for combinations.json (and work/ with runs and logs)")
    p.add_argument("--shape", default="qwen2.5-0.5b", help="model shape (dist-dpo build-model --list)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of " + ", ".join(RECIPES))
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ", ".join(PATHS))
    p.add_argument("--work", help="runs, logs and the model (default: <out>/work)")
    p.add_argument("--commit", help="the commit run (else $GIT_COMMIT, else git rev-parse here)")
    p.add_argument("--dry", action="store_true", help="list the cells and write the JSON without running anything")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge combinations.json files of several runs")
    p.add_argument("--share", type=int, default=1, metavar="N",
                   help="run N cells at once on the GPU, each on its own rendezvous port (a 0.5B cell needs a few GiB; "
                        "the cells' peak memory is each process's own, and no timing is compared)")
    args = p.parse_args(argv)
    if args.share < 1:
        p.error(f"--share {args.share}: give the number of cells to run at once (1 or more)")
    out = Path(args.out)
    if args.merge:
        return merge(args.merge, out)
    recipes, paths = args.recipes.split(","), args.paths.split(",")
    bad = [r for r in recipes if r not in RECIPES] + [x for x in paths if x not in PATHS]
    if bad:
        print(f"error: unknown recipe/path {bad}: recipes {', '.join(RECIPES)}; paths {', '.join(PATHS)}",
              file=sys.stderr)
        return 2
    todo = cells(recipes, paths)
    work = Path(args.work or out / "work").resolve()
    model = work / "model"
    env = dict(environment(args.commit), shape=args.shape)
    t0 = time.time()
    if args.dry:
        for c in todo:
            c.command = shlex.join(command(c, model, work / "runs" / c.name))
        path = write(out, env, todo, 0.0)
        print(f"{len(todo)} cells (dry) -> {path}")
        return 0
    for stale in ("runs", "logs"):  # a warm machine keeps its disk: an old finished run would be refused
        shutil.rmtree(work / stale, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "dist_dpo", "build-model", "--shape", args.shape, "--out", str(model),
                    "--device", "cuda", "--dtype", "bfloat16", "--seed", "0"], cwd=ROOT, check=True)
    lock = threading.Lock()
    timeout_s = CELL_TIMEOUT_S * max(1.0, args.share / 2)  # sharing the host's cores slows each cell down

    def one(i_cell):
        i, c = i_cell
        run_cell(c, model, work, port=29600 + i if args.share > 1 else None, timeout_s=timeout_s)
        with lock:
            write(out, env, todo, time.time() - t0)
            print(f"[{time.time() - t0:6.0f} s] {c.name}: {c.status} {(c.line or '')[:120]}", flush=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.share)) as pool:
        list(pool.map(one, enumerate(todo)))
    print_table(todo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
