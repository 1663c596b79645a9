"""Every rank must train the same model: a one-forward check before step 1 (dist_dpo/same_model.py)."""

import re
import subprocess
import sys

import torch

from conftest import ROOT
from test_bad_inputs import accelerate_launch, base_env

# Loaded by every Python process of the job through PYTHONPATH: rank 1's model computes differently, the way one
# whose quantization state went missing on one rank would. (Different weights alone would not do: DDP copies rank 0's
# parameters to every rank when it wraps the model - but not a 4-bit layer's quantization state.)
PERTURB_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import dist_dpo.modeling as modeling
    load = modeling.load_model
    def load_model(*args, **kwargs):
        model = load(*args, **kwargs)
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out * 1.5)
        return model
    modeling.load_model = load_model
"""


def test_spread_measures_the_rank_furthest_from_rank_0():
    from dist_dpo.same_model import spread

    same = torch.tensor([[1.0, -2.0, 4.0]] * 3)
    assert spread(same) == (0.0, 0)
    off = same.clone()
    off[2, 1] += 0.4
    worst, rank = spread(off)
    assert rank == 2 and abs(worst - 0.1) < 1e-6  # 0.4 of a largest logit of 4


def test_ranks_with_different_weights_stop_before_step_1_with_one_line(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PERTURB_RANK_1)
    out = tmp_path / "run"
    env = base_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           "accelerate_configs/cpu.yaml", "-m", "dist_dpo", "train", "--config", "recipes/demo.yaml",
           "--output_dir", str(out), "--max_steps", "2", "--report_to", "none"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    combined = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [ln for ln in combined.splitlines() if "dist-dpo: error:" in ln]
    assert len(lines) == 1 and "the ranks hold different models before step 1 (rank 1's" in lines[0], combined[-3000:]
    assert not re.search(r'File ".*dist_dpo/', combined), combined[-4000:]
    assert "step 1/2" not in combined and not list(out.glob("checkpoint-*"))


def test_ranks_with_the_same_weights_say_so(tmp_path):
    out = tmp_path / "run"
    proc = accelerate_launch(["train", "--config", "recipes/demo.yaml", "--output_dir", str(out), "--max_steps", "1",
                              "--report_to", "none", "--eval_steps", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "same model on every rank" in (out / "logs" / "rank0.log").read_text()
