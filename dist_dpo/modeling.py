"""Tokenizer, base model (bf16 / 4-bit / 8-bit) and the LoRA config, placed as the strategy table says."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dist_dpo.architectures import family_of
from dist_dpo.config import BUILTIN_MODEL, LoraArgs, ModelArgs
from dist_dpo.errors import UserError
from dist_dpo.runtime import Runtime
from dist_dpo.strategies import Strategy
from dist_dpo.upstream.swaps import zero3_init_off

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model_path(name: str) -> str:
    """Local dir, the built-in tiny model, or a hub id (only when the hub is reachable / cached)."""
    if name.startswith("builtin:"):  # the built-in tiny Qwen2, or a tiny model of another family (builtin:tiny-llama)
        from dist_dpo.model_zoo import ensure_builtin_model

        with zero3_init_off():
            return str(ensure_builtin_model(shape=name.split(":", 1)[1]))
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model path '{name}' has no config.json: point model_name_or_path at a saved model dir")
        return str(p)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        raise UserError(f"model path '{name}' does not exist: pass a local model dir, a hub id, or {BUILTIN_MODEL}")
    from huggingface_hub import try_to_load_from_cache

    if os.environ.get("HF_HUB_OFFLINE") == "1" and try_to_load_from_cache(name, "config.json") is None:
        raise UserError(
            f"model '{name}' is not in the local hub cache and HF_HUB_OFFLINE=1: download it first or pass a local path"
        )
    return name


def resolve_dtype(m: ModelArgs, rt: Runtime) -> torch.dtype:
    if m.dtype != "auto":
        return _DTYPES[m.dtype]
    if rt.device_type == "cpu":
        return torch.float32  # CPU bf16 matmuls are slow and autocast on CPU is patchy
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # fp16 on pre-Ampere cards


def load_tokenizer(m: ModelArgs, model_path: str):
    from transformers import AutoTokenizer

    tok_path = m.tokenizer_name_or_path or model_path
    try:
        tok = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from '{tok_path}': {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(m: ModelArgs, strat: Strategy, dtype: torch.dtype):
    if not (m.load_in_4bit or m.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if m.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=m.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=m.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=_DTYPES.get(strat.bnb_4bit_quant_storage, torch.uint8),
    )


def device_map_for(m: ModelArgs, rt: Runtime, strat: Strategy):
    """Where the model loads, as the strategy table says: on this rank's local GPU where every rank holds the whole
    model, nowhere in particular where the wrapper shards it (FSDP2 / ZeRO-3 place the shards), in host memory on
    CPU."""
    quantized = m.load_in_4bit or m.load_in_8bit
    if strat.quant_device_map is None:
        return None
    if rt.device_type == "cpu":
        return {"": "cpu"} if quantized else None
    return {"": rt.local_rank}  # LOCAL rank: correct on every node of a multi-node job


def uses_prepare_kbit(m: ModelArgs, rt: Runtime, strat: Strategy) -> bool:
    """Whether peft's prepare_model_for_kbit_training runs (the memory plan asks too: it changes activation dtypes).

    It upcasts embeddings, norms and the LM head to fp32: with bf16 compute that buys nothing and costs memory (a 7B
    shape: +4.4 GiB per GPU; trl's own QLoRA path skips it too), so only fp16-compute cards (no bf16: T4, V100),
    where fp16 norms can overflow, get it, under the strategies whose table cell allows it."""
    import torch

    quantized = m.load_in_4bit or m.load_in_8bit
    return bool(quantized and strat.prepare_kbit and resolve_dtype(m, rt) == torch.float16)


def load_model(m: ModelArgs, model_path: str, rt: Runtime, strat: Strategy, gradient_checkpointing: bool):
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(m, rt)
    quant = quantization_config(m, strat, dtype)
    kwargs = dict(
        dtype=dtype,
        attn_implementation=m.attn_implementation,
        trust_remote_code=m.trust_remote_code,
        device_map=device_map_for(m, rt, strat),
    )
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"cannot load model '{model_path}': {str(e).splitlines()[0]}") from None
    model.config.use_cache = False  # no KV cache in training; it also conflicts with checkpointing
    leaves = moe_blocks_as_leaves(model, strat)
    if leaves and rt.is_main:
        from dist_dpo.logs import get_logger

        get_logger().info("MoE: %d sparse blocks are ZeRO-3 leaf modules (gathered whole)", leaves)
    if uses_prepare_kbit(m, rt, strat):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": strat.checkpointing_reentrant},
        )
    return model


def moe_blocks_as_leaves(model, strat: Strategy) -> int:
    """Under ZeRO-3 (the strategy table's cell), the family's sparse MoE block (the architecture table's) becomes a
    DeepSpeed leaf module: its experts are gathered together, whatever each rank's tokens route to. Without it ranks
    gather different experts and wait on each other for ever (DeepSpeed #4966). Returns how many blocks."""

    block = family_of(model).moe_block
    if not (strat.moe_blocks_as_leaves and block):
        return 0
    classes = {type(mod) for mod in model.modules() if type(mod).__name__ == block}
    if not classes:
        return 0
    from deepspeed.utils import set_z3_leaf_modules

    return len(set_z3_leaf_modules(model, list(classes)))


def lora_targets(targets: list[str], model) -> list[str]:
    """The recipe's targets; where the model has none of them and they are the default attention pair, the
    family's own names for it (Phi-3's fused qkv_proj), said once."""
    from dist_dpo.config import LoraArgs

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    family = family_of(model)
    if targets == LoraArgs().lora_target_modules and family.attention_targets and not set(targets) & names:
        from dist_dpo.logs import get_logger

        get_logger().info("lora_target_modules: %s has no %s; adapting %s, its attention projections", family.name,
                          " / ".join(targets), " / ".join(family.attention_targets))
        return list(family.attention_targets)
    return targets


MLP_NAMES = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}  # dense MLP projections of the usual families


def lora_config(lo: LoraArgs, model) -> "object | None":
    if not lo.use_peft:
        return None
    from peft import LoraConfig

    targets: str | list[str] = lo.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    else:
        targets = lora_targets(targets, model)
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            linear = sorted(
                {n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
            )
            moe = family_of(model).moe_block is not None and {m.split(".")[-1] for m in missing} <= MLP_NAMES
            raise UserError(
                f"lora_target_modules {missing} not found in the model; its linear layers are: {', '.join(linear)}"
                + (" (a Mixture-of-Experts model: its experts keep their weights as 3-D parameters, not linear "
                   "layers; leave the MLP names out to adapt the attention projections)" if moe else "")
            )
    return LoraConfig(
        r=lo.lora_r,
        lora_alpha=lo.lora_alpha,
        lora_dropout=lo.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
