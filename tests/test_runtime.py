"""Who-am-I resolution from launcher environments, the strategy table, and device placement per LOCAL rank."""

import json

import pytest

from dist_dpo.config import ModelArgs
from dist_dpo.errors import UserError
from dist_dpo.modeling import device_map_for, quantization_config
from dist_dpo.runtime import STRATEGIES, resolve_runtime
from dist_dpo.strategies import STRATEGY_TABLE, strategy_for


def test_plain_python_is_single(clean_launch_env):
    rt = resolve_runtime(device_type="cpu")
    assert (rt.rank, rt.local_rank, rt.world_size, rt.strategy, rt.launcher) == (0, 0, 1, "single", "python")
    assert rt.is_main and not rt.distributed


def test_torchrun_second_node(clean_launch_env):
    # node 1 of 2, 4 GPUs each: global rank 5 is local rank 1 -> its model belongs on cuda:1, not cuda:5
    env = dict(RANK="5", LOCAL_RANK="1", WORLD_SIZE="8", LOCAL_WORLD_SIZE="4", GROUP_RANK="1", TORCHELASTIC_RUN_ID="x")
    for k, v in env.items():
        clean_launch_env.setenv(k, v)
    rt = resolve_runtime(device_type="cuda")
    assert (rt.rank, rt.local_rank, rt.node_rank, rt.num_nodes, rt.strategy) == (5, 1, 1, 2, "ddp")
    assert not rt.is_main
    m = ModelArgs(load_in_4bit=True)
    assert device_map_for(m, rt, strategy_for("ddp")) == {"": 1}
    assert device_map_for(m, rt, strategy_for("zero2")) == {"": 1}
    assert device_map_for(m, rt, strategy_for("fsdp")) is None
    assert device_map_for(m, rt, strategy_for("zero3")) is None
    # unquantized too: straight onto the local GPU, not through host memory; sharded strategies place it themselves
    assert device_map_for(ModelArgs(), rt, strategy_for("ddp")) == {"": 1}
    assert device_map_for(ModelArgs(), rt, strategy_for("single")) == {"": 1}
    assert device_map_for(ModelArgs(), rt, strategy_for("zero3")) is None
    cpu = resolve_runtime(device_type="cpu")
    assert device_map_for(ModelArgs(), cpu, strategy_for("ddp")) is None


def test_deepspeed_launcher(clean_launch_env, tmp_path):
    cfg = tmp_path / "z3.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    for k, v in dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", LOCAL_SIZE="2", CROSS_RANK="1").items():
        clean_launch_env.setenv(k, v)
    rt = resolve_runtime(str(cfg), device_type="cuda")
    assert (rt.launcher, rt.strategy, rt.offload, rt.node_rank, rt.local_world_size) == ("deepspeed", "zero3", True, 1, 2)
    assert rt.deepspeed_config == str(cfg)


def test_accelerate_zero2_and_fsdp(clean_launch_env, tmp_path):
    cfg = tmp_path / "z2.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    for k, v in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", ACCELERATE_USE_DEEPSPEED="true",
                     ACCELERATE_DEEPSPEED_CONFIG_FILE=str(cfg)).items():
        clean_launch_env.setenv(k, v)
    rt = resolve_runtime(device_type="cuda")
    assert (rt.launcher, rt.strategy, rt.offload) == ("accelerate", "zero2", False)
    clean_launch_env.delenv("ACCELERATE_USE_DEEPSPEED")
    clean_launch_env.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolve_runtime(device_type="cuda").strategy == "fsdp"


@pytest.mark.parametrize("content, needle", [(None, "does not exist"), ("{", "not valid JSON"),
                                             ('{"zero_optimization": {"stage": 1}}', "supports ZeRO stage 2 or 3")])
def test_bad_deepspeed_config(clean_launch_env, tmp_path, content, needle):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=needle):
        resolve_runtime(str(path), device_type="cuda")


def test_strategy_table_is_complete_and_consistent():
    assert set(STRATEGY_TABLE) == set(STRATEGIES)
    for name, s in STRATEGY_TABLE.items():
        sharded = name in ("fsdp", "zero3")
        # sharded strategies: no device_map, float storage for 4-bit, no fp32 upcast, adapter gathered on save
        assert (s.quant_device_map is None) == sharded
        assert (s.bnb_4bit_quant_storage == "bfloat16") == sharded
        assert s.prepare_kbit == (not sharded)
        assert (s.adapter_save == "gathered") == sharded
    assert STRATEGY_TABLE["ddp"].ddp_find_unused_parameters is False
    assert STRATEGY_TABLE["ddp"].checkpointing_reentrant is False
    assert STRATEGY_TABLE["zero3"].checkpointing_reentrant is True  # trl#2514


def test_quant_storage_follows_strategy():
    import torch

    m = ModelArgs(load_in_4bit=True)
    assert quantization_config(m, strategy_for("zero3"), torch.bfloat16).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(m, strategy_for("ddp"), torch.bfloat16).bnb_4bit_quant_storage == torch.uint8
    q = quantization_config(m, strategy_for("ddp"), torch.bfloat16)
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(ModelArgs(), strategy_for("ddp"), torch.bfloat16) is None


def test_rank_local_model_builds_stay_outside_zero3_init(tmp_path):
    """Regression (2 x H200, 2026-11-27): with a ZeRO-3 config registered, transformers builds models inside
    deepspeed.zero.Init (a broadcast per parameter), so rank 0's preflight skeleton waited forever for rank 1."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from dist_dpo.config import parse_recipe
    from dist_dpo.model_zoo import ensure_builtin_model
    from dist_dpo.upstream.swaps import zero3_init_off
    from dist_dpo.preflight import skeleton_counts

    ds = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_zero3_enabled()
    with zero3_init_off():
        assert not is_deepspeed_zero3_enabled()
    assert is_deepspeed_zero3_enabled()  # restored
    params, trainable, model_type = skeleton_counts(parse_recipe([]), str(ensure_builtin_model()))
    assert params > trainable > 0 and model_type == "qwen2"
    del ds


def test_merging_micro_batches_where_it_cannot_happen_is_refused(clean_launch_env):
    """An explicit `merge_micro_batches: true` that would be ignored is an error, not a silent no-op."""
    from dataclasses import replace

    from dist_dpo.config import parse_recipe
    from dist_dpo.preflight import check_combination

    rt = resolve_runtime(device_type="cpu")
    check_combination(parse_recipe(["--merge_micro_batches", "true"]), rt)  # single process: merges
    with pytest.raises(UserError, match="merge_micro_batches: true needs fast_path"):
        check_combination(parse_recipe(["--merge_micro_batches", "true", "--fast_path", "false"]), rt)
    with pytest.raises(UserError, match="DeepSpeed fixes it"):
        check_combination(parse_recipe(["--merge_micro_batches", "true"]), replace(rt, strategy="zero2"))


def test_ddp_gradients_live_in_the_all_reduce_buckets():
    """The table's ddp_gradient_as_bucket_view reaches the DDP settings accelerate wraps the model with; other
    strategies leave them alone. (tests/test_speed.py's 2-rank run proves the gradients stay the 1-process ones.)"""
    from types import SimpleNamespace

    from accelerate.utils import DistributedDataParallelKwargs

    from dist_dpo.strategies import STRATEGY_TABLE
    from dist_dpo.train import ddp_gradients_in_buckets

    for name, strat in STRATEGY_TABLE.items():
        trainer = SimpleNamespace(accelerator=SimpleNamespace(ddp_handler=DistributedDataParallelKwargs()))
        ddp_gradients_in_buckets(trainer, strat)
        assert trainer.accelerator.ddp_handler.to_kwargs().get("gradient_as_bucket_view", False) is (name == "ddp")
    ddp_gradients_in_buckets(SimpleNamespace(accelerator=SimpleNamespace(ddp_handler=None)), STRATEGY_TABLE["ddp"])


def test_ddp_gradient_copies_ab_switch(monkeypatch):
    import pytest
    from types import SimpleNamespace

    from accelerate.utils import DistributedDataParallelKwargs

    from dist_dpo.errors import UserError
    from dist_dpo.train import ddp_gradients_in_buckets

    trainer = SimpleNamespace(accelerator=SimpleNamespace(ddp_handler=DistributedDataParallelKwargs()))
    monkeypatch.setenv("DIST_DPO_AB_DDP_GRAD_COPY", "1")
    ddp_gradients_in_buckets(trainer, STRATEGY_TABLE["ddp"])
    assert "gradient_as_bucket_view" not in trainer.accelerator.ddp_handler.to_kwargs()
    monkeypatch.setenv("DIST_DPO_AB_DDP_GRAD_COPY", "yes")
    with pytest.raises(UserError, match="DIST_DPO_AB_DDP_GRAD_COPY=yes"):
        ddp_gradients_in_buckets(trainer, STRATEGY_TABLE["ddp"])
