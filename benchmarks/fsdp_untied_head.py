"""An untied LM head under FSDP2 on one GPU: the speed path's log-prob head against plain trl, through the launcher.

    python3 benchmarks/fsdp_untied_head.py --out $OUT            (one GPU, ~4 minutes with the model build)

A random-weight model of an untied-head shape (default llama-3-8b: a 128k x 4096 head of its own) is built once; then
two runs of `dist-dpo launch fsdp --gpus 1` with the arch matrix's settings (benchmarks/arch_matrix.py: all-linear
LoRA, 4 steps of SGD that move the policy, the bundled pairs in trl's order): `--fast_path false` (trl) and the
default speed path. They agree when at every step the loss is within 2e-3 and the gradient norm within 2 % of trl's
(the arch matrix's floor, here without its noise run: a stricter bound). The speed path's head runs as the head
module's forward, so FSDP2's hooks gather the head's shards; a head read without them would be 1/N of its rows on N
GPUs, or a warning that a unit never ran forward here. Results: <out>/fsdp_untied_head.json (card, versions, commit,
command, both runs' steps, the speed-path line, any FSDP warning).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from arch_matrix import COMMON, STEPS, compare  # noqa: E402
from bench_env import ROOT, environment  # noqa: E402

WARNING = "did not run forward before backward"  # FSDP2's message for a unit whose hooks never ran


def launch(model: str, out: Path, extra: list[str], log: Path) -> dict:
    cmd = [sys.executable, "-m", "dist_dpo", "launch", "fsdp", "--config", "demo", "--gpus", "1", "--",
           "--model_name_or_path", model, "--output_dir", str(out), *COMMON,
           "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", *extra]
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
    text = log.read_text(errors="replace")
    result = {"exit": code, "seconds": round(time.perf_counter() - start, 1), "command": shlex.join(cmd[1:]),
              "fsdp_warning": next((ln.strip()[:300] for ln in text.splitlines() if WARNING in ln), None)}
    state = out / "trainer_state.json"
    if state.is_file():
        result["steps"] = [{"step": h["step"], "loss": h["loss"], "grad_norm": h.get("grad_norm")}
                           for h in json.loads(state.read_text())["log_history"] if "loss" in h]
    for line in text.splitlines():
        for key, marker in (("speed_path", "speed path: "), ("self_check", "speed-path self-check: ")):
            if marker in line:
                result[key] = line.split(marker, 1)[1].strip()
    if code != 0:
        result["log_tail"] = text.splitlines()[-15:]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default="/tmp/dist_dpo_fsdp_head")
    p.add_argument("--shape", default="llama-3-8b", help="an untied-head model_zoo shape")
    p.add_argument("--commit", default=None)
    a = p.parse_args()
    from dist_dpo.model_zoo import SHAPES

    if a.shape not in SHAPES or SHAPES[a.shape]["config"].get("tie_word_embeddings"):
        p.error(f"--shape {a.shape}: give an untied-head model_zoo shape (llama-3-8b, qwen2.5-7b)")
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model = work / a.shape
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "dist_dpo", "build-model", "--shape", a.shape, "--out", str(model),
                        "--device", "cuda"], cwd=ROOT, check=True)
    config = json.loads((model / "config.json").read_text())
    doc = {**environment(a.commit), "command": "python3 benchmarks/fsdp_untied_head.py " + shlex.join(sys.argv[1:]),
           "shape": a.shape, "tie_word_embeddings": config.get("tie_word_embeddings"), "steps": STEPS, "runs": {}}
    for name, extra in (("trl", ["--fast_path", "false"]), ("dist-dpo", [])):
        doc["runs"][name] = launch(str(model), work / name, extra, work / f"{name}.log")
        print(f"RUN {name}: exit {doc['runs'][name]['exit']} in {doc['runs'][name]['seconds']} s", flush=True)
    runs = doc["runs"]
    if all(r["exit"] == 0 for r in runs.values()):
        doc.update(compare({"trl": runs["trl"], "trl-4x2": runs["trl"], "dist-dpo": runs["dist-dpo"]}))
    else:
        doc.update(agrees=False, why="a run failed")
    line = runs["dist-dpo"].get("speed_path") or ""
    doc["head_on_speed_path"] = bool(line) and "head: trl's" not in line
    doc["agrees"] = bool(doc["agrees"]) and doc["head_on_speed_path"] and not runs["dist-dpo"].get("fsdp_warning")
    (out / "fsdp_untied_head.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"fsdp untied head ({a.shape}, tied={doc['tie_word_embeddings']}): agrees={doc['agrees']} "
          f"loss diff {doc.get('loss_diff')} (bound {doc.get('loss_bound')}), grad-norm rel diff "
          f"{doc.get('grad_norm_rel_diff')} (bound {doc.get('grad_norm_bound')}); trl {doc.get('trl_losses')} "
          f"dist-dpo {doc.get('dist_dpo_losses')}; FSDP warning: {runs['dist-dpo'].get('fsdp_warning')}")
    return 0 if doc["agrees"] else 1


if __name__ == "__main__":
    sys.exit(main())
