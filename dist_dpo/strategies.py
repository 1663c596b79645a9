"""THE table of what differs per distributed strategy. Every other module asks it; nobody branches on the
strategy name elsewhere.

Each cell carries its reason. The trackers cited are where users hit the problem the cell avoids.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    # Where the base model is placed as it loads (4/8-bit or not). "local_rank": the whole model straight onto this
    # process's LOCAL GPU ({"": local_rank}), not first into host memory (8 DDP ranks of an 8B model would hold
    # 8 x 16 GB of host RAM at once); None: no device_map, the wrapper (FSDP/ZeRO-3) places shards itself.
    quant_device_map: str | None
    # bitsandbytes storage dtype of packed 4-bit weights. FSDP/ZeRO-3 flatten and shard parameters and need one float
    # dtype across the model; uint8 storage there fails or is silently not sharded.
    bnb_4bit_quant_storage: str
    # Gradient checkpointing reentrancy. Non-reentrant works with DDP and is the PyTorch recommendation; PEFT+ZeRO-3
    # needs reentrant (trl#2514; trl forces it and warns, so we set it up front).
    checkpointing_reentrant: bool
    # Whether peft.prepare_model_for_kbit_training MAY run (modeling.py runs it only for fp16 compute). It upcasts
    # every non-quantized parameter to fp32; under FSDP/ZeRO-3 that mixes dtypes inside flat parameters (crash or
    # 2x memory), so never there.
    prepare_kbit: bool
    # DDP only: all LoRA params get gradients, so the unused-parameter search is pure overhead (and fails with
    # reentrant checkpointing).
    ddp_find_unused_parameters: bool | None
    # DDP only: no buffer broadcast from rank 0 before every forward. A decoder LM's buffers (rotary tables) are the
    # same on every rank and never change, and with the reference forward there are two broadcasts per step, each one
    # making every rank wait for the slowest before it can start. None: not DDP.
    ddp_broadcast_buffers: bool | None
    # DDP only: each gradient IS a view into its all-reduce bucket. Otherwise DDP copies every gradient into the bucket
    # and the reduced bucket back (2 x 112 small kernels per step for LoRA r8 on q/v of a 28-layer model), and a
    # 2-GPU step on short pairs is host-bound: every launch is host time the GPUs wait for. None: not DDP.
    ddp_gradient_as_bucket_view: bool | None
    # How the adapter leaves the job. "rank0": the trainer's save_model on a replicated model. "gathered": the
    # sharded params are gathered to full tensors first (ZeRO-3 needs stage3_gather_16bit_weights_on_model_save;
    # FSDP needs a FULL_STATE_DICT) - the classic source of EMPTY adapters, so train.py verifies the saved file.
    adapter_save: str
    # Whether the strategy can run without GPUs (gloo). Decides what CI can exercise on CPU.
    runs_on_cpu: bool
    # FSDP2 only: keep module outputs uncast. accelerate's default bf16 policy casts the ROOT output too, so trl's
    # fp32 per-token log-probs came back in bf16 (sums over 512 tokens in multiples of 16: the DPO loss was rounding
    # noise). output_dtype=None leaves each block in its compute dtype and the log-probs in fp32; fp32 output_dtype
    # instead would feed fp32 activations into bf16 LoRA/QLoRA blocks (dtype mismatch).
    fsdp_uncast_outputs: bool = False
    # FSDP2 + 4-bit base: no parameter cast (param_dtype None; compute stays bf16 through autocast, which accelerate
    # turns on for FSDP2). With param_dtype=bf16 every tensor of a layer is bf16 and FSDP2 copies them for the
    # all-gather with a CUDA kernel that goes through float: packed NF4 bytes that happen to read as a bf16 NaN are
    # rewritten to 0x7FFF (bitsandbytes#1945), ~0.1 % of the 4-bit weights silently change. Measured on
    # 2 GPUs: FSDP2 QLoRA trained 0.0127 off the 1-GPU run and its in-run eval was 0.19 % off its own adapter
    # reloaded. Uncast, a layer holds bf16 (base) and fp32 (LoRA) tensors, so FSDP2 gathers it as raw bytes. The
    # LoRA weights then travel in fp32: a few MB.
    fsdp_4bit_gather_as_stored: bool = False
    # QLoRA adapters stay fp32 (compute is bf16 through autocast). trl casts them to bf16 for quantized models, so
    # AdamW then updates bf16 weights: steps of lr 2e-4 on weights ~0.03 are at bf16's rounding step, lost or doubled.
    # DeepSpeed keeps fp32 master weights itself (its cells were the odd ones out in the GPU matrix: 0.0047
    # from the bf16-adapter single-GPU run, 0.0048 on ONE GPU too), and under FSDP2 bf16 adapters made every tensor of
    # a layer bf16, the case that sends packed 4-bit bytes through a float copy (see fsdp_4bit_gather_as_stored).
    qlora_adapters_fp32: bool = True
    # Whether each layer's q/k/v projections may run as one matmul over a fused copy of their frozen weights
    # (speed/fused_qkv.py). Only where every rank holds whole weights: FSDP2 / ZeRO-3 shard them after the speed path
    # is installed, so the fused copy would stay whole beside the shards.
    fuses_qkv: bool = True
    # Whether the recipe's micro-batches x accumulation may run as fewer, larger micro-batches (merge_micro_batches):
    # the Trainer reads both at train() time; a DeepSpeed engine fixes them in its config when it is built.
    merges_micro_batches: bool = True
    # How a checkpoint's portable state (dist_dpo/portable.py) reads and writes the whole adapter and its AdamW
    # moments, by parameter name. "local": every rank holds them whole (the optimizer is torch's). "dtensor": FSDP2
    # shards each parameter and its moments as DTensors (full_tensor() gathers, distribute_tensor() scatters).
    # "deepspeed": the ZeRO optimizer owns fp32 masters and moments in flat partitions; only
    # deepspeed.utils.safe_{get,set}_full_{fp32_param,optimizer_state} see them per parameter.
    portable_state: str = "local"
    # Whether the speed path's first-batch self-check (speed/self_check.py) also compares LoRA gradients. It takes them
    # with torch.autograd.grad on the unwrapped model, outside the wrapper's backward. Where weights are whole on every
    # rank that is plain autograd; FSDP2 / ZeRO-3 gather and reduce parameters in backward hooks that must run inside
    # the wrapper's own step (and ZeRO-3's reentrant checkpointing refuses autograd.grad), so there it compares the
    # log-probs of the forward only.
    self_check_gradients: bool = True
    # ZeRO-3 only: register each family's sparse MoE block (architectures.py) as a leaf module, so a rank gathers the
    # whole block's experts at once whatever its tokens route to (DeepSpeed #4966: otherwise ranks hang).
    moe_blocks_as_leaves: bool = False
    # What the GPU matrix measured against this strategy with QLoRA that a user should know before choosing it
    # (benchmarks/results/gpu_matrix.json); train warns and doctor lists it. None: nothing to add.
    qlora_caveat: str | None = None
    # The wrapper that owns the weights' placement and the optimizer state: "none" (one process), "ddp",
    # "fsdp2" (DTensor shards), "deepspeed" (its engine: flat partitions, fp32 masters beside bf16 working copies).
    engine: str = "none"
    # How a rank holds the frozen weights, for the memory plan (plan.py): "replicated"; "fsdp2": its shard plus the
    # units being gathered; "zero3": its partition plus up to stage3_max_live_parameters gathered.
    weights: str = "replicated"
    # Relative speed for adapter training on one node, for the plan's ranking: a prediction (LoRA gradients are tiny,
    # so what differs is the per-layer weight gathering of the sharded strategies). offload_relative_speed: the same
    # with ZeRO-3's CPU offload (host traffic every step); None where the strategy has no offload.
    relative_speed: float = 1.0
    offload_relative_speed: float | None = None
    # Whether `dist-dpo eval` runs under it: eval shards rows over ranks that each hold a whole, plain model.
    evaluates: bool = False


STRATEGY_TABLE: dict[str, Strategy] = {
    "single": Strategy(
        name="single",
        summary="one process, one device",
        quant_device_map="local_rank",  # GPU 0 of this process (or cpu)
        bnb_4bit_quant_storage="uint8",  # bitsandbytes default; nothing is sharded
        checkpointing_reentrant=False,  # recommended by PyTorch; no wrapper constraints
        prepare_kbit=True,  # fp32 norms/head keep fp16 QLoRA stable (the QLoRA paper's recipe); fp16 compute only
        # (modeling.uses_prepare_kbit): with bf16 it buys nothing and costs memory
        ddp_find_unused_parameters=None,  # not DDP
        ddp_broadcast_buffers=None,
        ddp_gradient_as_bucket_view=None,
        adapter_save="rank0",
        runs_on_cpu=True,
        evaluates=True,
    ),
    "ddp": Strategy(
        name="ddp",
        summary="data parallel: a full model replica per GPU",
        # {"": LOCAL rank}: with device_map="auto" or the global rank, node 2's ranks 8..15 would ask for GPU 8..15
        # that do not exist, or stack every replica on GPU 0 - the classic "QLoRA on the wrong device" report.
        quant_device_map="local_rank",
        bnb_4bit_quant_storage="uint8",  # replicas are not flattened; default storage is fine
        checkpointing_reentrant=False,  # reentrant + DDP fails on LoRA ("marked ready twice")
        prepare_kbit=True,
        ddp_find_unused_parameters=False,  # every LoRA param is used; True costs a graph walk per step
        ddp_broadcast_buffers=False,
        ddp_gradient_as_bucket_view=True,  # gradients live in the buckets: no copy in, no copy out
        adapter_save="rank0",
        runs_on_cpu=True,
        engine="ddp",
        evaluates=True,
    ),
    "fsdp": Strategy(
        name="fsdp",
        summary="FSDP2: parameters, gradients and optimizer state sharded across GPUs",
        quant_device_map=None,  # FSDP moves shards to each rank's device itself
        bnb_4bit_quant_storage="bfloat16",  # FSDP needs one float dtype to shard 4-bit weights (QLoRA+FSDP, answer.ai)
        checkpointing_reentrant=False,  # FSDP2 + reentrant recompute mismatches parameter states
        prepare_kbit=False,  # fp32 upcast would mix dtypes in FSDP units
        ddp_find_unused_parameters=None,
        ddp_broadcast_buffers=None,
        ddp_gradient_as_bucket_view=None,
        adapter_save="gathered",  # FULL_STATE_DICT gather; FSDP1 SHARDED saved empty adapters here (docs/strategies.md)
        runs_on_cpu=False,
        fsdp_uncast_outputs=True,
        fsdp_4bit_gather_as_stored=True,
        fuses_qkv=False,  # weights sharded after the speed path is installed
        self_check_gradients=False,  # gradients are reduce-scattered in FSDP2's backward hooks
        portable_state="dtensor",
        engine="fsdp2",
        weights="fsdp2",
        relative_speed=0.9,
    ),
    "zero2": Strategy(
        name="zero2",
        summary="DeepSpeed ZeRO-2: optimizer state and gradients sharded, weights replicated",
        quant_device_map="local_rank",  # weights are replicated like DDP, so each rank holds its own 4-bit copy
        bnb_4bit_quant_storage="uint8",
        checkpointing_reentrant=False,
        prepare_kbit=True,
        ddp_find_unused_parameters=None,  # DeepSpeed's engine, not torch DDP
        ddp_broadcast_buffers=None,
        ddp_gradient_as_bucket_view=None,
        adapter_save="rank0",
        runs_on_cpu=False,
        merges_micro_batches=False,  # DeepSpeed: train_micro_batch_size_per_gpu is set at engine init
        qlora_adapters_fp32=False,  # DeepSpeed's engine holds bf16 working copies and fp32 masters itself
        portable_state="deepspeed",
        engine="deepspeed",
        relative_speed=0.97,
    ),
    "zero3": Strategy(
        name="zero3",
        summary="DeepSpeed ZeRO-3: weights, gradients and optimizer state sharded (+ optional CPU offload)",
        quant_device_map=None,  # ZeRO-3 partitions parameters at load (zero.Init); a device_map fights it
        bnb_4bit_quant_storage="bfloat16",  # ZeRO-3 partitions 4-bit weights only as a float storage dtype
        checkpointing_reentrant=True,  # PEFT + ZeRO-3 needs reentrant (trl#2514); trl would force it anyway
        prepare_kbit=False,  # fp32 upcast breaks ZeRO-3's coalesced all-gather (DeepSpeed#8072)
        ddp_find_unused_parameters=None,
        ddp_broadcast_buffers=None,
        ddp_gradient_as_bucket_view=None,
        adapter_save="gathered",  # needs stage3_gather_16bit_weights_on_model_save: true (ds_configs/zero3*.json)
        runs_on_cpu=False,
        merges_micro_batches=False,  # DeepSpeed: train_micro_batch_size_per_gpu is set at engine init
        qlora_adapters_fp32=False,  # DeepSpeed's engine holds bf16 working copies and fp32 masters itself
        fuses_qkv=False,  # weights partitioned (zero.Init at load)
        self_check_gradients=False,  # partitioned gradients; reentrant checkpointing refuses autograd.grad
        moe_blocks_as_leaves=True,
        portable_state="deepspeed",
        engine="deepspeed",
        weights="zero3",
        relative_speed=0.85,
        offload_relative_speed=0.35,
    ),
}


def strategy_for(name: str) -> Strategy:
    return STRATEGY_TABLE[name]


OFFLOAD = "_offload"  # a strategy with its CPU offload on, as the plan and the launch files name it: zero3_offload


def planned_name(strategy: str, offload: bool) -> str:
    """The name the memory plan knows a run by: its strategy, with CPU offload where it is on and the plan has an
    offload variant of it (ZeRO-3; a ZeRO-2 JSON with offload is planned as ZeRO-2)."""
    return strategy + OFFLOAD if offload and STRATEGY_TABLE[strategy].offload_relative_speed is not None else strategy


def planned(name: str) -> tuple[Strategy, bool]:
    """(the strategy, whether offload is on) of a planned name; KeyError for a name the table does not have."""
    base = name[:-len(OFFLOAD)] if name.endswith(OFFLOAD) else name
    strategy = STRATEGY_TABLE[base]
    if base != name and strategy.offload_relative_speed is None:
        raise KeyError(name)
    return strategy, base != name


def planned_names() -> tuple[str, ...]:
    """Every multi-process strategy the plan compares, with the offload variants, fastest first."""
    names = [n for n, s in STRATEGY_TABLE.items() if s.engine != "none"]
    names += [n + OFFLOAD for n in names if STRATEGY_TABLE[n].offload_relative_speed is not None]
    return tuple(sorted(names, key=lambda n: -relative_speed(n)))


def relative_speed(name: str) -> float:
    strategy, offload = planned(name)
    return strategy.offload_relative_speed if offload else strategy.relative_speed


# --- What a recipe may not combine with a strategy -------------------------------------------------------------------
# Every optimizer transformers offers (OptimizerNames), by what it needs: the import it makes and where its update can
# run. family -> (python module it imports or None, pip package, optimizer names).
OPTIMIZER_FAMILIES: dict[str, tuple[str | None, str | None, tuple[str, ...]]] = {
    "torch": (None, None, ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop")),
    "adafactor": (None, None, ("adafactor",)),  # transformers' own; factors each weight matrix's second moment
    "bitsandbytes": ("bitsandbytes", "bitsandbytes", (
        "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "ademamix", "ademamix_8bit",
        "paged_ademamix_32bit", "paged_ademamix_8bit", "lion_32bit", "lion_8bit", "paged_lion_32bit",
        "paged_lion_8bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit")),
    "torchao": ("torchao", "torchao", ("adamw_torch_4bit", "adamw_torch_8bit")),
    "galore": ("galore_torch", "galore-torch", (
        "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
        "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise")),
    "apollo": ("apollo_torch", "apollo-torch", ("apollo_adamw", "apollo_adamw_layerwise")),
    "lomo": ("lomo_optim", "lomo-optim", ("lomo", "adalomo")),
    "schedule_free": ("schedulefree", "schedulefree", ("schedule_free_radam", "schedule_free_adamw",
                                                      "schedule_free_sgd")),
    "grokadamw": ("grokadamw", "grokadamw", ("grokadamw",)),
    "stable_adamw": ("optimi", "torch-optimi", ("stable_adamw",)),
    "anyprecision": ("torchdistx", "torchdistx", ("adamw_anyprecision",)),
    "xla": ("torch_xla", "torch_xla (TPU only)", ("adamw_torch_xla",)),
    "npu": ("torch_npu", "torch_npu (Ascend NPU only)", ("adamw_torch_npu_fused",)),
}

SHARDED = ("fsdp", "zero2", "zero3")  # the optimizer sees shards (FSDP2 DTensors) or flat partitions (ZeRO)
DEEPSPEED = ("zero2", "zero3")
SEVERAL = ("ddp", "fsdp", "zero2", "zero3")  # "single" is one process; FSDP2 / ZeRO stay wrappers on one GPU too


@dataclass(frozen=True)
class Rule:
    id: str
    # Facts of the recipe x strategy x machine (preflight.combination_facts), each with the values that match; the
    # rule holds when every named fact has one of its values.
    when: dict
    # "refuse": one line naming the fix, exit 2 before anything loads (the first refusing rule in table order). "apply": the fix changes no result the user
    # asked for, so it is made (`sets`: recipe key -> value, None removes a dpo_extra key) and said once.
    action: str
    says: str  # the line; {fact} fills in that fact's value
    reason: str
    sets: dict | None = None


COMBINATION_RULES: tuple[Rule, ...] = (
    Rule("bnb-optimizer-under-fsdp", {"strategy": ("fsdp",), "optim_family": ("bitsandbytes",)}, "refuse",
         "optim {optim} (bitsandbytes) cannot update FSDP2's sharded parameters: use optim adamw_torch (or "
         "adamw_torch_fused) with FSDP2, or keep {optim} with make train-ddp, train-zero2 or train-zero3",
         "bitsandbytes' update ops take plain tensors: on FSDP2's DTensors the 8-bit ones fail with 'got mixed "
         "torch.Tensor and DTensor' and the 32-bit ones with 'does not have a sharding strategy registered' (seen "
         "with bitsandbytes 0.50.2 + torch 2.13 on CPU: tests/test_combinations.py; on 1 x H200 at step 1). "
         "Another optimizer changes the training, so it is the user's choice"),
    Rule("8bit-weights-under-fsdp", {"strategy": ("fsdp",), "quant": ("8bit",)}, "refuse",
         "FSDP cannot shard 8-bit (LLM.int8) weights: use load_in_4bit (QLoRA) or a DeepSpeed/DDP config",
         "FSDP2 + QLoRA works only with the 4-bit weights in a float storage dtype (bnb_4bit_quant_storage); "
         "bitsandbytes' LLM.int8 weights have no such option"),
    Rule("low-rank-optimizer-sharded", {"strategy": SHARDED, "optim_family": ("galore", "apollo")}, "refuse",
         "optim {optim} projects each weight matrix's gradient, but {strategy} hands the optimizer shards or flat "
         "partitions: use make train-ddp (or one process), or optim adamw_torch",
         "DeepSpeed gives the optimizer one flat 1-D fp32 partition per param group (deepspeed 0.19 "
         "zero/stage_1_and_2.py: param_group['params'] = [flat partition]); FSDP2 gives row shards (DTensor). "
         "From the sources, not run"),
    Rule("adafactor-under-zero", {"strategy": DEEPSPEED, "optim_family": ("adafactor",)}, "refuse",
         "optim adafactor factors each weight matrix's second moment, but DeepSpeed hands it flat 1-D partitions, "
         "so it would run unfactored (another optimizer): use make train-ddp or train-fsdp for adafactor, or optim "
         "adamw_torch with DeepSpeed",
         "DeepSpeed's flat fp32 partitions (see low-rank-optimizer-sharded); Adafactor factors only 2-D tensors. "
         "From the sources, not run"),
    Rule("layerwise-optimizer-several-processes",
         {"strategy": SEVERAL, "world": ("several",), "optim_layerwise": (True,)}, "refuse",
         "optim {optim} (layer-wise) runs in one process only: drop _layerwise from the name, or train with NGPUS=1",
         "transformers 5.17 raises 'Layer-wise ... does not support DDP' when it builds the optimizer"),
    Rule("layerwise-optimizer-accumulation", {"optim_layerwise": (True,), "accumulates": (True,)}, "refuse",
         "optim {optim} (layer-wise) steps inside backward and cannot accumulate: set gradient_accumulation_steps 1",
         "transformers 5.17: 'Layerwise ... does not support gradient accumulation!', after the model is loaded"),
    Rule("low-rank-optimizer-targets", {"optim_family": ("galore", "apollo"), "optim_targets": (False,)}, "refuse",
         "optim {optim} needs the weights it projects: set dpo_extra: {{optim_target_modules: [attn, mlp]}}",
         "transformers 5.17 raises 'You need to define optim_target_modules' when it builds the optimizer"),
    Rule("lomo-under-deepspeed", {"strategy": DEEPSPEED, "optim_family": ("lomo",)}, "refuse",
         "optim {optim} fuses its update into backward, which DeepSpeed's engine runs itself: use make train-ddp "
         "or train-fsdp, or optim adamw_torch with DeepSpeed",
         "accelerate 1.15's backward sends a DeepSpeed run to engine.backward before its LOMO branch, so LOMO's "
         "fused_backward never runs (accelerator.py, Accelerator.backward)"),
    Rule("lomo-with-fp16", {"device": ("cuda",), "dtype": ("float16",), "optim_family": ("lomo",)}, "refuse",
         "optim {optim} cannot run under fp16's loss scaler: use dtype bfloat16 (or float32)",
         "accelerate 1.15's backward takes the grad-scaler branch before its LOMO branch (accelerator.py)"),
    Rule("bf16-without-bf16-gpu", {"device": ("cuda",), "dtype": ("bfloat16",), "bf16_supported": (False,)},
         "refuse", "dtype bfloat16 but this GPU has no bf16: use dtype float16 (or auto, which picks it)",
         "bf16 mixed precision needs Ampere or newer; accelerate refuses it after the model is loaded"),
    Rule("precision-in-dpo-extra", {"extra_precision": ("bf16", "fp16")}, "refuse",
         "dpo_extra sets {extra_precision}: set dtype instead (bfloat16 or float16); it decides the weights, the "
         "mixed precision and the FSDP2 / DeepSpeed precision together",
         "a trainer flag alone leaves the weights, the 4-bit compute dtype and FSDP2's policy in another dtype"),
    Rule("optimizer-package-missing", {"optim_installed": (False,)}, "refuse",
         "optim {optim} needs the {optim_pip} package, which is not installed: pip install {optim_pip}, or use "
         "optim adamw_torch",
         "transformers imports it only when it builds the optimizer, after the model is loaded. Last of the refusals: "
         "a user told to install a package should not then learn that the strategy cannot use it"),
    Rule("tf32-on-cpu", {"device": ("cpu",), "tf32": (True,)}, "apply",
         "tf32 is a CUDA matmul mode: dropped on CPU, where it would change nothing",
         "transformers refuses tf32 without a CUDA GPU ('--tf32 requires Ampere or a newer GPU arch')",
         sets={"dpo_extra.tf32": None}),
    Rule("deepspeed-json-bf16-vs-dtype", {"ds_precision": ("bf16",), "dtype": ("float16", "float32")}, "refuse",
         "{ds_config} fixes bf16.enabled: true but this run computes in {dtype}: set it to \"auto\" (the recipe's "
         "dtype decides) or set dtype bfloat16",
         "transformers checks the JSON against the trainer's precision only when the trainer is built, after the "
         "model is loaded ('Please correct the following DeepSpeed config values that mismatch')"),
    Rule("deepspeed-json-fp16-vs-dtype", {"ds_precision": ("fp16",), "dtype": ("bfloat16", "float32")}, "refuse",
         "{ds_config} fixes fp16.enabled: true but this run computes in {dtype}: set it to \"auto\" (the recipe's "
         "dtype decides) or set dtype float16",
         "as deepspeed-json-bf16-vs-dtype"),
    Rule("deepspeed-json-optimizer-vs-optim", {"ds_optimizer": ("set",), "optim_adamw": (False,)}, "refuse",
         "{ds_config} has its own optimizer block, which replaces optim {optim}: remove the block to train with "
         "{optim}, or set optim adamw_torch to train with the block's",
         "transformers 5.17 (integrations/deepspeed.py) builds DeepSpeed's optimizer from the block and never the "
         "recipe's: the run would silently use another optimizer"),
    Rule("deepspeed-json-optimizer-note", {"ds_optimizer": ("set",), "optim_adamw": (True,)}, "apply",
         "{ds_config}'s optimizer block (DeepSpeed's own AdamW-family optimizer) runs in place of optim {optim}",
         "the block's Adam(W) is the recipe's optimizer in DeepSpeed's implementation; its lr/betas/eps/weight "
         "decay are 'auto' in the shipped JSONs, filled from the recipe"),
    Rule("deepspeed-json-scheduler-vs-recipe", {"ds_scheduler": ("set",), "scheduler_default": (False,)},
         "refuse",
         "{ds_config} has its own scheduler block, which replaces lr_scheduler_type {lr_scheduler_type}: remove "
         "the block, or drop lr_scheduler_type from the recipe",
         "transformers 5.17 uses the block's scheduler when the JSON has one (integrations/deepspeed.py)"),
    Rule("deepspeed-json-scheduler-note", {"ds_scheduler": ("set",), "scheduler_default": (True,)}, "apply",
         "{ds_config}'s scheduler block runs in place of the default linear schedule",
         "the recipe asked for no schedule of its own"),
)
