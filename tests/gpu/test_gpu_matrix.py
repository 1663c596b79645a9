"""GPU checks (marker `gpu`): skipped without CUDA, run on a machine with >= 2 GPUs:

    python3 -m pytest -q -m gpu tests/gpu

A short slice of benchmarks/gpu_matrix.py: the single-GPU references and one sharded cell per family must agree
step by step and their adapters must reload. The full matrix is `python3 benchmarks/gpu_matrix.py`.
"""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("quant", ["lora", "qlora"])
def test_sharded_cells_agree_with_reference(tmp_path, quant):
    cmd = [sys.executable, "benchmarks/gpu_matrix.py", "--quant", quant, "--only", "make-ddp,make-zero3,make-fsdp",
           "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    doc = json.loads((tmp_path / f"gpu_matrix_{quant}.json").read_text())
    cells = {c["name"]: c for c in doc["cells"]}
    assert {f"make-{s}-{quant}" for s in ("ddp", "zero3", "fsdp")} <= set(cells), proc.stdout[-2000:]
    for name, cell in cells.items():
        assert cell["status"] == "ok", (name, cell.get("reason"))
        assert cell["agrees"], (name, cell.get("max_loss_diff"), cell.get("tolerance"), cell.get("reason"))
        assert cell["adapter_tensors"] and cell["adapter_tensors"] > 0
