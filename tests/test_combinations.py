"""Recipe x strategy: every rule of strategies.COMBINATION_RULES, on CPU.

Each refusing rule runs `dist-dpo train` the way test_bad_inputs.py does (one clear line, exit 2, an earlier run in
the output dir untouched), with the strategy set as its launcher would set it: FSDP2 through accelerate's
environment, ZeRO through --deepspeed. The recipe x strategy rules come before the "needs GPUs" check, so they can
be seen on a CPU. The two rules that read the GPU itself (bf16 support, fp16's loss scaler) are checked on a
CUDA-typed runtime in-process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from test_bad_inputs import (CASE_LIMIT_S, Case, ForkServer, assert_one_clear_line, base_env, prepare,
                             snapshot)

FSDP = {"ACCELERATE_USE_FSDP": "true"}  # what `accelerate launch --config_file accelerate_configs/fsdp.yaml` sets
TWO_RANKS = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
ZERO2 = ["--deepspeed", "ds_configs/zero2.json"]


def ds_json(**blocks) -> dict:
    return {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", **blocks}


JSONS = {
    "bf16_fixed": ds_json(bf16={"enabled": True}),
    "fp16_fixed": ds_json(fp16={"enabled": True}),
    "with_optimizer": ds_json(optimizer={"type": "AdamW", "params": {"lr": "auto"}}),
    "with_scheduler": ds_json(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 1}}),
}

# rule id -> (arguments, environment, what the line must say)
REFUSALS: dict[str, tuple[list[str], dict, str]] = {
    "bnb-optimizer-under-fsdp": (["--optim", "paged_adamw_8bit"], FSDP,
                                 "optim paged_adamw_8bit (bitsandbytes) cannot update FSDP2's sharded parameters: use "
                                 "optim adamw_torch"),
    "8bit-weights-under-fsdp": (["--load_in_8bit"], FSDP, "FSDP cannot shard 8-bit"),
    "low-rank-optimizer-sharded": (["--optim", "galore_adamw", *ZERO2], {},
                                   "optim galore_adamw projects each weight matrix's gradient, but zero2"),
    "adafactor-under-zero": (["--optim", "adafactor", *ZERO2], {}, "so it would run unfactored"),
    "layerwise-optimizer-several-processes": (["--optim", "galore_adamw_layerwise"], TWO_RANKS,
                                              "(layer-wise) runs in one process only"),
    "layerwise-optimizer-accumulation": (["--optim", "apollo_adamw_layerwise", "--gradient_accumulation_steps", "2"],
                                         {}, "set gradient_accumulation_steps 1"),
    "low-rank-optimizer-targets": (["--optim", "galore_adamw"], {}, "set dpo_extra: {optim_target_modules:"),
    "lomo-under-deepspeed": (["--optim", "adalomo", *ZERO2], {}, "optim adalomo fuses its update into backward"),
    "precision-in-dpo-extra": (["--dpo_extra", "{bf16: true}"], {}, "dpo_extra sets bf16: set dtype instead"),
    "deepspeed-json-bf16-vs-dtype": (["--deepspeed", "{d}/bf16_fixed.json"], {},
                                     "bf16_fixed.json fixes bf16.enabled: true but this run computes in float32"),
    "deepspeed-json-fp16-vs-dtype": (["--deepspeed", "{d}/fp16_fixed.json", "--dtype", "bfloat16"], {},
                                     "fixes fp16.enabled: true but this run computes in bfloat16"),
    "deepspeed-json-optimizer-vs-optim": (["--deepspeed", "{d}/with_optimizer.json", "--optim", "sgd"], {},
                                          "has its own optimizer block, which replaces optim sgd"),
    "deepspeed-json-scheduler-vs-recipe": (["--deepspeed", "{d}/with_scheduler.json"], {},  # demo.yaml: constant
                                           "replaces lr_scheduler_type constant"),
    "optimizer-package-missing": (["--optim", "adamw_torch_4bit"], {},
                                  "optim adamw_torch_4bit needs the torchao package, which is not installed: pip "
                                  "install torchao"),
}
ON_GPU_ONLY = {"lomo-with-fp16", "bf16-without-bf16-gpu"}  # checked in-process below


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("combo_inputs")
    for name, body in JSONS.items():
        (d / f"{name}.json").write_text(json.dumps(body))
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ForkServer(tmp_path_factory.mktemp("combo_server"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def earlier_run(server, tmp_path_factory):
    from test_bad_inputs import BASE

    out = tmp_path_factory.mktemp("combo_earlier") / "run"
    rc, _, stdout, stderr = server.run(["train", *BASE, "--output_dir", str(out)])
    assert rc == 0, stdout[-2000:] + stderr[-3000:]
    return out


def test_every_transformers_optimizer_is_in_exactly_one_family():
    from transformers.training_args import OptimizerNames

    from dist_dpo.strategies import OPTIMIZER_FAMILIES

    names = [n for _, _, members in OPTIMIZER_FAMILIES.values() for n in members]
    assert sorted(names) == sorted(n.value for n in OptimizerNames)


def test_every_rule_reads_known_facts_and_every_refusal_is_tested(clean_launch_env):
    from dist_dpo.config import parse_recipe
    from dist_dpo.preflight import combination_facts
    from dist_dpo.runtime import resolve_runtime
    from dist_dpo.strategies import COMBINATION_RULES, STRATEGY_TABLE

    facts = combination_facts(parse_recipe([]), resolve_runtime(device_type="cpu"))
    for rule in COMBINATION_RULES:
        assert rule.action in ("refuse", "apply") and rule.reason and rule.says, rule.id
        assert set(rule.when) <= set(facts), (rule.id, set(rule.when) - set(facts))
        assert set(rule.when.get("strategy", ())) <= set(STRATEGY_TABLE), rule.id
        rule.says.format(**facts)  # every placeholder is a fact
    refusals = {r.id for r in COMBINATION_RULES if r.action == "refuse"}
    assert refusals == set(REFUSALS) | ON_GPU_ONLY
    assert len({r.id for r in COMBINATION_RULES}) == len(COMBINATION_RULES)


@pytest.mark.parametrize("rule_id", REFUSALS)
def test_a_refused_combination_is_one_line_exit_2_nothing_written(rule_id, server, inputs, earlier_run, tmp_path):
    args, env, needle = REFUSALS[rule_id]
    case = Case(rule_id, args, needle, env=env)
    argv, out = prepare(case, inputs, earlier_run, tmp_path)
    before = snapshot(out)
    rc, seconds, stdout, stderr = server.run(argv, env=env)
    assert rc == 2, f"{rule_id}: exit {rc}\n{stdout[-2000:]}\n{stderr[-3000:]}"
    assert seconds < CASE_LIMIT_S
    assert_one_clear_line(case, stderr)
    assert "Traceback" not in stdout + stderr
    assert snapshot(out) == before


def _cuda_runtime(clean_launch_env):
    from dist_dpo.runtime import resolve_runtime

    return dataclasses.replace(resolve_runtime(device_type="cpu"), device_type="cuda")


def test_rules_that_read_the_gpu(clean_launch_env, monkeypatch):
    import torch

    from dist_dpo.config import parse_recipe
    from dist_dpo.errors import UserError
    from dist_dpo.preflight import check_rules

    rt = _cuda_runtime(clean_launch_env)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a T4 / V100
    with pytest.raises(UserError, match="dtype bfloat16 but this GPU has no bf16: use dtype float16"):
        check_rules(parse_recipe(["--dtype", "bfloat16"]), rt)
    with pytest.raises(UserError, match="optim lomo cannot run under fp16's loss scaler"):
        check_rules(parse_recipe(["--optim", "lomo"]), rt)  # auto on a card without bf16: float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    check_rules(parse_recipe(["--dtype", "bfloat16"]), rt)
    check_rules(parse_recipe(["--optim", "paged_adamw_8bit", "--load_in_4bit"]), rt)  # the seed recipe on one GPU


def test_a_fix_that_changes_no_result_is_made_and_said_once(server, earlier_run, tmp_path):
    """tf32 on CPU: transformers would refuse it; it means nothing there, so it is dropped with one line."""
    case = Case("tf32-on-cpu", ["--dpo_extra", "{tf32: true}", "--overwrite_output_dir"], "")
    argv, out = prepare(case, ROOT, earlier_run, tmp_path)
    rc, _, stdout, stderr = server.run(argv)
    assert rc == 0, stdout[-2000:] + stderr[-3000:]
    said = "tf32 is a CUDA matmul mode: dropped on CPU"
    assert (stdout + stderr).count(said) == 1, stdout[-2000:] + stderr[-3000:]
    assert json.loads((out / "dist_dpo_run.json").read_text())["status"] == "complete"


def test_a_deepspeed_json_optimizer_block_is_said_and_the_strategy_rules_come_first(clean_launch_env, inputs,
                                                                                     caplog):
    """adamw_torch with the JSON's own AdamW block: said once. Then the CPU says ZeRO needs GPUs."""
    import logging

    from dist_dpo.config import parse_recipe
    from dist_dpo.errors import UserError
    from dist_dpo.preflight import check_combination
    from dist_dpo.runtime import resolve_runtime

    path = str(inputs / "with_optimizer.json")
    r = parse_recipe(["--deepspeed", path])
    rt = resolve_runtime(path, device_type="cpu")
    logging.getLogger("dist_dpo").propagate = True
    with caplog.at_level(logging.WARNING, logger="dist_dpo"), pytest.raises(UserError, match="needs GPUs"):
        check_combination(r, rt)
    assert [m for m in caplog.messages if "optimizer block" in m] == [
        f"{path}'s optimizer block (DeepSpeed's own AdamW-family optimizer) runs in place of optim adamw_torch"]


@pytest.mark.slow
def test_make_train_fsdp_with_the_seed_qlora_recipe_is_refused_before_launch(tmp_path):
    """`make train-fsdp` (default RECIPE: seed_qlora, paged_adamw_8bit): the launch script's one-process check runs
    the rules for FSDP2, so the refusal comes before any launcher starts (no '+ ... accelerate launch' line)."""
    env = {**base_env(), "PYTHON": sys.executable, "NGPUS": "1"}
    proc = subprocess.run(["make", "--no-print-directory", "train-fsdp", "ARGS=--output_dir " + str(tmp_path / "o")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("dist-dpo: error:")]
    assert len(lines) == 1 and "paged_adamw_8bit (bitsandbytes) cannot update FSDP2's sharded" in lines[0], proc.stderr
    assert "accelerate_cli launch" not in proc.stderr and not (tmp_path / "o").exists()


BNB_ON_FSDP2 = textwrap.dedent(r"""
    import json, os, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    import bitsandbytes as bnb
    dist.init_process_group("gloo", rank=0, world_size=1)
    results = {}
    for name in ("AdamW8bit", "PagedAdamW8bit", "AdamW", "torch.AdamW"):
        m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        fully_shard(m[0]); fully_shard(m)
        cls = torch.optim.AdamW if name == "torch.AdamW" else getattr(bnb.optim, name)
        opt = cls(m.parameters(), lr=1e-3)
        m(torch.randn(4, 64)).sum().backward()
        try:
            opt.step()
            results[name] = "ok"
        except Exception as e:
            results[name] = str(e).splitlines()[0]
    print("@@" + json.dumps(results), flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_bitsandbytes_optimizers_cannot_step_fsdp2_parameters(tmp_path):
    """The premise of bnb-optimizer-under-fsdp, with the installed bitsandbytes and torch: FSDP2 parameters are
    DTensors and bitsandbytes' update ops refuse them (8-bit and 32-bit alike); torch's AdamW steps them."""
    script = tmp_path / "bnb_fsdp2.py"
    script.write_text(BNB_ON_FSDP2)
    env = {**base_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("@@"))[2:])
    assert "got mixed torch.Tensor and DTensor" in results["AdamW8bit"]
    assert "got mixed torch.Tensor and DTensor" in results["PagedAdamW8bit"]
    assert "does not have a sharding strategy registered" in results["AdamW"]
    assert results["torch.AdamW"] == "ok"
