"""benchmarks/gpu_matrix.py on CPU: which cells the multi-GPU matrix runs, what each is compared with, how its
noise floors and refusals are read. (The cells themselves run on several GPUs.)"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_matrix  # noqa: E402


def test_every_compared_cell_has_its_reference_and_noise_floor_in_the_run():
    cells = {c.name: c for c in gpu_matrix.cells()}
    for c in cells.values():
        if c.reference:
            assert c.reference in cells, c.name
            ref = cells[c.reference]
            assert (ref.shape, ref.optim) == (c.shape, c.optim), c.name  # the same model and optimizer
        for alt in ("ref-", "ref-alt-", "ref-alt2-"):  # its group's three layouts: the tolerance
            assert f"{c.prefix}{alt}{c.quant}" in cells, c.name
    # two more families (untied heads: FSDP2 shards a head the log-prob head reads) x DDP / FSDP2 / ZeRO-3 x LoRA/QLoRA
    for group, shape in gpu_matrix.FAMILIES.items():
        made = {(c.strategy, c.quant) for c in cells.values() if c.group == group and c.gpus == 2}
        assert made == {(s, q) for s in ("ddp", "fsdp", "zero3") for q in ("lora", "qlora")}
        assert all(c.shape == shape for c in cells.values() if c.group == group)
    from dist_dpo.model_zoo import FAMILY_SHAPES

    assert all(FAMILY_SHAPES[s]["config"].get("tie_word_embeddings") is False for s in gpu_matrix.FAMILIES.values())
    # the tutorial's optimizer under every strategy: trained, or refused with the strategy table's line
    paged = {c.strategy: c for c in cells.values() if c.group == "paged" and c.gpus == 2}
    assert set(paged) == {"ddp", "zero2", "zero3", "zero3_offload", "fsdp"}
    assert paged["fsdp"].refused and not paged["fsdp"].reference
    assert all(c.optim == "paged_adamw_8bit" and not c.refused for s, c in paged.items() if s != "fsdp")


def test_only_brings_the_references_it_is_compared_with():
    picked = gpu_matrix.selected(gpu_matrix.cells(), "llama-make-fsdp", "all")
    assert set(picked) == {"llama-make-fsdp-lora", "llama-make-fsdp-qlora", "llama-ref-lora", "llama-ref-alt-lora",
                           "llama-ref-alt2-lora", "llama-ref-qlora", "llama-ref-alt-qlora", "llama-ref-alt2-qlora"}
    picked = gpu_matrix.selected(gpu_matrix.cells(), "2nodes-torchrun", "qlora")
    assert {"2nodes-torchrun-ddp-qlora", "make-ddp-qlora", "ref-qlora"} <= set(picked)
    assert not any(c.group for c in picked.values())


def test_each_group_is_held_to_its_own_noise_floor_and_a_refusal_agrees_only_as_refused():
    cells = {c.name: replace(c, result={}) for c in gpu_matrix.cells()
             if c.group in ("", "llama") and c.quant == "lora" and (c.gpus == 1 and not c.reference or
                                                                   c.name in ("make-ddp-lora", "llama-make-ddp-lora"))}
    steps = gpu_matrix.STEPS
    base = [0.69] * steps
    for name, wobble in (("ref-lora", 0.0), ("ref-alt-lora", 0.001), ("ref-alt2-lora", 0.002),
                         ("llama-ref-lora", 0.0), ("llama-ref-alt-lora", 0.01), ("llama-ref-alt2-lora", 0.0)):
        cells[name].result = {"status": "ok", "losses": [x + wobble for x in base]}
    cells["make-ddp-lora"].result = {"status": "ok", "losses": [x + 0.008 for x in base]}  # within 3 x 0.01 only
    cells["llama-make-ddp-lora"].result = {"status": "ok", "losses": [x + 0.008 for x in base]}
    refused = next(c for c in gpu_matrix.cells() if c.refused)
    cells[refused.name] = replace(refused, result={"status": "refused"})
    tol = gpu_matrix.agreement(cells)["tolerance"]
    assert abs(tol["lora"] - 0.006) < 1e-9 and abs(tol["llama/lora"] - 0.03) < 1e-9
    assert not cells["make-ddp-lora"].result["agrees"] and cells["llama-make-ddp-lora"].result["agrees"]
    assert cells[refused.name].result["agrees"]
    cells[refused.name].result = {"status": "failed"}
    gpu_matrix.agreement(cells)
    assert not cells[refused.name].result["agrees"]


def test_a_refusal_is_read_from_the_logs(tmp_path):
    cell = next(c for c in gpu_matrix.cells() if c.refused)
    log = tmp_path / "cell.log"
    log.write_text(f"dist-dpo: error: {cell.refused}: use optim adamw_torch ...\n")
    cell = replace(cell, result={"rc": 1, "out": str(tmp_path / "run"), "logs": [str(log)]})
    gpu_matrix.read_run(cell)
    assert cell.result["status"] == "refused" and cell.refused in cell.result["reason"]
    log.write_text("Traceback ... RuntimeError: got mixed torch.Tensor and DTensor\n")  # it trained into the error
    cell = replace(cell, result={"rc": 1, "out": str(tmp_path / "run"), "logs": [str(log)]})
    gpu_matrix.read_run(cell)
    assert cell.result["status"] == "failed" and "never printed" in cell.result["reason"]


def test_list_needs_no_gpu():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_matrix.py", "--list", "--only", "paged"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 8 and any("refused: optim paged_adamw_8bit" in line for line in lines)


def test_the_docs_table_gives_the_families_and_the_tutorials_optimizer_their_own_rows():
    import matrix_table

    def cell(name, strategy, quant, group="", shape="qwen2.5-0.5b", optim="adamw_torch", **kw):
        return {"name": name, "launcher": "make", "strategy": strategy, "quant": quant, "gpus": 2, "group": group,
                "shape": shape, "optim": optim, "status": "ok", "agrees": True, "loss_agrees": True,
                "max_loss_diff": 0.001, "tolerance": 0.004, "peak_mem_gib": 1.0, **kw}

    doc = {"environment": {"cards": ["NVIDIA H100"], "git_commit": "abc1234"}, "command": "python3 x --out o",
           "setup": {"shape": "qwen2.5-0.5b", "steps": 8, "global_batch": 16},
           "tolerance": {"how": "...", "tolerance": {"lora": 0.004, "qlora": 0.005, "llama/lora": 0.003}},
           "cells": [cell("make-ddp-lora", "ddp", "lora"),
                     cell("llama-make-fsdp-lora", "fsdp", "lora", group="llama", shape="tiny-llama"),
                     cell("paged-make-fsdp-qlora", "fsdp", "qlora", group="paged", optim="paged_adamw_8bit",
                          status="refused", reason="optim paged_adamw_8bit (bitsandbytes) cannot update FSDP2's ...")]}
    text = matrix_table.render(doc)
    main, _, other = text.partition("Other families")
    assert "| make | ddp | ✅" in main and "llama" not in main and "paged" not in main
    assert "| llama | tiny-llama | adamw_torch | fsdp | ✅ Δloss 0.0010" in other and "llama/lora 0.0030" in other
    assert "| paged | qwen2.5-0.5b | paged_adamw_8bit | fsdp | - | 🚫 refused before launch: optim" in other


def test_a_selection_that_matches_no_cell_is_refused_in_one_line():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_matrix.py", "--list", "--only", "no-such-cell"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "selects no cell" in proc.stderr and "Traceback" not in proc.stderr
