"""FSDP2 + QLoRA: the packed 4-bit weights must reach every rank bit for bit (dist_dpo/precision.py).

FSDP2 copies a layer's tensors into its all-gather buffer. When they all share one float dtype it does so with a CUDA
kernel that passes through float, which rewrites packed NF4 bytes that happen to read as a bf16 NaN
(bitsandbytes#1945); with mixed dtypes it gathers raw bytes (uint8). CPU copies never touch NaN payloads, so CI
checks the decision FSDP2 makes - the all-gather dtype of a QLoRA decoder layer under the policy dist-dpo sets -
and the GPU matrix (benchmarks/gpu_matrix.py: ref1-fsdp-qlora, make-fsdp-qlora) checks the numbers.
"""

import json
import subprocess
import sys
from types import SimpleNamespace

import torch

from conftest import ROOT

PROBE = r"""
import json, os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
    _get_all_gather_input_metadatas, _get_param_all_gather_inputs)
from dist_dpo.model_zoo import builtin_model_dir
from dist_dpo.precision import fsdp_param_dtype
from dist_dpo.strategies import strategy_for
from types import SimpleNamespace

q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                       bnb_4bit_quant_storage=torch.bfloat16)  # what the strategy table gives fsdp
from dist_dpo.precision import keep_qlora_adapters_fp32
out = {}
for name in ("dist-dpo", "bf16 adapters, uncast", "bf16 cast"):
    model = AutoModelForCausalLM.from_pretrained(str(builtin_model_dir()), dtype=torch.bfloat16,
                                                 quantization_config=q, device_map={"": "cpu"})
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for p in model.parameters():  # what trl's DPOTrainer does to a quantized model's adapters
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(bf16=True, fp16=False))
    if name == "dist-dpo":
        keep_qlora_adapters_fp32(trainer, strategy_for("fsdp"))
    dtype = fsdp_param_dtype(trainer, strategy_for("fsdp")) if name != "bf16 cast" else torch.bfloat16
    layer = model.base_model.model.model.layers[0]
    fully_shard(layer, mesh=init_device_mesh("cpu", (1,)),
                mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=None))
    group = layer._get_fsdp_state()._fsdp_param_group
    group.lazy_init()  # where FSDP2 settles each parameter's all-gather dtype (first forward)
    gathered = _get_all_gather_input_metadatas(_get_param_all_gather_inputs(group.fsdp_params))[2]
    out[name] = {"param_dtype": str(dtype), "all_gather_dtype": str(gathered)}
dist.destroy_process_group()
print("RESULT " + json.dumps(out))
"""


def test_fsdp2_gathers_a_qlora_layer_as_raw_bytes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PORT": str(port), "PYTHONPATH": str(ROOT)})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    got = json.loads(line[0][len("RESULT "):])
    assert got["dist-dpo"] == {"param_dtype": "None", "all_gather_dtype": "torch.uint8"}
    # The controls: accelerate's default bf16 cast, or trl's bf16 adapters left as they are (measured on 2 x H200,
    # 2026-11-28: the first fix alone left FSDP2 QLoRA 0.0136 off), make the layer one bf16 buffer.
    assert got["bf16 cast"]["all_gather_dtype"] == "torch.bfloat16"
    assert got["bf16 adapters, uncast"] == {"param_dtype": "None", "all_gather_dtype": "torch.bfloat16"}


def test_fsdp_casts_parameters_to_bf16_when_nothing_is_packed():
    from dist_dpo.precision import fsdp_param_dtype
    from dist_dpo.strategies import strategy_for

    plain = SimpleNamespace(model=torch.nn.Linear(4, 4), args=SimpleNamespace(bf16=True, fp16=False))
    assert fsdp_param_dtype(plain, strategy_for("fsdp")) == torch.bfloat16  # full models gather in bf16: half the bytes
    fp16 = SimpleNamespace(model=torch.nn.Linear(4, 4), args=SimpleNamespace(bf16=False, fp16=True))
    assert fsdp_param_dtype(fp16, strategy_for("fsdp")) == torch.float16


def test_qlora_adapters_go_back_to_fp32_except_where_deepspeed_keeps_masters():
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model

    from dist_dpo.model_zoo import builtin_model_dir
    from dist_dpo.precision import keep_qlora_adapters_fp32
    from dist_dpo.strategies import strategy_for

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    for name, expect in (("single", torch.float32), ("ddp", torch.float32), ("fsdp", torch.float32),
                         ("zero2", torch.bfloat16), ("zero3", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(str(builtin_model_dir()), dtype=torch.bfloat16,
                                                     quantization_config=q, device_map={"": "cpu"})
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        for p in model.parameters():  # trl's cast
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        cast = keep_qlora_adapters_fp32(SimpleNamespace(model=model), strategy_for(name))
        trainable = {p.dtype for p in model.parameters() if p.requires_grad}
        assert trainable == {expect}, name
        assert cast == (len([p for p in model.parameters() if p.requires_grad]) if expect == torch.float32 else 0)
        frozen = {type(p).__name__ for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32}
        assert not frozen, (name, frozen)  # the base model is untouched


def test_unquantized_adapters_are_left_alone():
    from dist_dpo.precision import keep_qlora_adapters_fp32
    from dist_dpo.strategies import strategy_for

    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert keep_qlora_adapters_fp32(SimpleNamespace(model=model), strategy_for("ddp")) == 0
    assert model.weight.dtype == torch.bfloat16


def _tiny_qlora(layers_to_transform=None, adapters_bf16=False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model

    from dist_dpo.model_zoo import builtin_model_dir

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                           bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(builtin_model_dir()), dtype=torch.bfloat16,
                                                 quantization_config=q, device_map={"": "cpu"})
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=layers_to_transform)
    model = get_peft_model(model, cfg)
    if adapters_bf16:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return model


def test_fsdp_refuses_a_4bit_layer_it_would_gather_through_a_float_copy():
    import pytest

    from dist_dpo.errors import UserError
    from dist_dpo.precision import refuse_float_gathered_4bit
    from dist_dpo.strategies import strategy_for

    fsdp = strategy_for("fsdp")
    refuse_float_gathered_4bit(_tiny_qlora(), fsdp)  # fp32 adapters on every layer: raw bytes, fine
    with pytest.raises(UserError, match=r"FSDP2 would gather .*layers\.1 .*bitsandbytes#1945"):
        refuse_float_gathered_4bit(_tiny_qlora(layers_to_transform=[0]), fsdp)  # layer 1: 4-bit + bf16 only
    with pytest.raises(UserError, match="bitsandbytes#1945"):
        refuse_float_gathered_4bit(_tiny_qlora(adapters_bf16=True), fsdp)  # trl's bf16 adapters, left as they are
    refuse_float_gathered_4bit(_tiny_qlora(adapters_bf16=True), strategy_for("ddp"))  # nothing is gathered under DDP
