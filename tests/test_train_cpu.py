"""The real thing on CPU: `accelerate launch` with 2 processes (gloo) on the built-in model and data.

One run is shared by the assertions below (it takes ~40 s on 2 cores).
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

STEPS = 8


def accelerate_cmd(config="accelerate_configs/cpu.yaml"):
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", config,
            "-m", "dist_dpo", "train"]


def run_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    cmd = accelerate_cmd() + ["--config", "recipes/demo.yaml", "--output_dir", str(out), "--max_steps", str(STEPS),
                              "--logging_steps", "1", "--eval_steps", "4", "--save_steps", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    return proc, out


def test_two_processes_trained_and_finished(demo_run):
    proc, out = demo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2 on cpu" in proc.stdout, proc.stdout[-2000:]
    marker = json.loads((out / "dist_dpo_run.json").read_text())
    assert marker["status"] == "complete" and marker["world_size"] == 2 and marker["global_step"] == STEPS
    startup = marker["startup_s"]  # where the start went, in order, process start to the end of step 1
    assert list(startup)[0] == "python imports" and list(startup)[-1] == "step 1"
    assert "trainer (tokenization)" in startup and all(v >= 0 for v in startup.values())
    keys = list(startup)  # the trainer's own tokenization, listed as a share of its construction
    assert keys[keys.index("trainer (tokenization)") + 1] == "of which tokenizing"
    assert 0 < startup["of which tokenizing"] <= startup["trainer (tokenization)"]
    assert combined_has(proc, "start-up: python imports")


def combined_has(proc, text: str) -> bool:
    return text in proc.stdout + proc.stderr


def test_loss_went_down(demo_run):
    _, out = demo_run
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == STEPS
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # DPO starts at log 2: policy == reference
    assert sum(losses[-3:]) / 3 < losses[0] - 0.02, losses


def test_step_logs_appear_exactly_once(demo_run):
    proc, _ = demo_run
    combined = proc.stdout + proc.stderr
    for step in range(1, STEPS + 1):
        assert len(re.findall(rf"step {step}/{STEPS} \|", combined)) == 1, step
    assert combined.count("effective global batch") == 1
    assert "[vm rank1]" not in proc.stdout or "rank1] INFO" not in combined


def test_every_rank_has_its_log_file_and_outputs(demo_run):
    _, out = demo_run
    for rank in (0, 1):
        text = (out / "logs" / f"rank{rank}.log").read_text()
        assert f"rank{rank}]" in text
    assert "effective global batch" in (out / "logs" / "rank0.log").read_text()
    for name in ("adapter_model.safetensors", "adapter_config.json", "resolved_config.yaml", "train_results.json"):
        assert (out / name).is_file(), name
    assert (out / "adapter_model.safetensors").stat().st_size > 10_000
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


def test_adapter_loads_with_peft_and_changes_logprobs(demo_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_dpo.model_zoo import ensure_builtin_model

    _, out = demo_run
    base_path = ensure_builtin_model()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("你好，帮我写一首诗 please", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with torch.no_grad():
        before = torch.log_softmax(base(ids).logits, -1)
    tuned = PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        after = torch.log_softmax(tuned(ids).logits, -1)
    assert (after - before).abs().max().item() > 1e-3
