"""Throughput and memory, side by side in one run: the tutorial's trl recipe, the fastest plain-trl flags, dist-dpo.

    python3 benchmarks/throughput.py --out $OUT          (one machine, 1-2 GPUs, ~7 minutes; table printed last)
    python3 benchmarks/throughput.py --smoke --out /tmp/t (CPU, the built-in tiny model, ~40 s: tests/test_speed.py)
    python3 benchmarks/throughput.py --list               (the rows; --only / --add select)
    python3 benchmarks/throughput.py --sync-probe 3 ...   (also: host syncs and collectives of 3 steps, by call site)

Every row trains ONE epoch over the same pairs of a synthetic set (benchmarks/preference_sets.py) on a random-weight
model of a real shape (Qwen2.5-1.5B, built on the GPU here). Plain-trl rows run benchmarks/plain_trl.py (trl + peft
only); dist-dpo rows run the real `dist-dpo train` entrypoint. Each row is its own process, so its peak memory is its
own. Two lanes (GPU 0, GPU 1) run the 1-GPU rows at once; the rows a ratio compares share a lane, i.e. a card.

Reported per row (benchmarks/README.md explains): non-pad tokens/s and pairs/s over the epoch end to end (trainer
construction - tokenization, any reference precompute - through the last step), the same tokens/s over the whole
process (Python start, imports, model load and the final save included: what a user waits for), and in steady state
(from step 3), MFU = 6 N x tokens/s / (GPUs x 790 TFLOP/s) with N = model_zoo.param_count, and the peak
torch.cuda.max_memory_allocated() of the busiest rank. Results: <out>/throughput.json (rows, ratios, card,
versions, commit, command), written after every row so a cut-off run still leaves what finished.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_env import ROOT, environment  # noqa: E402
from sync_probe import SyncProbe  # noqa: E402
PEAK_FLOPS = 790e12  # dense bf16 per H100/H200, the usual MFU convention
MULTI_GPU_RESERVE_S = 120  # a 2-GPU row: launcher + 2 processes + epoch (var6k: 94-119 s of process on 2 x H200)
GIB = 2**30


@dataclass
class Row:
    runner: str  # trl | dist-dpo
    recipe: str  # tutorial | best | best-precompute (trl); default | plain (dist-dpo)
    dataset: str  # var | fixed512 | fixed2048
    quant: str = "lora"  # lora | qlora
    gpus: int = 1
    batch: int = 16  # per-device pairs (dist-dpo rows; trl rows take their recipe's)
    accum: int = 1
    lane: int = 0
    extra: list[str] = field(default_factory=list)  # more `dist-dpo train` options (trl rows: batch=N accum=N)
    config: str = "ddp"  # accelerate_configs/<config>.yaml for multi-GPU rows
    shape: str = ""  # model_zoo shape; "" = --shape (the 1.5B of every ratio)
    profile_last: int = 0  # torch.profiler over the last N steps (left out of the steady rate): where a step goes
    env: dict = field(default_factory=dict)  # more environment for the row's processes (A/B of a kernel choice)
    status: str = "pending"
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        who = "tutorial" if self.recipe == "tutorial" else f"trl-{self.recipe}" if self.runner == "trl" else \
            "dist-dpo" if self.recipe == "default" else f"dist-dpo-{self.recipe}"
        return f"{who}/{self.dataset}/{self.quant}/{self.gpus}gpu" + (f"@{self.shape}" if self.shape else "")


SEVEN_B = "qwen2.5-7b"


def default_rows() -> list[Row]:
    """The default table in one run (predicted for H100/H200: NOTES.md). 1-GPU rows run on lanes (one GPU each,
    `lane % GPUs`): the rows of one ratio share a lane, i.e. a card. Then the multi-GPU rows, one per free pair."""
    return [
        # lane 0: the headline ratio case, 1.5B / variable-length / LoRA / 1 GPU, and what packed rows buy on it (vs
        # the masked shared rows); QLoRA vs the tutorial's QLoRA
        Row("dist-dpo", "default", "var", profile_last=3), Row("trl", "best", "var"), Row("trl", "tutorial", "var"),
        Row("dist-dpo", "masked", "var", extra=["--packed_rows", "false"]),
        Row("dist-dpo", "default", "var", "qlora"), Row("trl", "tutorial", "var", "qlora"),
        # lane 1: fixed 512-token pairs (and the masked rows there), 2048 tokens (MFU; and trl's head, which
        # computes every logits tile again in the backward: what speed/logprob.py saves), then the one-GPU baseline
        # of the scaling rows (8x the pairs: ~100 s)
        Row("dist-dpo", "default", "fixed512", lane=1), Row("trl", "best", "fixed512", lane=1),
        Row("trl", "tutorial", "fixed512", lane=1),
        Row("dist-dpo", "masked", "fixed512", lane=1, extra=["--packed_rows", "false"]),
        Row("dist-dpo", "default", "fixed2048", batch=8, accum=2, lane=1, profile_last=3),
        Row("dist-dpo", "headrecompute", "fixed2048", batch=8, accum=2, lane=1, env={"DIST_DPO_AB_HEAD_RECOMPUTE": "1"}),
        Row("dist-dpo", "default", "var6k", lane=1),
        # multi-GPU: DDP and ZeRO-2 scaling on var6k; 7B QLoRA at 1024 tokens within a 12 GiB card
        Row("dist-dpo", "default", "var6k", gpus=2, profile_last=3),
        Row("dist-dpo", "zero2", "var6k", gpus=2, config="zero2"),

        Row("dist-dpo", "12gib", "fixed1024", "qlora", gpus=2, batch=4, accum=4, shape=SEVEN_B,
            extra=["--gpu_memory_gib", "12"]),
    ]


FAMILY_SHAPES = ("llama-3-8b", "qwen3-8b")  # the families beside Qwen2.5 whose var ratio to the best trl flags counts


def optional_rows() -> list[Row]:
    """Selected with --add NAME-substring: more of the matrix when a run has time for it."""
    return [
        # other families on the var set, each against the best plain-trl flags on the same card (--add @)
        # trl's 16 x 1 without checkpointing (its best at 1.5B) ran out of 80 GiB at 8B on the var set: 4 x 4
        *[r for shape in FAMILY_SHAPES for r in (Row("dist-dpo", "default", "var", shape=shape, lane=1),
                                                 Row("trl", "best", "var", shape=shape, lane=1,
                                                     extra=["batch=4", "accum=4"]))],
        # the tutorial's 3 epochs: reference log-probs kept from the first epoch, and the same run computing them
        # every step (ratio "ref_logps_cache 3 epochs var", with the largest loss difference)
        Row("dist-dpo", "3epochs", "var", lane=1, extra=["--num_train_epochs", "3"]),
        Row("dist-dpo", "3epochs-nocache", "var", lane=1, extra=["--num_train_epochs", "3", "--ref_logps_cache", "false"]),
        # what the speed path's first-batch self-check costs end to end: the default row without it
        *[Row("dist-dpo", "nocheck", "var", shape=shape, lane=1, extra=["--speed_self_check", "false"])
          for shape in FAMILY_SHAPES],
        Row("trl", "best-precompute", "var"),  # reference precomputed: loses end to end (weight hash + a first pass)
        # the tutorial's 4 x 4 through dist-dpo, run as 16 x 1 (merge_micro_batches): measured at f5e5495 at the
        # speed of the 16 x 1 row (10,496 vs 9,816 tok/s, one card's noise)
        Row("dist-dpo", "tutorial-batch", "var", batch=4, accum=4, lane=1),
        Row("trl", "best", "fixed2048", lane=1, extra=["batch=4", "accum=4"]),
        # var steps are host-bound (profile at 03acec9): liger's triton launches cost ~220 us of host time each
        Row("dist-dpo", "noliger", "var", extra=["--liger_kernels", "false"]),
        Row("dist-dpo", "share", "fixed512", lane=1, extra=["--prefix_sharing", "true"]),
        # what prefix sharing buys (measured at f5e5495: x1.52 end to end, x1.56 steady, 49.8 -> 28.3 GiB)
        Row("dist-dpo", "noshare", "var", extra=["--prefix_sharing", "false"]),
        # the cost-balanced rank split, off by default since it measured slower (steady scaling 0.79 vs 0.97)
        Row("dist-dpo", "balance", "var6k", gpus=2, extra=["--balance_ranks", "true"]),
        # each rank pinned to its own cores (cpu_affinity: true) vs left to the scheduler (the default since it measured slower,
        # at 7a66d67: pinned 0.718 vs unpinned 0.802 DDP scaling on the 2 x H200 VM)
        Row("dist-dpo", "pinned", "var6k", gpus=2, extra=["--cpu_affinity", "true"]),
        # the largest shapes on 2 x 80 GiB: QLoRA at 1024 tokens, one pair per micro-step. 32B
        # (65 GB of bf16 weights to build: fits the 2-GPU machine's disk); 72B under FSDP (145 GB: the 4-GPU
        # machine's 235 GB disk; build-model streams it block by block). Plan (dist-dpo plan): 32B DDP 42.5 GiB,
        # 72B FSDP 59.1 GiB per GPU with the context.
        Row("dist-dpo", "80gib", "fixed1024", "qlora", gpus=2, batch=1, accum=8, shape="qwen2.5-32b",
            extra=["--gpu_memory_gib", "80"]),
        Row("dist-dpo", "80gib-fsdp", "fixed1024", "qlora", gpus=2, batch=1, accum=8, shape="qwen2.5-72b",
            config="fsdp", extra=["--gpu_memory_gib", "80"]),
        # DDP copying every gradient into its all-reduce bucket and back (the default keeps them in the buckets)
        Row("dist-dpo", "gradcopy", "var6k", gpus=2, env={"DIST_DPO_AB_DDP_GRAD_COPY": "1"}),
        Row("dist-dpo", "default", "var", gpus=2, profile_last=3),  # the 768-pair epoch: start-up is ~40 % of a 2-GPU run
        Row("dist-dpo", "noliger", "fixed2048", batch=8, accum=2, lane=1, extra=["--liger_kernels", "false"]),
        # K/V heads expanded per query head, what torch 2.11's varlen_attn needed before attention._FlashGQA
        # (measured at 872fcbc: grouped x1.094 steady, 50.7 -> 46.4 GiB)
        Row("dist-dpo", "expandkv", "fixed2048", batch=8, accum=2, lane=1, env={"DIST_DPO_AB_VARLEN_GQA": "expand"}),
        Row("dist-dpo", "headrecompute", "var", env={"DIST_DPO_AB_HEAD_RECOMPUTE": "1"}),
        # liger's Triton RMSNorm instead of torch's fused rms_norm (torch's is the default: +9 % e2e on var6k at
        # 210a9a4, steady +12.5 %); and without liger at all on var6k
        Row("dist-dpo", "lignorm", "var", env={"DIST_DPO_AB_RMSNORM": "liger"}),
        Row("dist-dpo", "lignorm", "var6k", lane=1, env={"DIST_DPO_AB_RMSNORM": "liger"}),
        Row("dist-dpo", "lignorm", "fixed2048", batch=8, accum=2, lane=1, env={"DIST_DPO_AB_RMSNORM": "liger"}),
        Row("dist-dpo", "noliger", "var6k", lane=1, extra=["--liger_kernels", "false"]),
        # q/k/v as three matmuls (one fused matmul is the default: var6k +7 % end to end)
        Row("dist-dpo", "separateqkv", "var", env={"DIST_DPO_AB_FUSED_QKV": "0"}),
        Row("dist-dpo", "separateqkv", "var6k", lane=1, env={"DIST_DPO_AB_FUSED_QKV": "0"}),
        Row("dist-dpo", "separateqkv", "fixed2048", batch=8, accum=2, lane=1, env={"DIST_DPO_AB_FUSED_QKV": "0"}),
        Row("dist-dpo", "separateqkv", "var6k", gpus=2, env={"DIST_DPO_AB_FUSED_QKV": "0"}),
        Row("dist-dpo", "4x4", "fixed2048", batch=4, accum=4, lane=1),
        # decoder layers through torch.compile (speed/compiled.py): fewer launches and less Python per step on the
        # host-bound short rows, against its compile time; and the same without liger (the compiler fuses SwiGLU
        # and RoPE itself)
        Row("dist-dpo", "compiled", "var", env={"DIST_DPO_AB_COMPILE": "layers"}),
        Row("dist-dpo", "compiled-noliger", "var", env={"DIST_DPO_AB_COMPILE": "layers"},
            extra=["--liger_kernels", "false"]),
        Row("dist-dpo", "compiled", "fixed2048", batch=8, accum=2, lane=1, env={"DIST_DPO_AB_COMPILE": "layers"}),
        # the 1-GPU row with the intra-op threads the launcher gives each rank of a 2-GPU row (1; a plain process
        # leaves OMP_NUM_THREADS unset and torch picks): a 1-GPU var6k row's steps were slower than each 2-GPU rank's
        Row("dist-dpo", "omp1", "var6k", lane=1, env={"OMP_NUM_THREADS": "1"}),
        # peft's fp32 copy of every LoRA input kept (what speed/lora_inputs.py removes)
        Row("dist-dpo", "lorafp32", "fixed2048", batch=8, accum=2, lane=1, env={"DIST_DPO_AB_LORA_INPUT_CAST": "1"}),
        Row("dist-dpo", "lorafp32", "var", env={"DIST_DPO_AB_LORA_INPUT_CAST": "1"}),
        Row("dist-dpo", "expseg", "fixed2048", batch=8, accum=2, lane=1,
            env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
        Row("dist-dpo", "default", "var", "qlora", gpus=2),
        Row("trl", "best", "var", gpus=2),
        # dist-dpo's plain path (fast_path false) at the tutorial's 4 x 4 + checkpointing: measured at 8dcd628 at
        # 2,066 tok/s vs the tutorial's 2,057 through trl (it adds nothing); 106 s of epoch, so optional now
        Row("dist-dpo", "plain", "var", batch=4, accum=4, lane=1,
            extra=["--fast_path", "false", "--gradient_checkpointing", "true"]),
    ]


# ---------------------------------------------------------------- child: one row, instrumented


class _TokenCounter:
    """Wraps trl's collator: counts the non-pad tokens of trl's layout that each step trains on."""

    def __init__(self, base):
        self.base, self.tokens, self.tokens_sq = base, 0, 0  # tokens_sq: the rows' squared lengths (attention)

    def __call__(self, examples):
        from dist_dpo.speed import self_check

        batch = self.base(examples)
        if not self_check.running():  # the self-check's few pairs are not trained on (its time counts, end to end)
            self.tokens += int(batch["attention_mask"].sum())
            self.tokens_sq += int((batch["attention_mask"].sum(dim=1).long() ** 2).sum())
        return batch

    def __getattr__(self, name):
        return getattr(self.base, name)


def _instrument(spec: dict) -> None:
    """Time every DPOTrainer the same way, whoever builds it: from construction (tokenization, any reference
    precompute) to the end of the last step; peak memory from construction on (the weights are already there)."""
    import torch
    import trl
    from transformers import TrainerCallback

    original = trl.DPOTrainer.__init__
    marks: dict = {}
    collections: list = []  # (start, generation, seconds) of every garbage collection in this process

    def on_gc(phase, info):
        if phase == "start":
            marks["gc_start"] = time.perf_counter()
        else:
            collections.append((marks["gc_start"], info["generation"], time.perf_counter() - marks["gc_start"]))

    gc.callbacks.append(on_gc)

    class Timer(TrainerCallback):
        def __init__(self, trainer, counter):
            self.trainer, self.counter, self.steps = trainer, counter, []
            self.within, self.between = [], []  # per step, host clock: inside the step, before it

        def on_train_begin(self, args, state, control, **kw):
            marks["train"] = time.perf_counter()
            marks["ckpt_layers"] = sum(1 for m in self.trainer.model.modules() if type(m).__name__.endswith(
                "DecoderLayer") and getattr(m, "gradient_checkpointing", False) is True)

        def on_step_begin(self, args, state, control, **kw):
            marks["step_begin"] = time.perf_counter()
            if self.steps:  # the host's time between steps: logging, the next batch's fetch and collation
                self.between.append(marks["step_begin"] - marks["init"] - self.steps[-1][0])
            n, probe = spec.get("profile_last", 0), spec.get("sync_probe", 0)
            # the probe's window ends where the step after its N steps begins: the logging and the batch fetching
            # between steps (outside on_step_begin..on_step_end) are in it
            if "probe_from" in marks and len(self.steps) - marks["probe_from"] == probe:
                self.stop_probe()
            if n and "profiler" not in marks and state.global_step == state.max_steps - n:
                marks["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                       torch.profiler.ProfilerActivity.CUDA],
                                                           record_shapes=True)
                marks["profile_from"] = len(self.steps)
                marks["profiler"].__enter__()
                marks["profile_t0"] = time.perf_counter()
            # the probe's N steps come just before the profiled ones; steps 1-2 stay warm-up
            if probe and "probe" not in marks and state.global_step == max(2, state.max_steps - n - probe):
                marks["probe"], marks["probe_from"] = SyncProbe(), len(self.steps)
                marks["probe"].start()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append((time.perf_counter() - marks["init"], self.counter.tokens))
            self.within.append(time.perf_counter() - marks["step_begin"])  # the step itself (host view)
            if "profiler" in marks and "profile" not in marks and state.global_step >= state.max_steps:
                # before the end-of-training checkpoint that follows this callback: its copies and syncs are not
                # a step's (in profiles they were all the DDP rank-0 item() calls and the rank-1 barrier)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks["profile"] = _profile_summary(marks, time.perf_counter(), len(self.steps))

        def stop_probe(self):
            probe = marks.get("probe")
            if probe is not None and "sync_probe" not in marks:
                probe.steps = len(self.steps) - marks["probe_from"]  # the last one's logging included
                marks["sync_probe"] = probe.stop()

        def on_train_end(self, args, state, control, **kw):
            self.stop_probe()  # an epoch that ended inside the probe's window
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.synchronize()
            end = time.perf_counter()
            profile = marks.get("profile")
            if profile is None and "profiler" in marks:
                profile = _profile_summary(marks, end, len(self.steps))
            # the steady rate stops where the first of probe and profile began (both slow a step down)
            cut = min((marks[k] for k in ("probe_from", "profile_from") if k in marks), default=None)
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            collator = self.trainer.data_collator
            out = {
                "rank": rank, "init_s": marks["train"] - marks["init"], "train_s": end - marks["train"],
                "wall_s": end - marks["init"], "steps": self.steps, "tokens": self.counter.tokens,
                "tokens_sq": self.counter.tokens_sq,
                "pairs": len(self.trainer.train_dataset) if rank == 0 else 0,
                "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB if cuda else 0.0,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else 0.0,
                # what the card needs: the allocator's peak plus everything outside it (CUDA context, cuBLAS, NCCL)
                "peak_device_gib": (torch.cuda.max_memory_reserved() + torch.cuda.mem_get_info()[1]
                                    - torch.cuda.mem_get_info()[0] - torch.cuda.memory_reserved()) / GIB
                if cuda else 0.0,
                "speed_path": getattr(getattr(self.trainer, "speed", None), "report", None),  # trl's rows: None
                "self_check": getattr(getattr(self.trainer, "speed", None), "self_check_verdict", None),
                "losses": [h["loss"] for h in state.log_history if "loss" in h],
                "gradient_checkpointing": bool(self.trainer.args.gradient_checkpointing),
                "micro_batch": self.trainer.args.per_device_train_batch_size,  # after merge_micro_batches
                "ckpt_layers": marks.get("ckpt_layers"), "liger": bool(self.trainer.args.use_liger_kernel),
                "profile": profile, "profiled_from": cut, "sync_probe": marks.get("sync_probe"),
                "host": _host_view(_steady_part(self.within[:cut]), _steady_part(self.between[:cut])),
                "varlen_gqa": _native_gqa(),
                # a full collection stalls this rank for ~0.3 s at a time of its own (none inside training so far)
                "gc_in_training": _gc_view([c for c in collections if c[0] >= marks["train"]]),
                "layout": {"tokens_run": getattr(collator, "tokens_run", None),
                           "tokens_real": getattr(collator, "tokens_real", None),
                           "batches": getattr(collator, "batches", None)},
            }
            Path(f"{spec['result']}.rank{rank}").write_text(json.dumps(out))

    def timed_init(self, *args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        marks["init"] = time.perf_counter()
        original(self, *args, **kwargs)
        counter = _TokenCounter(self.data_collator)
        self.data_collator = counter
        self.add_callback(Timer(self, counter))

    trl.DPOTrainer.__init__ = timed_init


def _gc_view(collections: list) -> dict:
    """Per generation: how many collections, their total and longest milliseconds."""
    out = {}
    for gen in (0, 1, 2):
        ms = [c[2] * 1000 for c in collections if c[1] == gen]
        out[f"gen{gen}"] = {"n": len(ms), "total_ms": round(sum(ms), 1), "max_ms": round(max(ms, default=0.0), 1)}
    return out


def _steady_part(values: list[float]) -> list[float]:
    """Per-step values without the warm-up steps (the first two; the first alone in a short epoch)."""
    return values[2:] if len(values) > 3 else values[1:] or values


def _host_view(within: list[float], between: list[float]) -> dict:
    """Where this rank's host spends a steady step (a slow rank of a multi-GPU row shows here), and where the process
    runs: its CPUs and their NUMA node against the GPU's (a rank far from its GPU pays more per kernel launch)."""
    import statistics

    import torch

    out = {"in_step_median_s": round(statistics.median(within), 4) if within else None,
           "between_steps_median_s": round(statistics.median(between), 4) if between else None}
    try:
        import psutil

        proc = psutil.Process()
        switches, times = proc.num_ctx_switches(), proc.cpu_times()
        # a rank that other work keeps off its CPU shows involuntary switches; its threads' CPU seconds say how
        # busy it was (the whole process life: imports, tokenization, steps)
        out.update(involuntary_switches=switches.involuntary, voluntary_switches=switches.voluntary,
                   cpu_user_s=round(times.user, 1), cpu_system_s=round(times.system, 1), threads=proc.num_threads())
        cpu = proc.cpu_num()
        out.update(cpus_allowed=len(os.sched_getaffinity(0)), cpu=cpu,
                   cpu_numa_node=next((int(p.name[4:]) for p in Path(f"/sys/devices/system/cpu/cpu{cpu}").glob(
                       "node[0-9]*")), None))
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            out["gpu_numa_node"] = int(Path(f"/sys/bus/pci/devices/{bus}/numa_node").read_text())
    except Exception as e:  # noqa: BLE001 - a diagnostic must never cost a measured row
        out["where_error"] = repr(e)[:120]
    return out


def _startup(spec: dict) -> dict | None:
    """dist-dpo rows: where rank 0's start-up went (dist_dpo_run.json, dist_dpo/run_stats.py)."""
    marker = Path(spec["output_dir"]) / "dist_dpo_run.json"
    try:
        return json.loads(marker.read_text()).get("startup_s")
    except (OSError, ValueError):
        return None


def _native_gqa() -> bool:
    from dist_dpo.speed.attention import native_gqa

    return native_gqa()


def _profile_summary(marks: dict, end: float, steps: int) -> dict:
    """Where the profiled steps' wall time went: kernel time on the GPU (compute vs NCCL), the top kernels and the
    top host-side ops. GPU kernel time well under the wall time means the GPU waited (on the host or a peer)."""
    prof = marks["profiler"]
    prof.__exit__(None, None, None)
    events = prof.key_averages()

    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    from torch.autograd import DeviceType

    # kernels only: an op's own device time is its kernels' again
    kernels = [e for e in events if device_us(e) > 0 and getattr(e, "device_type", None) != DeviceType.CPU]
    nccl = sum(device_us(e) for e in kernels if "nccl" in e.key.lower())
    compute = sum(device_us(e) for e in kernels) - nccl
    top = sorted(kernels, key=device_us, reverse=True)[:12]
    host = sorted(events, key=lambda e: e.cpu_time_total, reverse=True)[:12]
    # ops (not kernels: those have no input shapes) by their inputs' shapes
    by_shape = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.input_shapes and device_us(e) > 0),
                      key=device_us, reverse=True)[:15]
    wall = end - marks["profile_t0"]
    return {"steps": steps - marks["profile_from"], "wall_s": round(wall, 4),
            "gpu_compute_s": round(compute / 1e6, 4), "gpu_nccl_s": round(nccl / 1e6, 4),
            "gpu_compute_busy": round(compute / 1e6 / wall, 3) if wall > 0 else None,
            "top_kernels_ms": [[e.key[:90], round(device_us(e) / 1e3, 2), e.count] for e in top],
            "top_host_ops_ms": [[e.key[:90], round(e.cpu_time_total / 1e3, 2), e.count] for e in host],
            "top_device_ops_by_shape": [[e.key[:60], str(e.input_shapes)[:160], round(device_us(e) / 1e3, 2), e.count]
                                        for e in by_shape]}


def run_child(spec: dict) -> int:
    _instrument(spec)
    if spec["runner"] == "trl":
        import plain_trl

        overrides = {}
        for kv in spec["extra"]:  # batch=4 accum=4
            k, v = kv.split("=")
            overrides[{"batch": "per_device_train_batch_size", "accum": "gradient_accumulation_steps"}[k]] = int(v)
        plain_trl.run(spec["model"], spec["data"], spec["system_prompt"], spec["recipe"], spec["quant"] == "qlora",
                      spec["max_length"], spec["output_dir"], overrides)
        return 0
    from dist_dpo.cli import main

    argv = ["train", "--model_name_or_path", spec["model"], "--dataset_name", spec["data"],
            "--system_prompt", spec["system_prompt"], "--max_length", str(spec["max_length"]),
            "--per_device_train_batch_size", str(spec["batch"]), "--gradient_accumulation_steps", str(spec["accum"]),
            "--learning_rate", "1e-5", "--beta", "0.1", "--lora_r", "8", "--lora_alpha", "32", "--lora_dropout", "0.1",
            "--lora_target_modules", "q_proj,v_proj", "--num_train_epochs", "1", "--eval_steps", "0",
            "--save_steps", "1000000", "--logging_steps", "10", "--report_to", "none", "--resume", "never",
            "--output_dir", spec["output_dir"], "--seed", "42"]
    if spec["quant"] == "qlora":
        argv += ["--load_in_4bit", "--optim", "paged_adamw_8bit"]
    argv += spec["extra"]
    return main(argv)


# ---------------------------------------------------------------- parent: schedule, collect, report


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.start = time.time()
        self.deadline = self.start + args.budget_s
        self.lock = threading.Lock()
        self.rows: list[Row] = []
        self.port = iter(range(29700, 29999, 3))
        self.varlen_gqa = _native_gqa()  # for the memory plan of packed rows (merge: the recorded torch's)
        self._lengths: dict = {}

    def setup(self) -> None:
        import torch

        sys.path.insert(0, str(ROOT))
        import preference_sets
        from dist_dpo import model_zoo

        self.gpus = torch.cuda.device_count()
        self.data = {}
        for name in sorted({r.dataset for r in self.rows} | {"fixed512"}):  # fixed512: the warm-up's
            pairs = self.args.pairs.get(name) if self.args.pairs else None
            cap = None
            if self.args.smoke:  # CPU: a few short pairs (the tiny model runs ~1.5k tokens/s on 2 cores)
                pairs, cap = pairs or 24, 24
            self.data[name] = preference_sets.write_set(name, self.work / "data", pairs, cap=cap)
        self.max_length = {n: preference_sets.SETS[n][1] for n in self.data}
        self.system_prompt = preference_sets.system_prompt()
        self.models: dict[str, str] = {}
        self.params: dict[str, int] = {}
        self.builds: dict[str, subprocess.Popen] = {}
        if self.args.smoke:
            self.shape = "tiny-qwen2"
            self.models[self.shape] = str(model_zoo.ensure_builtin_model(self.work / "cache"))
            self.params[self.shape] = model_zoo.param_count(self.shape)
            return
        self.shape = self.args.shape
        for shape in sorted({self.shape_of(r) for r in self.rows}, key=lambda s: s != self.shape):
            self.models[shape] = str(self.work / f"model-{shape}")
            self.params[shape] = model_zoo.param_count(shape)
            # In a child process: this one never opens a CUDA context, so the lanes' GPUs stay whole. Every shape is
            # built before any row starts: a build beside a timed row (the run at 8dcd628 did that) can slow it.
            proc = subprocess.Popen([sys.executable, "-m", "dist_dpo", "build-model", "--shape", shape, "--out",
                                     self.models[shape], "--device", "cuda", "--dtype", "bfloat16", "--seed", "0"],
                                    cwd=ROOT, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0",
                                             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])),
                                    stdout=subprocess.DEVNULL)
            self.builds[shape] = proc
            self.wait_built(shape)

    def shape_of(self, row: Row) -> str:
        return row.shape or self.shape

    def wait_built(self, shape: str) -> bool:
        proc = self.builds.pop(shape, None)
        if proc is not None:
            t = time.time()
            if proc.wait() != 0:
                print(f"[{self.elapsed():5.0f}s] building {shape} failed (exit {proc.returncode})", flush=True)
                self.models.pop(shape, None)
                return False
            print(f"[{self.elapsed():5.0f}s] {shape} built (waited {time.time() - t:.0f} s)", flush=True)
        return shape in self.models

    def elapsed(self) -> float:
        return time.time() - self.start

    def spec(self, row: Row) -> dict:
        rd = self.work / "runs" / row.name.replace("/", "_")
        rd.mkdir(parents=True, exist_ok=True)
        for f in rd.glob("result.json.rank*"):
            f.unlink()
        return {"runner": row.runner, "recipe": row.recipe,
                "quant": row.quant, "model": self.models[self.shape_of(row)], "data": str(self.data[row.dataset]),
                "system_prompt": self.system_prompt, "max_length": self.max_length[row.dataset],
                "batch": row.batch, "accum": row.accum, "extra": row.extra, "output_dir": str(rd / "out"),
                "profile_last": row.profile_last, "sync_probe": getattr(self.args, "sync_probe", 0),
                "result": str(rd / "result.json"), "log": str(rd / "log.txt")}

    def launch(self, row: Row, gpu_ids: list[int], reserve_s: float = 0.0) -> None:
        if not self.wait_built(self.shape_of(row)):
            row.status, row.result = "failed", {"reason": f"building the {self.shape_of(row)} model failed"}
            with self.lock:
                self.write()
            return
        if self.deadline - reserve_s - time.time() < 20:  # not worth starting: leave the time to what follows
            row.status, row.result = "skipped", {"reason": f"time budget (--budget-s {self.args.budget_s:g})"}
            with self.lock:
                self.write()
            print(f"[{self.elapsed():5.0f}s] {row.name}: skipped (time budget)", flush=True)
            return
        spec = self.spec(row)
        cmd, env = self.command(row, spec, gpu_ids)
        timeout = max(5.0, self.deadline - time.time())
        row.status = "running"
        t = time.time()
        with open(spec["log"], "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        status, result = self.collect(row, spec, rc, time.time() - t)
        with self.lock:  # both at once: another lane's write() must not see "ok" without its numbers
            row.status, row.result = status, result
            self.write()
        r = row.result
        print(f"[{self.elapsed():5.0f}s] {row.name}: {row.status}"
              + (f" {r['tokens_per_s']:.0f} tok/s, {r['peak_mem_gib']:.2f} GiB" if row.status == "ok" else
                 f" ({r.get('reason', '')})"), flush=True)

    def warm_up(self, lanes: int) -> None:
        """Two untimed steps of dist-dpo per GPU first: triton compiles liger's kernels for this shape once per
        machine (~5 s, cached on disk after), and without this the first row of each lane - dist-dpo's - paid it."""
        def one(i):
            row = Row("dist-dpo", f"warm-up-gpu{i}", "fixed512", extra=["--max_steps", "2"])  # own output dir
            cmd, env = self.command(row, self.spec(row), [i])
            t = time.time()
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT).returncode
            print(f"[{self.elapsed():5.0f}s] warm-up on GPU {i}: exit {rc} ({time.time() - t:.0f} s, untimed)",
                  flush=True)

        with cf.ThreadPoolExecutor(lanes) as pool:
            list(pool.map(one, range(lanes)))

    def command(self, row: Row, spec: dict, gpu_ids: list[int]) -> tuple[list[str], dict]:
        env = dict(os.environ, **row.env,
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
                   PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   DIST_DPO_CACHE=str(self.work / "cache"))
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
        else:
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // row.gpus)))
        me = [str(HERE / "throughput.py"), "--child", json.dumps(spec)]
        if row.gpus > 1:
            config = f"accelerate_configs/{row.config if self.gpus else 'cpu'}.yaml"
            cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", config,
                   "--num_processes", str(row.gpus), "--main_process_port", str(next(self.port)), *me]
        else:
            cmd = [sys.executable, *me]
        return cmd, env

    def collect(self, row: Row, spec: dict, rc: int, process_s: float) -> tuple[str, dict]:
        """(status, numbers) of a finished row."""
        ranks = [json.loads(p.read_text()) for p in sorted(Path(spec["result"]).parent.glob("result.json.rank*"))]
        if rc != 0 or not ranks:
            tail = Path(spec["log"]).read_text(errors="replace").splitlines()[-12:] if Path(spec["log"]).is_file() \
                else []
            reason = next((ln.strip()[:200] for ln in reversed(tail) if "Error" in ln or "error" in ln), "see log")
            return "timeout" if rc == 124 else "failed", {"rc": rc, "reason": reason, "log_tail": tail}
        r0 = next(r for r in ranks if r["rank"] == 0)
        tokens = sum(r["tokens"] for r in ranks)
        # the epoch ends with its last optimizer step: the end-of-training checkpoint dist-dpo writes (plain trl's
        # rows write none) and the profiler's own summary come after it (`train_end_wall_s` keeps them)
        wall = r0["steps"][-1][0] if r0["steps"] else r0["wall_s"]
        # profiled and probed steps run slower (their own cost): the steady rate stops where the first began
        steady = _steady([r["steps"][:r["profiled_from"]] if r.get("profiled_from") else r["steps"] for r in ranks])
        flops = 6 * self.params[self.shape_of(row)]
        palm = palm_terms(self.shape_of(row))
        tokens_sq = sum(r.get("tokens_sq", 0) for r in ranks)
        # PaLM-style: the non-embedding parameters per token plus attention per squared row length (palm_terms)
        palm_per_token = palm[0] + palm[1] * tokens_sq / tokens if palm and tokens else None
        return "ok", {
            "tokens": tokens, "pairs": r0["pairs"], "init_s": round(r0["init_s"], 2),
            "train_s": round(r0["train_s"], 2), "process_s": round(process_s, 1),
            "process_tokens_per_s": tokens / process_s,  # start to exit: imports, load, save included
            "train_end_wall_s": round(r0["wall_s"], 2), **_epoch(tokens, r0["pairs"], wall, flops, row.gpus),
            "steady_tokens_per_s": steady, "steady_mfu": flops * steady / (PEAK_FLOPS * row.gpus) if steady else None,
            "mfu_palm": palm_per_token * tokens / wall / (PEAK_FLOPS * row.gpus) if palm_per_token else None,
            "steady_mfu_palm": palm_per_token * steady / (PEAK_FLOPS * row.gpus) if palm_per_token and steady
            else None,
            "peak_mem_gib": max(r["peak_alloc_gib"] for r in ranks),
            "peak_reserved_gib": max(r["peak_reserved_gib"] for r in ranks),
            "peak_device_gib": max(r.get("peak_device_gib", 0.0) for r in ranks),
            "gradient_checkpointing": r0["gradient_checkpointing"], "ckpt_layers": r0["ckpt_layers"],
            "micro_batch": r0.get("micro_batch"), "varlen_gqa": r0.get("varlen_gqa"),
            "liger": r0["liger"], "speed_path": r0["speed_path"], "layout": r0["layout"], "steps": len(r0["steps"]),
            "self_check": r0.get("self_check"), "losses": r0.get("losses"),
            # per rank: seconds from trainer construction to the end of each step (a slow rank shows here)
            "step_end_s_per_rank": {r["rank"]: [round(t, 3) for t, _ in r["steps"]] for r in ranks},
            "profile_per_rank": {r["rank"]: r["profile"] for r in ranks if r.get("profile")} or None,
            "sync_probe_per_rank": {r["rank"]: r["sync_probe"] for r in ranks if r.get("sync_probe")} or None,
            "host_per_rank": {r["rank"]: r.get("host") for r in ranks},
            "gc_per_rank": {r["rank"]: r.get("gc_in_training") for r in ranks},
            "startup_s": _startup(spec),
            "planned_peak_gib": self.planned_peak(row, r0),
            # steady_mfu counts trl's tokens (prompts twice); this one counts the tokens the decoder really ran
            "steady_mfu_of_tokens_run": _of_tokens_run(ranks, flops * steady / (PEAK_FLOPS * row.gpus))
            if steady else None,
        }

    def planned_peak(self, row: Row, r0: dict) -> float | None:
        """dist-dpo plan's prediction for this row, to check the plan against the measured peak (target 15 %)."""
        from dist_dpo import plan

        try:
            p, c, r = zip(*self.lengths(row.dataset))
            _, shape = plan.load_shape(self.shape_of(row))
            batch = {"tutorial": 4}.get(row.recipe, 16) if row.runner == "trl" else row.batch
            for kv in row.extra:
                if kv.startswith("batch="):
                    batch = int(kv.split("=")[1])
            batch = r0.get("micro_batch") or batch  # what ran (dist-dpo may merge accumulated micro-batches)
            layers = r0["ckpt_layers"] or 0
            every = 0 if not layers else max(1, round(shape.layers / layers))
            batches = r0["layout"].get("batches") or {}
            strategy = row.config if row.gpus > 1 else "single"
            if batches.get("packed"):  # one row per micro-batch, no padding, no mask (attention.py)
                split = "by cost" in str((r0.get("speed_path") or {}).get("batches"))
                from dist_dpo.speed import batching

                lengths = list(zip(p, c, r))  # the trainer's grouped order (its seed: 42, run_child)
                order = None if split else list(batching.length_grouped_sampler(
                    [sum(x) for x in lengths], row.batch * row.accum, 42))
                job = plan.packed_job(
                    plan.Job(shape, strategy, "4bit" if row.quant == "qlora" else "none", gpus=row.gpus, pairs=batch,
                             checkpoint_every=every, prepare_kbit=False, paged_optimizer=row.quant == "qlora",
                             liger=r0["liger"]),
                    lengths, ranks=row.gpus if split else 1, expand_kv=not r0.get("varlen_gqa", self.varlen_gqa),
                    order=order)
                return round(plan.estimate(job)["peak"], 3)
            shared = bool(batches.get("shared"))
            widths = [a + b + d for a, b, d in zip(p, c, r)] if shared else [a + max(b, d) for a, b, d in zip(p, c, r)]
            width = max(widths)
            job = plan.Job(shape, strategy, "4bit" if row.quant == "qlora" else "none",
                           gpus=row.gpus, pairs=batch, seq_len=-(-width // 16) * 16 if shared else width,
                           rows_per_pair=1 if shared else 2, completion_frac=(sum(c) + sum(r)) / (
                               sum(widths) * (1 if shared else 2)), checkpoint_every=every,
                           prepare_kbit=False,  # bf16 cards: modeling.uses_prepare_kbit is False (fp16 only)
                           paged_optimizer=row.quant == "qlora", liger=r0["liger"],
                           masked_attention=shared or len(set(widths)) > 1, shared_mask=shared)
            return round(plan.estimate(job)["peak"], 3)
        except Exception as e:  # a prediction must never cost a measured row
            print(f"plan for {row.name} failed: {e!r}", flush=True)
            return None

    def lengths(self, dataset: str) -> list[tuple[int, int, int]]:
        if dataset not in self._lengths:
            import preference_sets

            cap = self.max_length[dataset]
            rows = [preference_sets.token_lengths(x) for x in preference_sets.read_rows(self.data[dataset])]
            self._lengths[dataset] = [(p, min(c, cap - p), min(r, cap - p)) for p, c, r in rows]
        return self._lengths[dataset]

    def write(self) -> None:
        rows = []
        for r in self.rows:
            res = dict(r.result)
            rows.append({"name": r.name, "model": self.shape_of(r), "seq_len": self.max_length.get(r.dataset),
                         "dataset": r.dataset, "quant": r.quant, "gpus": r.gpus, "runner": r.runner,
                         "recipe": r.recipe, "batch": r.batch if r.runner == "dist-dpo" else None,
                         "accum": r.accum if r.runner == "dist-dpo" else None, "status": r.status,
                         "tokens_per_s": res.pop("tokens_per_s", None), "pairs_per_s": res.pop("pairs_per_s", None),
                         "epoch_wall_s": res.pop("epoch_wall_s", None), "mfu": res.pop("mfu", None),
                         "peak_mem_gib": res.pop("peak_mem_gib", None), **res})
        doc = {"what": "DPO throughput and memory: tutorial trl recipe vs best plain-trl flags vs dist-dpo "
                       "(benchmarks/throughput.py)",
               "command": "python3 benchmarks/throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
               **self.env, "shape": self.shape, "params": self.params.get(self.shape), "params_per_shape": self.params,
               "peak_flops_per_gpu": PEAK_FLOPS,
               "mfu_formula": "6 * params * non-pad tokens/s / (gpus * 790e12)",
               "wall_s": round(self.elapsed(), 1), "rows": rows, "ratios": ratios(rows),
               "plan_vs_measured_peak": plan_check(rows)}
        doc["targets"] = targets(doc)
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "throughput.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.rename(self.out / "throughput.json")

    def write_logs(self, lines: int = 60) -> None:
        """The end of every row's log in one file next to the JSON (one file to read instead of one per row)."""
        parts = []
        for r in self.rows:
            log = self.work / "runs" / r.name.replace("/", "_") / "log.txt"
            if log.is_file():
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"===== {r.name} ({r.status})\n" + "\n".join(tail))
        (self.out / "throughput_logs.txt").write_text("\n\n".join(parts) + "\n")

    def run(self) -> int:
        env = environment(self.args.commit)
        self.env = {**env, "commit": env["git_commit"]}  # the table prints doc['commit']
        self.setup()
        single = [r for r in self.rows if r.gpus == 1]
        lanes = max(1, min(self.gpus, 1 + max((r.lane for r in single), default=0))) if self.gpus else 1
        multi = [r for r in self.rows if r.gpus > 1]
        if self.gpus and self.gpus < 2:
            for r in multi:
                r.status, r.result = "skipped", {"reason": "needs 2 GPUs"}
            multi = []
        by_lane = [[r for r in single if r.lane % lanes == i] for i in range(lanes)]
        if self.gpus and not self.args.no_warm_up:
            self.warm_up(max(lanes, min(self.gpus, 2) if multi else lanes))
        groups = [list(range(i * 2, i * 2 + 2)) for i in range(max(1, self.gpus // 2))] if self.gpus else [[0, 1]]
        with cf.ThreadPoolExecutor(lanes) as pool:
            # the multi-GPU rows come last, len(groups) at a time, and need this much
            reserve = MULTI_GPU_RESERVE_S * -(-len(multi) // len(groups))
            list(pool.map(lambda i: [self.launch(r, [i], reserve) for r in by_lane[i]], range(lanes)))
        queue = list(multi)
        with cf.ThreadPoolExecutor(len(groups)) as pool:  # each pair of GPUs takes the next multi-GPU row

            def worker(gpu_ids):
                while True:
                    with self.lock:
                        if not queue:
                            return
                        row = queue.pop(0)
                    self.launch(row, gpu_ids)

            list(pool.map(worker, groups))
        self.write()
        self.write_logs()
        doc = json.loads((self.out / "throughput.json").read_text())
        print_table(doc)
        print_hosts(doc)
        print_syncs(doc)
        return 0 if all(r.status == "ok" for r in self.rows) else 1


def palm_terms(shape: str) -> tuple[float, float] | None:
    """Model FLOPs as PaLM counts them (Chowdhery et al. 2022, appendix B), for LoRA DPO: (FLOPs per token, FLOPs per
    squared row length). Per token 6 x the non-embedding parameters (policy forward 2, its backward 2 - the frozen
    weights take no gradient -, reference forward 2; the embedding and LM head left out, so a big vocabulary does not
    flatter the figure). Attention: 4 x L x H x Q FLOPs per query-key pair per layer (QK^T and AV), T^2 / 2 causal
    pairs per row of T tokens, 4 passes (policy forward, its backward at twice the forward, reference forward):
    8 x L x H x Q per squared row length. None for a shape where a token runs only part of the parameters (MoE) or
    where layers are not all attention."""
    from dist_dpo import model_zoo

    c = model_zoo.get_shape(shape)["config"]
    mixers = set(c.get("layer_types") or []) - {"full_attention", "sliding_attention"}
    if c.get("num_experts") or c.get("num_local_experts") or mixers:
        return None
    h, heads = c["hidden_size"], c["num_attention_heads"]
    embed = c["vocab_size"] * h * (1 if c.get("tie_word_embeddings") else 2)
    dense = 6 * (model_zoo.param_count(shape) - embed)
    return float(dense), float(8 * c["num_hidden_layers"] * heads * (c.get("head_dim") or h // heads))


def _epoch(tokens: int, pairs: int, wall: float, flops_per_token: float, gpus: int) -> dict:
    """The end-to-end numbers of one epoch of `wall` seconds (trainer construction to the last optimizer step)."""
    return {"epoch_wall_s": round(wall, 2), "tokens_per_s": tokens / wall, "pairs_per_s": pairs / wall,
            "mfu": flops_per_token * tokens / wall / (PEAK_FLOPS * gpus)}


def _of_tokens_run(ranks: list[dict], mfu: float) -> float | None:
    run = [r["layout"].get("tokens_run") for r in ranks]
    real = [r["layout"].get("tokens_real") for r in ranks]
    if not all(run) or not all(real):
        return None  # plain trl rows: no layout counters (every token they count, they ran, plus padding)
    return mfu * sum(run) / sum(real)


def _steady(per_rank_steps: list[list]) -> float | None:
    """Tokens/s from the end of step 2 to the end (all ranks' tokens, rank 0's clock)."""
    steps = per_rank_steps[0]
    if len(steps) < 4:
        return None
    t0, t1 = steps[1][0], steps[-1][0]
    tokens = sum(s[-1][1] - s[1][1] for s in per_rank_steps if len(s) == len(steps))
    return tokens / (t1 - t0) if t1 > t0 else None


class _Rate(float):
    """A row's rate that remembers its run (`call`): merged files hold rows of several runs (machines), and a ratio
    across two of them measures the machines (the same var6k row ran at 23.9 k tok/s at 7a66d67 and 16.8 k at e8656e9,
    on two machines of the same kind)."""

    def __new__(cls, value, call):
        rate = super().__new__(cls, value)
        rate.call = call
        return rate


# A/B recipe (a row without one piece of the speed path) -> the piece its ratio to the default row measures
PIECES = {"noshare": "prefix_sharing", "masked": "packed_rows", "expandkv": "grouped_kv_heads",
          "headrecompute": "head_grad_in_forward", "noliger": "liger", "lorafp32": "lora_inputs",
          "lignorm": "torch_rms_norm", "separateqkv": "fused_qkv", "4x4": "8x2_over_4x4",
          "omp1": "torch_threads_over_one", "expseg": "default_allocator_over_expandable",
          # below 1: the compiled layers win (not the default until they do)
          "compiled": "eager_over_compiled_layers", "compiled-noliger": "eager_over_compiled_layers_without_liger",
          # earlier rows: the same two switches the other way round, before they became the default
          "torchnorm": "liger_rms_norm_over_torch", "fusedqkv": "separate_over_fused_qkv"}


def ratios(rows: list[dict]) -> dict:
    ok = {r["name"]: r for r in rows if r["status"] == "ok"}

    def tps(name, key="tokens_per_s"):
        v = ok[name].get(key) if name in ok else None
        return None if v is None else _Rate(v, ok[name].get("call"))

    def ratio(a, b):
        if not a or not b or getattr(a, "call", None) != getattr(b, "call", None):
            return None
        return round(a / b, 3)

    out = {}
    for ds in ("var", "fixed512", "fixed2048"):
        ours = tps(f"dist-dpo/{ds}/lora/1gpu")
        best = max([v for v in (tps(f"trl-best/{ds}/lora/1gpu"), tps(f"trl-best-precompute/{ds}/lora/1gpu")) if v],
                   default=None)
        case = {"vs_tutorial": ratio(ours, tps(f"tutorial/{ds}/lora/1gpu")), "vs_best_trl": ratio(ours, best)}
        whole = [tps(f"{runner}/{ds}/lora/1gpu", "process_tokens_per_s") for runner in ("dist-dpo", "trl-best")]
        case["vs_best_trl whole process"] = ratio(*whole)
        if any(case.values()):
            out[f"{ds}/lora/1gpu"] = case
    if "var/lora/1gpu" in out:  # the headline case: 1.5B / variable-length / LoRA / 1 GPU
        out.update(out["var/lora/1gpu"])
    for shape in FAMILY_SHAPES:
        r = ratio(tps(f"dist-dpo/var/lora/1gpu@{shape}"), tps(f"trl-best/var/lora/1gpu@{shape}"))
        if r:
            out[f"vs_best_trl var @{shape}"] = r
    for shape in ("", *(f"@{s}" for s in FAMILY_SHAPES)):  # the self-check's cost, in steady steps of the run
        a, b = ok.get(f"dist-dpo/var/lora/1gpu{shape}"), ok.get(f"dist-dpo-nocheck/var/lora/1gpu{shape}")
        if a and b and a.get("call") == b.get("call"):
            ends = sorted((a.get("step_end_s_per_rank") or {}).items())[0][1]
            step = statistics.median(y - x for x, y in zip(ends[2:], ends[3:])) if len(ends) > 4 else None
            cost = a["epoch_wall_s"] - b["epoch_wall_s"]
            out[f"self_check var{shape}"] = {
                "epoch_s_with": a["epoch_wall_s"], "epoch_s_without": b["epoch_wall_s"], "cost_s": round(cost, 2),
                "steady_step_s": round(step, 3) if step else None,
                "cost_in_steps": round(cost / step, 2) if step else None,
                "check": {k: v for k, v in (a.get("self_check") or {}).items() if k != "bounds"}}
    cached, plain = ok.get("dist-dpo-3epochs/var/lora/1gpu"), ok.get("dist-dpo-3epochs-nocache/var/lora/1gpu")
    r = ratio(tps("dist-dpo-3epochs/var/lora/1gpu"), tps("dist-dpo-3epochs-nocache/var/lora/1gpu"))
    if r:
        a, b = cached.get("losses") or [], plain.get("losses") or []
        out["ref_logps_cache 3 epochs var"] = {
            "ratio": r, "max_loss_diff": max((abs(x - y) for x, y in zip(a, b)), default=None) if len(a) == len(b)
            else None}
    q = ratio(tps("dist-dpo/var/qlora/1gpu"), tps("tutorial/var/qlora/1gpu"))
    if q:
        out["qlora_vs_tutorial_qlora"] = q
    pieces = {}  # what one piece of the speed path buys: default row / the row without it, same lane (card)
    for r in ok.values():
        piece, ds = PIECES.get(r["recipe"]), r["dataset"]
        if r["runner"] != "dist-dpo" or piece is None or r["name"] != f"dist-dpo-{r['recipe']}/{ds}/lora/1gpu":
            continue
        for key, suffix in (("tokens_per_s", ""), ("steady_tokens_per_s", "_steady")):
            rate = ratio(tps(f"dist-dpo/{ds}/lora/1gpu", key), tps(r["name"], key))
            if rate:
                pieces[f"{piece} {ds}{suffix}"] = rate
    if pieces:
        out["pieces"] = pieces
    for row, label in (("dist-dpo/var6k/lora/2gpu", "ddp_scaling_2gpu"),
                       ("dist-dpo-zero2/var6k/lora/2gpu", "zero2_scaling_2gpu"),
                       ("dist-dpo-balance/var6k/lora/2gpu", "ddp_scaling_2gpu_balance_ranks"),
                       ("dist-dpo-unpinned/var6k/lora/2gpu", "ddp_scaling_2gpu_unpinned"),
                       ("dist-dpo-pinned/var6k/lora/2gpu", "ddp_scaling_2gpu_pinned"),
                       ("dist-dpo-gradcopy/var6k/lora/2gpu", "ddp_scaling_2gpu_grad_copies"),
                       ("dist-dpo-fusedqkv/var6k/lora/2gpu", "ddp_scaling_2gpu_fused_qkv"),
                       ("dist-dpo-separateqkv/var6k/lora/2gpu", "ddp_scaling_2gpu_separate_qkv"),
                       ("dist-dpo/var/lora/2gpu", "ddp_scaling_2gpu_768_pairs")):
        one_row = "dist-dpo/var/lora/1gpu" if "/var/" in row else "dist-dpo/var6k/lora/1gpu"
        code_ab = next((ab for ab in ("fusedqkv", "separateqkv") if ab in row), None)
        if code_ab:  # a code A/B scales against its own 1-GPU row (machine A/Bs against the default's)
            one_row = f"dist-dpo-{code_ab}/var6k/lora/1gpu"
        for key, suffix in (("tokens_per_s", ""), ("steady_tokens_per_s", "_steady")):
            r = ratio(tps(row, key), tps(one_row, key))
            if r:
                out[label + suffix] = round(r / 2, 3)
    return out


TARGETS = (  # the speed targets: (name, measured value from the doc, target, higher is better)
    ("vs_best_trl var", lambda d: d["ratios"].get("vs_best_trl"), 1.5, True),
    ("vs_best_trl fixed512", lambda d: d["ratios"].get("fixed512/lora/1gpu", {}).get("vs_best_trl"), 1.2, True),
    ("vs_tutorial var", lambda d: d["ratios"].get("vs_tutorial"), 4.0, True),
    ("qlora_vs_tutorial_qlora", lambda d: d["ratios"].get("qlora_vs_tutorial_qlora"), 2.0, True),
    ("steady MFU fixed2048", lambda d: _row(d, "dist-dpo/fixed2048/lora/1gpu", "steady_mfu"), 0.60, True),
    ("ddp_scaling_2gpu", lambda d: d["ratios"].get("ddp_scaling_2gpu"), 0.90, True),
    ("zero2_scaling_2gpu", lambda d: d["ratios"].get("zero2_scaling_2gpu"), 0.90, True),
    ("7B QLoRA 1024 peak GiB/GPU", lambda d: _row(d, f"dist-dpo-12gib/fixed1024/qlora/2gpu@{SEVEN_B}",
                                                  "peak_device_gib"), 12.0, False),
    ("3 epochs var, cache vs none", lambda d: (d["ratios"].get("ref_logps_cache 3 epochs var") or {}).get("ratio"),
     1.25, True),
    ("self-check cost, steps @8B", lambda d: (d["ratios"].get("self_check var@llama-3-8b") or {}).get("cost_in_steps"),
     1.0, False),
)


def _row(doc: dict, name: str, key: str):
    return next((r.get(key) for r in doc["rows"] if r["name"] == name and r["status"] == "ok"), None)


def targets(doc: dict) -> list[dict]:
    out = []
    for name, get, target, higher in TARGETS:
        v = get(doc)
        out.append({"target": name, "measured": None if v is None else round(v, 3), "goal": target,
                    "met": None if v is None else (v >= target if higher else v <= target)})
    return out


def plan_check(rows: list[dict]) -> list[dict]:
    return [{"name": r["name"], "measured_gib": round(r["peak_mem_gib"], 3), "planned_gib": r["planned_peak_gib"],
             "error": round(r["planned_peak_gib"] / r["peak_mem_gib"] - 1, 3)}
            for r in rows if r["status"] == "ok" and r.get("planned_peak_gib") and r.get("peak_mem_gib")]


def print_table(doc: dict) -> None:
    sizes = ", ".join(f"{k} {v / 1e9:.2f}B" for k, v in (doc.get("params_per_shape") or {}).items())
    print(f"\n{sizes} on {', '.join(doc['cards'])} | commit {doc['commit']}")
    print(f"{'row':36} {'status':7} {'tok/s':>8} {'steady':>8} {'pairs/s':>8} {'epoch s':>8} {'MFU':>6} "
          f"{'PaLM':>6} {'peak GiB':>8} {'plan':>6} {'ckpt':>4}")  # PaLM: mfu_palm; ckpt: layers checkpointed
    def fmt(v, f):
        return (f % v) if isinstance(v, (int, float)) else "-"

    for r in doc["rows"]:
        print(f"{r['name']:36} {r['status']:7} {fmt(r['tokens_per_s'], '%8.0f')} "
              f"{fmt(r.get('steady_tokens_per_s'), '%8.0f')} {fmt(r['pairs_per_s'], '%8.2f')} "
              f"{fmt(r['epoch_wall_s'], '%8.1f')} {fmt(r['mfu'] * 100 if r['mfu'] is not None else None, '%5.1f%%')} "
              f"{fmt(r['mfu_palm'] * 100 if r.get('mfu_palm') is not None else None, '%5.1f%%')} "
              f"{fmt(r['peak_mem_gib'], '%8.2f')} "
              f"{fmt(r.get('planned_peak_gib'), '%6.2f')} "
              f"{r.get('ckpt_layers') if r['status'] == 'ok' else '-':>4}"
              + (f"  {r.get('reason', '')[:80]}" if r["status"] not in ("ok", "pending") else ""))
    print("ratios (tokens/s, same card):", json.dumps(doc["ratios"]))
    for t in doc.get("targets", []):
        print(f"target {t['target']:28} measured {t['measured']!s:>8} goal {t['goal']:>6} met {t['met']}")


def print_hosts(doc: dict) -> None:
    """Each rank of the multi-GPU rows: host time inside a steady step and between steps, CPU vs GPU NUMA node."""
    for r in doc["rows"]:
        if (r.get("gpus", 1) > 1 or r.get("dataset") == "var6k") and r["status"] == "ok":
            for rank, h in (r.get("host_per_rank") or {}).items():
                h = h or {}
                print(f"host {r['name']} rank {rank}: step {h.get('in_step_median_s')} s, between "
                      f"{h.get('between_steps_median_s')} s, cpu node {h.get('cpu_numa_node')} / gpu node "
                      f"{h.get('gpu_numa_node')}, {h.get('cpus_allowed')} cpus, involuntary switches "
                      f"{h.get('involuntary_switches')}, cpu {h.get('cpu_user_s')} + {h.get('cpu_system_s')} s")


def print_syncs(doc: dict) -> None:
    """The sync probe's findings (--sync-probe): host syncs per step and where, the Python-level collectives."""
    for r in doc["rows"]:
        for rank, p in (r.get("sync_probe_per_rank") or {}).items():
            print(f"\nsyncs {r['name']} rank {rank}: {p['syncs_per_step']} per step over {p['steps']} steps")
            for n, site in p["sync_sites"][:6]:
                print(f"  sync {n:5} {site}"[:200])
            for n, name, site in p["collectives"][:4]:
                print(f"  coll {n:5} {name} {site}"[:200])


def _params_of(docs: list[dict], shape: str) -> int:
    return next(d["params_per_shape"][shape] for d in reversed(docs) if shape in d.get("params_per_shape", {}))


def merge(paths: list[str], out: Path, work: Path, assume_gqa: bool = False) -> int:
    """Several runs' throughput.json (a later run re-ran rows for a same-run comparison, or ran rows an earlier
    one had no time for) -> one file: a row from a later run replaces the earlier one; each row's `call` names its run.
    Planned peaks are recomputed with the current memory plan (the measured numbers are untouched)."""
    import preference_sets

    docs = [json.loads(Path(p).read_text()) for p in paths]
    rows: dict[str, dict] = {}
    for i, d in enumerate(docs, 1):
        for r in d["rows"]:
            if r["status"] == "ok" or r["name"] not in rows:
                rows[r["name"]] = {**r, "call": i}
    bench = Bench(argparse.Namespace(out=str(out), work=str(work), budget_s=0, smoke=False, pairs={}, shape=docs[0]["shape"],
                                     commit=None))
    bench.shape = docs[0]["shape"]
    # packed rows' K/V for rows that did not record it (varlen_gqa): grouped from torch 2.13 on, expanded on 2.11
    # before attention._FlashGQA (82e01e2 and later ran them grouped: --assume-varlen-gqa)
    bench.varlen_gqa = assume_gqa or tuple(int(x) for x in docs[-1]["versions"]["torch"].split(".")[:2]) >= (2, 13)
    bench.data = {r["dataset"]: preference_sets.write_set(r["dataset"], work / "data") for r in rows.values()}
    bench.max_length = {n: preference_sets.SETS[n][1] for n in bench.data}
    known = {r.name: r for r in default_rows() + optional_rows()}
    for r in rows.values():
        ends = (r.get("step_end_s_per_rank") or {}).get("0") or (r.get("step_end_s_per_rank") or {}).get(0)
        if r["status"] == "ok" and ends and "train_end_wall_s" not in r:  # a run from before the epoch ended at its
            # last step (f811b95 and earlier measured to on_train_end): the same epoch, from its recorded step ends
            r["train_end_wall_s"] = r["epoch_wall_s"]
            flops = 6 * _params_of(docs, r["model"])
            r.update(_epoch(r["tokens"], r["pairs"], ends[-1], flops, r["gpus"]))
        if r["status"] == "ok" and r["name"] in known:
            r["planned_peak_gib_at_run"] = r.get("planned_peak_gib")
            r["planned_peak_gib"] = bench.planned_peak(known[r["name"]], r)
    doc = dict(docs[-1])
    doc["rows"] = list(rows.values())
    doc["calls"] = [{k: d.get(k) for k in ("command", "commit", "cards", "date", "wall_s")} for d in docs]
    doc["command"] = " ; ".join(d["command"] for d in docs)
    doc["ratios"] = ratios(doc["rows"])
    doc["plan_vs_measured_peak"] = plan_check(doc["rows"])
    doc["targets"] = targets(doc)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(doc, indent=1, default=str))
    print_table(doc)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="where throughput.json goes")
    p.add_argument("--work", default="/tmp/dist_dpo_throughput", help="scratch: model, data, runs, logs")
    p.add_argument("--shape", default="qwen2.5-1.5b", help="model_zoo shape (dist-dpo build-model --list)")
    p.add_argument("--smoke", action="store_true", help="CPU: built-in tiny model, small sets, 3 rows")
    p.add_argument("--only", default="", help="comma-separated substrings: run only matching rows")
    p.add_argument("--add", default="", help="comma-separated substrings of optional rows to add (--list)")
    p.add_argument("--pairs", default="", help="pairs per set, e.g. var=512,fixed512=256")
    p.add_argument("--lane", default="", help="1-GPU rows matching a substring on another lane (GPU), e.g. "
                   "fixed2048=0: rows of one ratio must stay on one lane")
    p.add_argument("--budget-s", type=float, default=450,
                   help="seconds for the whole run (rows are cut at the end; rows that cannot start are skipped)")
    p.add_argument("--commit", default=None, help="git commit to record (default: $GIT_COMMIT or git rev-parse)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--no-warm-up", action="store_true", help="skip the untimed kernel-compiling steps per GPU")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over the last 3 steps of the rows marked for it (left out of the steady rate)")
    p.add_argument("--sync-probe", type=int, default=0, metavar="N",
                   help="count host-GPU syncs and Python-level collectives (with call sites) over N steps just "
                        "before the profiled ones, every row (left out of the steady rate; benchmarks/sync_probe.py)")
    p.add_argument("--merge", nargs="+", help="merge several runs' throughput.json into --out (later runs win)")
    p.add_argument("--assume-varlen-gqa", action="store_true",
                   help="--merge: rows without a varlen_gqa record ran grouped K/V heads (planned so)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.sync_probe < 0:
        p.error(f"--sync-probe {a.sync_probe}: give a number of steps (0: no probe)")
    if a.child:
        return run_child(json.loads(a.child))
    if a.merge:
        return merge(a.merge, Path(a.out), Path(a.work), a.assume_varlen_gqa)
    a.pairs = {k: int(v) for k, v in (kv.split("=") for kv in a.pairs.split(",") if kv)}
    rows = default_rows()
    if a.smoke:
        rows = [Row("dist-dpo", "default", "var", batch=8, profile_last=1), Row("trl", "best", "var"),
                Row("trl", "tutorial", "var")]
    if a.add:
        rows += [r for r in optional_rows() if any(k in r.name for k in a.add.split(","))]
    if a.only:
        rows = [r for r in rows if any(k in r.name for k in a.only.split(","))]
    for spec in filter(None, a.lane.split(",")):
        key, _, lane = spec.partition("=")
        if not lane.isdigit():
            p.error(f"--lane {spec}: give SUBSTRING=LANE, e.g. fixed2048=0")
        moved = [r for r in rows if key in r.name and r.gpus == 1]
        if not moved:
            p.error(f"--lane {spec}: no selected 1-GPU row matches '{key}'")
        for r in moved:
            r.lane = int(lane)
    if a.list:
        for r in default_rows() + optional_rows():
            print(f"{r.name:40} lane {r.lane} {' '.join(r.extra)}")
        return 0
    if not a.profile:
        for r in rows:
            r.profile_last = 0
    bench = Bench(a)
    bench.rows = rows
    return bench.run()


if __name__ == "__main__":
    raise SystemExit(main())
