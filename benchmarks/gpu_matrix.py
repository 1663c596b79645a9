"""The tested strategy matrix: every strategy x LoRA/QLoRA through the REAL launch paths, on GPUs.

    python3 benchmarks/gpu_matrix.py --out benchmarks/results      (on a machine with >= 2 GPUs)

Cells run through `make train-*` (the shipped accelerate configs), `launch/deepspeed.sh` (the `deepspeed` launcher
with the shipped JSON), `launch/torchrun.sh`, and two simulated nodes on one host. Every cell trains the same
random-weight Qwen2-architecture model (fixed seed) on the bundled data with the same global batch and steps, and is
compared step by step with a single-GPU reference of the same quantization.

Tolerance: the same reference is also trained with two other, mathematically equivalent micro-batch layouts
(16 x 1 vs 4 x 4 and 2 x 8 accumulation). Those differences are pure numerics (bf16 reduction order), the same kind
of noise a strategy introduces. noise = the largest max-over-steps |loss difference| between any two of the three
runs; tol = 3 x noise (floor 2e-3). (Earlier versions let one alternative layout set the noise: one sample of a noise
that grows with the steps of a chaotic trajectory is an underestimate; the two are reported side by side.) A strategy
that computes the loss differently (bf16 log-probs, lost gradients, wrong data order, changed 4-bit weights) lands
far outside it. Each run also logs a start fingerprint (dist_dpo/same_model.py: one forward before step 1, where
the adapter is still a no-op): it shows whether a cell starts from the same model as its reference.

Beyond the main shape (--shape, a Qwen2.5 one): two other families of the architecture table (FAMILIES: Llama and
Qwen3 shapes, whose LM heads are untied, so their FSDP2 cells also prove the speed path's head on a sharded head of
its own) under DDP, FSDP2 and ZeRO-3 with LoRA and QLoRA; and the tutorial recipe's optimizer (paged 8-bit AdamW)
under every strategy with QLoRA. Each such group has its own single-GPU references and noise floor; a combination
the strategy table refuses (paged 8-bit AdamW under FSDP2) must be refused before launch with its one line.
`--list` prints the cells and what each is compared with, without a GPU.

Adapters: each cell's saved adapter is reloaded on one GPU with peft (benchmarks/check_adapter.py) and must
reproduce the eval log-probs that the trained model logged under its strategy; QLoRA adapters are also merged into
a bf16 base and reloaded with plain transformers.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import ROOT, environment  # noqa: E402
STEPS = 8
PER_DEVICE = 8
GLOBAL_BATCH = 16
CELL_TIMEOUT_S = 180  # a cell takes 40-75 s on H200s; past this it hangs (DIST_DPO_STACKS_AFTER_S shows where)


# Other families of the architecture table: group name -> model_zoo shape (untied LM heads, a few MB each)
FAMILIES = {"llama": "tiny-llama", "qwen3": "tiny-qwen3"}
PAGED = "paged_adamw_8bit"  # the tutorial recipe's optimizer (recipes/seed_qlora.yaml)


@dataclass
class Cell:
    name: str
    launcher: str  # make | deepspeed | torchrun | multinode-accelerate | multinode-torchrun | python
    strategy: str  # single | ddp | fsdp | zero2 | zero3 | zero3_offload
    quant: str  # lora | qlora
    gpus: int = 2
    reference: str = ""  # the cell it must agree with
    result: dict = field(default_factory=dict)
    group: str = ""  # "" (the main shape, adamw_torch), a FAMILIES key, or "paged": its own references and noise
    shape: str = ""  # model_zoo shape ("" = --shape)
    optim: str = "adamw_torch"
    refused: str = ""  # the run must be refused before launch with a line containing this (the strategy table's)

    @property
    def prefix(self) -> str:
        return f"{self.group}-" if self.group else ""

    @property
    def noise_key(self) -> str:  # the tolerance this cell is held to
        return f"{self.group}/{self.quant}" if self.group else self.quant


def references(group: str, q: str, **kw) -> list[Cell]:
    """A group's single-GPU reference and its two re-runs with other micro-batch layouts (the noise floor)."""
    p = f"{group}-" if group else ""
    return [Cell(f"{p}ref-{q}", "python", "single", q, gpus=1, group=group, **kw),
            Cell(f"{p}ref-alt-{q}", "python", "single", q, gpus=1, group=group, **kw),  # same math, other layouts
            Cell(f"{p}ref-alt2-{q}", "python", "single", q, gpus=1, group=group, **kw)]


def cells() -> list[Cell]:
    out = []
    for q in ("lora", "qlora"):
        out += references("", q)
    # Diagnostics: each sharded strategy on ONE GPU, same batch. Such a cell computes like its 2-GPU cells (DeepSpeed's
    # bf16 engine, FSDP2's 4-bit loading and mixed precision) without splitting the batch, so a 2-GPU cell that
    # matches it but not ref-qlora differs by the strategy's precision, not by distributing (at 8dcd628: QLoRA under
    # DeepSpeed 0.0048 and FSDP2 0.0127 from ref-qlora, tolerance 0.0044). Reported as same_strategy_1gpu_diff.
    for s in ("zero2", "zero3", "fsdp"):
        out.append(Cell(f"ref1-{s}-qlora", "make", s, "qlora", gpus=1, reference="ref-qlora"))
    for q in ("lora", "qlora"):
        for s in ("ddp", "fsdp", "zero2", "zero3", "zero3_offload"):
            out.append(Cell(f"make-{s}-{q}", "make", s, q, reference=f"ref-{q}"))
        for s in ("zero2", "zero3"):
            out.append(Cell(f"deepspeed-{s}-{q}", "deepspeed", s, q, reference=f"ref-{q}"))
        out.append(Cell(f"torchrun-ddp-{q}", "torchrun", "ddp", q, reference=f"ref-{q}"))
    # Two nodes matter for the 4-bit model's placement (each rank on its LOCAL device): QLoRA only.
    out.append(Cell("2nodes-accelerate-ddp-qlora", "multinode-accelerate", "ddp", "qlora", reference="make-ddp-qlora"))
    out.append(Cell("2nodes-torchrun-ddp-qlora", "multinode-torchrun", "ddp", "qlora", reference="make-ddp-qlora"))
    for group, shape in FAMILIES.items():
        for q in ("lora", "qlora"):
            out += references(group, q, shape=shape)
            out += [Cell(f"{group}-make-{s}-{q}", "make", s, q, reference=f"{group}-ref-{q}", group=group, shape=shape)
                    for s in ("ddp", "fsdp", "zero3")]
    out += references("paged", "qlora", optim=PAGED)
    for s in ("ddp", "zero2", "zero3", "zero3_offload"):
        out.append(Cell(f"paged-make-{s}-qlora", "make", s, "qlora", reference="paged-ref-qlora", group="paged",
                        optim=PAGED))
    out.append(Cell("paged-make-fsdp-qlora", "make", "fsdp", "qlora", group="paged", optim=PAGED,
                    refused=f"optim {PAGED} (bitsandbytes) cannot update FSDP2's sharded parameters"))
    return out


def selected(all_cells: list[Cell], only: str, quant: str) -> dict[str, Cell]:
    """The cells --only / --quant pick, with the references (and noise-floor re-runs) they are compared with."""
    picked = [c for c in all_cells if (quant == "all" or c.quant == quant)
              and (not only or any(k in c.name for k in only.split(",")))]
    groups = {(c.group, c.quant) for c in picked}
    by_name = {c.name: c for c in all_cells}
    names = {c.name for c in picked}
    names |= {c.name for c in all_cells if c.gpus == 1 and not c.reference and (c.group, c.quant) in groups}
    for c in picked:  # a reference that is itself a cell (make-ddp-qlora for the two-node cells)
        if c.reference:
            names.add(c.reference)
    return {c.name: c for c in all_cells if c.name in names and c.name in by_name}


def train_args(cell: Cell, model: Path, out: Path) -> list[str]:
    per_device, accum = PER_DEVICE, GLOBAL_BATCH // (PER_DEVICE * cell.gpus)
    if cell.name.startswith(cell.prefix + "ref-alt-"):
        per_device, accum = 4, 4
    elif cell.name.startswith(cell.prefix + "ref-alt2-"):
        per_device, accum = 2, 8
    args = [
        "--model_name_or_path", str(model), "--output_dir", str(out), "--max_steps", str(STEPS),
        "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", str(accum),
        "--per_device_eval_batch_size", "8", "--max_eval_samples", "32", "--eval_steps", str(STEPS),
        "--save_steps", str(STEPS), "--logging_steps", "1", "--learning_rate", "2e-4", "--lr_scheduler_type",
        "constant", "--max_length", "512", "--lora_dropout", "0", "--report_to", "none", "--seed", "7",
        "--lora_target_modules", "q_proj,k_proj,v_proj,o_proj", "--gradient_checkpointing", "true",
        "--optim", cell.optim, "--collective_timeout_s", "300",
        "--merge_micro_batches", "false",  # the layouts are the experiment (ref vs ref-alt is the noise floor)
    ]
    if cell.quant == "qlora":
        args.append("--load_in_4bit")
    return args


def launch(cell: Cell, model: Path, work: Path, gpu_ids: list[int], port: int) -> dict:
    out = work / "runs" / cell.name
    log = work / "logs" / f"{cell.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHON=sys.executable, NGPUS=str(cell.gpus), MASTER_PORT=str(port),
               DIST_DPO_STACKS_AFTER_S=str(CELL_TIMEOUT_S - 30), PREFLIGHT="0",
               CUDA_VISIBLE_DEVICES=",".join(map(str, gpu_ids)), PYTHONUNBUFFERED="1")
    args = train_args(cell, model, out)
    recipe = "recipes/demo.yaml"
    if cell.launcher == "python":
        cmds = [[sys.executable, "-m", "dist_dpo", "train", "--config", recipe, *args]]
    elif cell.launcher == "make":
        target = "train-" + cell.strategy.replace("_", "-")
        cmds = [["make", target, f"RECIPE={recipe}", f"PYTHON={sys.executable}", f"NGPUS={cell.gpus}",
                 "ARGS=" + shlex.join(args)]]
    elif cell.launcher == "deepspeed":
        cmds = [["bash", "launch/deepspeed.sh", cell.strategy, recipe, *args]]
    elif cell.launcher == "torchrun":
        cmds = [["bash", "launch/torchrun.sh", recipe, *args]]
    else:  # two "nodes" on one host: one launcher per node, 1 GPU each, localhost rendezvous
        cmds = []
        for node in (0, 1):
            if cell.launcher == "multinode-accelerate":
                cmds.append(["bash", "launch/accelerate.sh", "ddp", recipe, *args])
            else:
                cmds.append(["bash", "launch/torchrun.sh", recipe, *args])
    start = time.time()
    if len(cmds) == 1:
        with open(log, "w") as f:
            rc = _wait_or_kill(subprocess.Popen(cmds[0], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                                start_new_session=True))
        logs = [log]
    else:
        procs, logs = [], []
        for node, cmd in enumerate(cmds):
            node_env = dict(env, NGPUS="1", NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
                            CUDA_VISIBLE_DEVICES=str(gpu_ids[node]))
            node_log = log.with_suffix(f".node{node}.log")
            logs.append(node_log)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=node_env, stdout=open(node_log, "w"),
                                          stderr=subprocess.STDOUT, start_new_session=True))
        rc = 0
        for p in procs:
            rc = _wait_or_kill(p) or rc
    return {"rc": rc, "wall_s": round(time.time() - start, 1), "out": str(out), "logs": [str(p) for p in logs],
            "command": " ".join(shlex.quote(c) for c in cmds[0])}


def _wait_or_kill(proc: subprocess.Popen) -> int:
    """A hung cell is killed with its whole process tree (launcher, agents, ranks): the GPUs must be free again."""
    try:
        return proc.wait(timeout=CELL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 124


def read_run(cell: Cell) -> None:
    r = cell.result
    out = Path(r["out"])
    marker = out / "dist_dpo_run.json"
    if cell.refused:  # must stop before training, with the strategy table's line, and write nothing
        text = "\n".join(Path(p).read_text(errors="replace") for p in r["logs"])
        said = cell.refused in text
        if r["rc"] != 0 and said and not marker.is_file():
            r.update(status="refused", reason=next(ln.strip() for ln in text.splitlines() if cell.refused in ln)[:300])
        else:
            r.update(status="failed", reason=f"exit {r['rc']}: expected the refusal '{cell.refused}'"
                     + ("" if said else ", never printed"))
        return
    if r["rc"] != 0 or not marker.is_file():
        tail = "\n".join(Path(r["logs"][0]).read_text(errors="replace").splitlines()[-15:])
        r.update(status="failed", reason=f"exit {r['rc']}: " + _first_error(r["logs"]) , log_tail=tail)
        return
    run = json.loads(marker.read_text())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train = [h for h in history if "loss" in h and "eval_loss" not in h]
    evals = [h for h in history if "eval_loss" in h]
    adapter = out / "adapter_model.safetensors"
    r.update(
        status="ok",
        losses=[h["loss"] for h in train],
        accuracies=[h.get("rewards/accuracies") for h in train],
        margins=[h.get("rewards/margins") for h in train],
        eval=evals[-1] if evals else {},
        seconds_per_step=run.get("seconds_per_step"),
        peak_mem_gib=max(run.get("peak_mem_gib_per_rank") or [0]),
        peak_mem_gib_per_rank=run.get("peak_mem_gib_per_rank"),
        peak_reserved_gib=max(run.get("peak_reserved_gib_per_rank") or [0]),
        adapter_tensors=run["adapter"]["tensors"],
        adapter_bytes=run["adapter"]["bytes"],
        adapter_sha256=hashlib.sha256(adapter.read_bytes()).hexdigest()[:16],
        world_size=run["world_size"],
        strategy_seen=run["strategy"],
    )
    text = "\n".join(Path(p).read_text(errors="replace") for p in r["logs"])
    marks = [line.split("start fingerprint: ")[1].split()[0] for line in text.splitlines() if "start fingerprint: " in line]
    r["start_fingerprint"] = float(marks[0]) if marks else None
    layout = [line.split("prompt: ")[1].split(" | ")[0] for line in text.splitlines() if "speed path: " in line
              and "prompt: " in line]
    r["prompt_layout"] = layout[0] if layout else None  # which rows ran (packed / masked / trl's), as rank 0 logged
    r["step_log_lines"] = sum(1 for line in text.splitlines() if f"/{STEPS} |" in line and "INFO dist_dpo: step" in line)
    r["model_devices"] = sorted({line.split("| model on ")[1].split(" |")[0] for line in _rank_logs(out)
                                 if "| model on " in line})
    if cell.launcher.startswith("multinode"):
        node1 = Path(r["logs"][1]).read_text(errors="replace")
        r["node1_printed_step_logs"] = "INFO dist_dpo: step" in node1


def _rank_logs(out: Path) -> list[str]:
    lines = []
    for f in sorted((out / "logs").glob("rank*.log")):
        lines += f.read_text(errors="replace").splitlines()
    return lines


def _first_error(logs: list[str]) -> str:
    for p in logs:
        for line in Path(p).read_text(errors="replace").splitlines():
            if "dist-dpo: error" in line or "Error:" in line or "error:" in line:
                return line.strip()[:300]
    return "see log"


def check_adapter(cell: Cell, model: Path, work: Path, gpu: int) -> dict | None:
    r = cell.result
    if r.get("status") != "ok":
        return None
    out_json = work / "checks" / f"{cell.name}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "benchmarks/check_adapter.py", "--run", r["out"], "--base", str(model),
           "--out", str(out_json)]
    if cell.quant == "qlora":
        cmd.append("--load_in_4bit")
    if cell.name in ("make-ddp-qlora", "make-zero3-qlora", "make-fsdp-qlora"):
        cmd.append("--merge")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
    with open(work / "logs" / f"check-{cell.name}.log", "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=300).returncode
    return json.loads(out_json.read_text()) if out_json.is_file() else {"ok": False, "rc": rc}


def agreement(all_cells: dict[str, Cell]) -> dict:
    def maxdiff(a: dict, b: dict) -> float:
        return max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))

    noise, noise_one_alt = {}, {}
    for key, c in {c.noise_key: c for c in all_cells.values()}.items():  # one noise floor per group and quant
        p, q = c.prefix, c.quant
        runs = [all_cells[n].result for n in (f"{p}ref-{q}", f"{p}ref-alt-{q}", f"{p}ref-alt2-{q}") if n in all_cells]
        runs = [r for r in runs if r.get("status") == "ok"]
        if len(runs) >= 2:
            noise[key] = max(maxdiff(a, b) for i, a in enumerate(runs) for b in runs[i + 1:])
            noise_one_alt[key] = maxdiff(runs[0], runs[1])
    tol = {key: max(3 * n, 2e-3) for key, n in noise.items()}
    for c in all_cells.values():
        r = c.result
        ref = all_cells.get(c.reference)
        if c.refused:
            r["agrees"] = r.get("status") == "refused"
            continue
        if not ref or r.get("status") != "ok" or ref.result.get("status") != "ok":
            r["agrees"] = r.get("status") == "ok" and not c.reference
            continue
        diffs = [abs(x - y) for x, y in zip(r["losses"], ref.result["losses"])]
        r["max_loss_diff"] = max(diffs) if len(diffs) == STEPS else float("inf")
        one = None if c.group else all_cells.get(f"ref1-{c.strategy.replace('zero3_offload', 'zero3')}-{c.quant}")
        if one is not None and one is not c and one.result.get("status") == "ok" and not one.result.get("stale"):
            same = [abs(x - y) for x, y in zip(r["losses"], one.result["losses"])]
            r["same_strategy_1gpu_diff"] = max(same) if len(same) == STEPS else None
        if r.get("start_fingerprint") and ref.result.get("start_fingerprint"):
            r["start_vs_reference"] = abs(r["start_fingerprint"] / ref.result["start_fingerprint"] - 1)
        r["tolerance"] = tol.get(c.noise_key)
        r["agrees"] = r["tolerance"] is not None and r["max_loss_diff"] <= r["tolerance"]
    return {"noise": noise, "tolerance": tol, "noise_from_one_alternative_layout": noise_one_alt,
            "how": "3 x the largest loss difference between the reference and its re-runs with other micro-batch "
                   "layouts (16x1, 4x4, 2x8), floor 2e-3"}


def run_matrix(args) -> dict:
    import torch

    ngpu = torch.cuda.device_count()
    assert ngpu >= 2, "the matrix needs at least 2 GPUs"
    work = Path(args.work).resolve()
    for stale in ("runs", "logs", "checks"):  # a warm machine keeps /tmp: old runs would be refused as finished
        shutil.rmtree(work / stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    all_cells = selected(cells(), args.only, args.quant)
    models = {}
    for shape in sorted({c.shape or args.shape for c in all_cells.values()}):
        models[shape] = work / ("model" if shape == args.shape else f"model-{shape}")
        subprocess.run([sys.executable, "-m", "dist_dpo", "build-model", "--shape", shape, "--out",
                        str(models[shape]), "--device", "cuda", "--dtype", "bfloat16", "--seed", "0"], cwd=ROOT,
                       check=True)
    model_of = lambda cell: models[cell.shape or args.shape]  # noqa: E731
    port = iter(range(29600, 29999, 7))
    # A finished cell's adapter is checked on its lane's first GPU while the next cell trains there (the check is a
    # short forward; the cells' seconds per step may carry a little of it).
    checks = cf.ThreadPoolExecutor(ngpu)
    pending_checks = []
    lock = threading.Lock()  # cell results are read by the check threads' saves while lanes finish cells

    def finished(cell: Cell, lane: list[int]) -> None:
        def check():
            result = check_adapter(cell, model_of(cell), work, lane[0])
            with lock:
                if result is not None:
                    cell.result["adapter_check"] = result
            save(all_cells)
        pending_checks.append(checks.submit(check))

    def save(cells_now) -> None:
        with lock:
            write_doc(args, cells_now, agreement(cells_now), round(time.time() - t0, 1))

    def batch(group: list[Cell], width: int) -> None:
        # --share N: N cells at a time on each group of GPUs (a 0.5B cell uses a few GiB of an 80 GiB card; most of
        # its minute is process start-up). Losses and peak memory are per process and unchanged; s/step is not a
        # speed measurement then (benchmarks/throughput.py is).
        lanes = [list(range(i * width, (i + 1) * width)) for i in range(ngpu // width)] * args.share
        with cf.ThreadPoolExecutor(len(lanes)) as pool:
            pending = list(group)
            futures = {}
            free = list(lanes)
            while pending or futures:
                while pending and free:
                    cell, lane = pending.pop(0), free.pop(0)
                    futures[pool.submit(launch, cell, model_of(cell), work, lane, next(port))] = (cell, lane)
                done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    cell, lane = futures.pop(f)
                    with lock:
                        cell.result = f.result()
                        read_run(cell)
                    finished(cell, lane)
                    free.append(lane)
                    print(f"[{time.time() - t0:6.0f}s] {cell.name}: {cell.result['status']} "
                          f"({cell.result['wall_s']} s)", flush=True)

    batch([c for c in all_cells.values() if c.gpus == 1], 1)
    batch([c for c in all_cells.values() if c.gpus == 2], 2)
    for f in pending_checks:
        f.result()
    checks.shutdown()
    tol = agreement(all_cells)
    return {"cells": all_cells, "tolerance": tol, "wall_s": round(time.time() - t0, 1),
            "models": {k: str(v) for k, v in models.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="where gpu_matrix.json goes")
    p.add_argument("--work", default="/tmp/dist_dpo_matrix", help="scratch dir for models, runs and logs")
    p.add_argument("--shape", default="qwen2.5-0.5b", help="model shape (dist-dpo build-model --list)")
    p.add_argument("--only", default="", help="comma-separated substrings of cell names to run")
    p.add_argument("--quant", default="all", choices=("all", "lora", "qlora"), help="run only this half")
    p.add_argument("--share", type=int, default=1, help="cells running at once on each group of GPUs")
    p.add_argument("--list", action="store_true", help="print the cells --only / --quant select and exit")
    p.add_argument("--merge", nargs="+", help="merge partial result files (one per --quant run) into --out")
    p.add_argument("--overlay", nargs=2, metavar=("BASE", "NEWER"),
                   help="cells of NEWER (a later run of some cells) replace BASE's of the same name; agreement is "
                        "recomputed against the references and noise now in the file; each cell keeps its commit")
    p.add_argument("--stale", default="", help="with --overlay: NAME,NAME=why - BASE cells whose code path the fix "
                                                "changed but NEWER did not re-run (kept, marked, never counted ok)")
    args = p.parse_args()
    if (args.list or not (args.merge or args.overlay)) and not selected(cells(), args.only, args.quant):
        print(f"gpu_matrix.py: --only {args.only!r} --quant {args.quant} selects no cell (--list shows them)",
              file=sys.stderr)
        return 2
    if args.list:
        for c in selected(cells(), args.only, args.quant).values():
            against = f"refused: {c.refused}" if c.refused else f"vs {c.reference}" if c.reference else "reference"
            print(f"{c.name:32} {c.launcher:20} {c.strategy:13} {c.quant:5} {c.gpus} GPU  "
                  f"{c.shape or args.shape:13} {c.optim:16} {against}")
        return 0
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.overlay:
        return overlay(*args.overlay, Path(args.out), args.stale)
    res = run_matrix(args)
    cells_out = write_doc(args, res["cells"], res["tolerance"], res["wall_s"], final=True)
    return print_table(cells_out)


def write_doc(args, all_cells: dict, tolerance: dict, wall_s: float, final: bool = False) -> list[dict]:
    """The results file, rewritten after every cell and check: a run cut off at its time limit keeps what finished."""
    cells_out = []
    for c in all_cells.values():
        if not c.result:
            continue
        r = c.result
        check = r.get("adapter_check", {})
        row = {
            "name": c.name, "strategy": c.strategy, "quant": c.quant, "launcher": c.launcher, "gpus": c.gpus,
            "group": c.group, "shape": c.shape or args.shape, "optim": c.optim,
            "status": r.get("status", "failed"),
            "agrees": bool(r.get("agrees")) and (bool(check.get("ok", False)) or c.refused != ""),
            "loss_agrees": bool(r.get("agrees")), "adapter_ok": bool(check.get("ok", False)),
            "reference": c.reference, "max_loss_diff": r.get("max_loss_diff"), "tolerance": r.get("tolerance"),
            "peak_mem_gib": r.get("peak_mem_gib"), "seconds_per_step": r.get("seconds_per_step"),
            "adapter_tensors": r.get("adapter_tensors"),
        }
        row.update({k: v for k, v in r.items() if k not in row and k not in ("out",)})
        if row["status"] not in ("ok", "refused") or not row["agrees"]:
            row.setdefault("reason", r.get("reason") or check.get("reason") or "loss outside tolerance")
        cells_out.append(row)
    doc = {
        "what": "dist-dpo strategy x quantization matrix (benchmarks/gpu_matrix.py)",
        "command": "python3 benchmarks/gpu_matrix.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "environment": environment(),
        "cells_at_once_per_gpu_group": args.share,
        "setup": {"shape": args.shape, "steps": STEPS, "global_batch": GLOBAL_BATCH, "max_length": 512,
                  "lr": 2e-4, "lora": "r8 alpha32 q,k,v,o dropout 0", "gradient_checkpointing": True},
        "tolerance": tolerance,
        "wall_s": wall_s,
        "complete": final,
        "cells": cells_out,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_matrix.json" if args.quant == "all" else f"gpu_matrix_{args.quant}.json"
    (out / (name + ".tmp")).write_text(json.dumps(doc, indent=1, default=str))
    (out / (name + ".tmp")).rename(out / name)
    return cells_out


def merge(parts: list[str], out: Path) -> int:
    """Parts of the matrix run as separate jobs (each under its own time limit) become one results file."""
    docs = [json.loads(Path(p).read_text()) for p in parts]
    doc = dict(docs[0])
    doc["command"] = " && ".join(d["command"] for d in docs)
    doc["runs"] = [{"command": d["command"], "environment": d["environment"], "wall_s": d["wall_s"]} for d in docs]
    if len(docs) == 2:
        t0, t1 = docs[0]["tolerance"], docs[1]["tolerance"]
        doc["tolerance"] = {k: {**t0[k], **t1.get(k, {})} if isinstance(t0[k], dict) else t0[k] for k in t0}
    doc["cells"] = [c for d in docs for c in d["cells"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_matrix.json").write_text(json.dumps(doc, indent=1, default=str))
    return print_table(doc["cells"])


def overlay(base_path: str, newer_path: str, out: Path, stale: str = "") -> int:
    """A re-run of a few cells after a fix joins the full run it fixes, so the other cells need not run again."""
    base, newer = json.loads(Path(base_path).read_text()), json.loads(Path(newer_path).read_text())
    for d in (base, newer):
        for c in d["cells"]:
            c.setdefault("git_commit", d["environment"].get("git_commit"))
    rows = {c["name"]: c for c in base["cells"]}
    rows.update({c["name"]: c for c in newer["cells"]})
    known = {c.name: c for c in cells()}
    all_cells = {}
    for name, row in rows.items():
        spec = known.get(name) or Cell(name, row["launcher"], row["strategy"], row["quant"], row.get("gpus", 2),
                                       row.get("reference", ""))
        result = {k: v for k, v in row.items() if k not in ("agrees", "loss_agrees", "max_loss_diff", "tolerance",
                                                            "same_strategy_1gpu_diff", "start_vs_reference")}
        all_cells[name] = Cell(spec.name, spec.launcher, spec.strategy, spec.quant, spec.gpus, spec.reference, result)
    names, _, why = stale.partition("=")
    for name in filter(None, names.split(",")):
        if name not in all_cells:
            raise SystemExit(f"gpu_matrix.py: --stale names '{name}', which neither results file has")
        all_cells[name].result["stale"] = why or "not re-run after the fix"
    tol = agreement(all_cells)
    doc = dict(base)
    doc["runs"] = [{"command": d["command"], "git_commit": d["environment"].get("git_commit"),
                    "environment": d["environment"], "wall_s": d["wall_s"], "cells": [c["name"] for c in d["cells"]]}
                   for d in (base, newer)]
    doc["command"] = base["command"] + "  # then, after a fix: " + newer["command"]
    doc["tolerance"] = tol
    doc["cells"] = []
    for c in all_cells.values():
        r = c.result
        check = r.get("adapter_check") or {}
        row = {**r, "agrees": bool(r.get("agrees")) and bool(check.get("ok", False)),
               "loss_agrees": bool(r.get("agrees")), "adapter_ok": bool(check.get("ok", False))}
        if r.get("stale"):
            row.update(agrees=False, reason="stale: " + r["stale"])
        elif row["status"] == "ok" and row["agrees"]:
            row.pop("reason", None)
        elif row["status"] == "ok":
            row["reason"] = ("loss outside tolerance" if not row["loss_agrees"] else
                             check.get("reason") or "adapter check failed")
        doc["cells"].append(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_matrix.json").write_text(json.dumps(doc, indent=1, default=str))
    return print_table(doc["cells"])


def print_table(cells_out: list[dict]) -> int:
    print(f"\n{'cell':34} {'status':7} {'agree':5} {'maxdiff':>9} {'tol':>8} {'GiB':>6} {'s/step':>7} {'tensors':>7}")
    for row in cells_out:
        fmt = lambda v, f: (f % v) if isinstance(v, (int, float)) else "-"
        print(f"{row['name']:34} {row['status']:7} {str(row['agrees']):5} {fmt(row.get('max_loss_diff'), '%9.5f')} "
              f"{fmt(row.get('tolerance'), '%8.5f')} {fmt(row.get('peak_mem_gib'), '%6.2f')} "
              f"{fmt(row.get('seconds_per_step'), '%7.3f')} {fmt(row.get('adapter_tensors'), '%7d')}"
              + (f"  {row.get('reason', '')[:90]}" if row["status"] not in ("ok", "refused") or not row["agrees"]
                 else ""))
    return 0 if all(r["status"] in ("ok", "refused") and r["agrees"] for r in cells_out) else 1


if __name__ == "__main__":
    raise SystemExit(main())
