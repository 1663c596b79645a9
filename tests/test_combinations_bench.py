"""benchmarks/combinations.py on CPU: the cell list, the JSON it writes, how a cell's outcome is read, and the
docs/strategies.md tables rendered by benchmarks/matrix_table.py. (The cells themselves run on a GPU.)"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import combinations  # noqa: E402
import matrix_table  # noqa: E402


def test_dry_run_lists_every_recipe_under_every_make_path(tmp_path):
    env = {"GIT_COMMIT": "abc1234def", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "benchmarks/combinations.py", "--dry", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "combinations.json").read_text())
    assert doc["environment"]["git_commit"] == "abc1234def"  # the local checkout's, not the device copy's .git
    assert {"cards", "versions"} <= set(doc["environment"]) and doc["environment"]["shape"] == "qwen2.5-0.5b"
    recipes = {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert {(c["recipe"], c["path"]) for c in doc["cells"]} == {(r, p) for r in recipes for p in combinations.PATHS}
    made = {line.split(":")[0] for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("train-")}
    assert {c["command"].split()[2] for c in doc["cells"]} == made  # every train-* target, nothing else
    cell = next(c for c in doc["cells"] if c["name"] == "seed_qlora-deepspeed-zero3")
    assert "train-deepspeed STAGE=zero3 RECIPE=recipes/seed_qlora.yaml NGPUS=1" in cell["command"]
    assert "--max_steps 2" in cell["command"] and "--dataset_name builtin:bad-boy" in cell["command"]
    assert all(c["status"] == "pending" for c in doc["cells"]) and cell["target"] == "train-deepspeed STAGE=zero3"
    bad = subprocess.run([sys.executable, "benchmarks/combinations.py", "--dry", "--out", str(tmp_path),
                          "--paths", "fsdp3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown recipe/path ['fsdp3']" in bad.stderr


def _trained_run(out):
    out.mkdir(parents=True)
    (out / "dist_dpo_run.json").write_text(json.dumps({"status": "complete", "strategy": "fsdp", "world_size": 1,
                                                       "adapter": {"tensors": 48, "bytes": 1024},
                                                       "peak_mem_gib_per_rank": [3.25]}))
    (out / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 0.6931}, {"loss": 0.69},
                                                                        {"train_runtime": 3.0}]}))


def test_a_cell_is_read_as_trained_refused_or_failed(tmp_path):
    trained = combinations.Cell("demo", "fsdp", "train-fsdp")
    _trained_run(tmp_path / "t")
    combinations.read_cell(trained, 0, "...", tmp_path / "t")
    assert (trained.status, trained.losses, trained.peak_mem_gib, trained.adapter["tensors"]) == \
        ("trained", [0.6931, 0.69], 3.25, 48)
    refused = combinations.Cell("seed_qlora", "fsdp", "train-fsdp")
    combinations.read_cell(refused, 2, "+ python -m dist_dpo train --dry_run\ndist-dpo: error: optim paged_adamw_8bit "
                                       "(bitsandbytes) cannot update FSDP2's sharded parameters: use ...\n", tmp_path / "r")
    assert refused.status == "refused" and refused.line.startswith("optim paged_adamw_8bit")
    failed = combinations.Cell("seed_lora", "zero3", "train-zero3")
    combinations.read_cell(failed, 1, "Traceback\nRuntimeError: boom\n", tmp_path / "f")
    assert failed.status == "failed" and "RuntimeError: boom" in failed.line and failed.log_tail
    timed_out = combinations.Cell("seed_lora", "zero3-offload", "train-zero3-offload")
    combinations.read_cell(timed_out, 124, "", tmp_path / "x")
    assert timed_out.status == "failed" and timed_out.line == "exit 124"

    env = {"cards": ["NVIDIA H200, 143771 MiB"], "git_commit": "abc1234", "shape": "qwen2.5-0.5b"}
    path = combinations.write(tmp_path / "res", env, [trained, refused, failed, timed_out], 12.0)
    table = matrix_table.render_combinations(json.loads(path.read_text()))
    assert "| `train-fsdp` | ✅ trains (loss 0.6900, 3.25 GiB, adapter verified: 48 tensors) | ⛔ refused: optim " \
           "paged_adamw_8bit" in table
    assert "❌ exit 1: RuntimeError: boom" in table and "commit abc1234" in table
    merged = combinations.merge([str(path)], tmp_path / "merged")
    assert merged == 0 and len(json.loads((tmp_path / "merged" / "combinations.json").read_text())["cells"]) == 4


def test_matrix_table_writes_the_tables_into_docs_strategies(tmp_path):
    doc = ROOT / "docs" / "strategies.md"
    assert matrix_table.DOC == doc
    text = doc.read_text(encoding="utf-8")
    for marker in (matrix_table.BEGIN, matrix_table.END, matrix_table.COMBO_BEGIN, matrix_table.COMBO_END):
        assert text.count(marker) == 1, f"docs/strategies.md needs exactly one {marker}"
    block = text.split(matrix_table.BEGIN)[1].split(matrix_table.END)[0].strip("\n")
    rendered = matrix_table.render(json.loads((ROOT / "benchmarks/results/gpu_matrix.json").read_text()))
    assert block == rendered, "regenerate with: python3 benchmarks/matrix_table.py"

    copy = tmp_path / "strategies.md"
    copy.write_text(text, encoding="utf-8")
    cells = {"environment": {"cards": ["NVIDIA H200"], "git_commit": "abc1234", "shape": "qwen2.5-0.5b"},
             "setup": {"steps": 2}, "cells": [{"recipe": "demo", "path": "ddp", "target": "train-ddp",
                                                "status": "refused", "line": "no GPU"}]}
    (tmp_path / "combinations.json").write_text(json.dumps(cells))
    proc = subprocess.run([sys.executable, "benchmarks/matrix_table.py", "--combinations",
                           str(tmp_path / "combinations.json"), "--doc", str(copy)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = copy.read_text(encoding="utf-8")
    assert "| `train-ddp` | ⛔ refused: no GPU |" in written
    assert written.split(matrix_table.COMBO_END)[1] == text.split(matrix_table.COMBO_END)[1]  # nothing else moved
    assert written.split(matrix_table.COMBO_BEGIN)[0] == text.split(matrix_table.COMBO_BEGIN)[0]
