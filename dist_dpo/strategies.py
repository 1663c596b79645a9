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
    # Where a 4/8-bit base model is placed. "local_rank": the whole quantized model on this process's LOCAL GPU
    # ({"": local_rank}); None: no device_map, the wrapper (FSDP/ZeRO-3) places shards itself.
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
    # rewritten to 0x7FFF (bitsandbytes#1945), ~0.1 % of the 4-bit weights silently change. Measured 2026-11-28 on
    # 2 x H200: FSDP2 QLoRA trained 0.0127 off the 1-GPU run and its in-run eval was 0.19 % off its own adapter
    # reloaded. Uncast, a layer holds bf16 (base) and fp32 (LoRA) tensors, so FSDP2 gathers it as raw bytes. The
    # LoRA weights then travel in fp32: a few MB.
    fsdp_4bit_gather_as_stored: bool = False
    # QLoRA adapters stay fp32 (compute is bf16 through autocast). trl casts them to bf16 for quantized models, so
    # AdamW then updates bf16 weights: steps of lr 2e-4 on weights ~0.03 are at bf16's rounding step, lost or doubled.
    # DeepSpeed keeps fp32 master weights itself (its cells were the odd ones out in the 2026-11-28 matrix: 0.0047
    # from the bf16-adapter single-GPU run, 0.0048 on ONE GPU too), and under FSDP2 bf16 adapters made every tensor of
    # a layer bf16, the case that sends packed 4-bit bytes through a float copy (see fsdp_4bit_gather_as_stored).
    qlora_adapters_fp32: bool = True
    # Whether each layer's q/k/v projections may run as one matmul over a fused copy of their frozen weights
    # (fast/fused_qkv.py). Only where every rank holds whole weights: FSDP2 / ZeRO-3 shard them after the speed path
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
    # What the GPU matrix measured against this strategy with QLoRA that a user should know before choosing it
    # (benchmarks/results/gpu_matrix.json); train warns and doctor lists it. None: nothing to add.
    qlora_caveat: str | None = None


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
        adapter_save="gathered",  # FULL_STATE_DICT gather; FSDP1 SHARDED saved empty adapters here (see README)
        runs_on_cpu=False,
        fsdp_uncast_outputs=True,
        fsdp_4bit_gather_as_stored=True,
        fuses_qkv=False,  # weights sharded after the speed path is installed
        portable_state="dtensor",
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
        portable_state="deepspeed",
    ),
}


def strategy_for(name: str) -> Strategy:
    return STRATEGY_TABLE[name]
