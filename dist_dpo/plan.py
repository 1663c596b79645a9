"""`dist-dpo plan`: peak GPU memory per rank BEFORE launching, and the fastest strategy that fits.

    dist-dpo plan --shape qwen2.5-1.5b --batch 16 --seq-len 512 --gpu-mem-gib 80
    dist-dpo plan --model /path/to/model --strategy all --quant 4bit --batch 4 --seq-len 1024 --gpus 2

The estimate is what `torch.cuda.max_memory_allocated()` reports (the number dist-dpo writes into
dist_dpo_run.json), built from the decoder's shapes rather than a profile, term by term:

  weights       bf16, or NF4 (0.5 byte + double-quantized scales) for the decoder's linears under QLoRA; the
                embedding and norms stay bf16, or fp32 where the strategy runs peft's prepare_model_for_kbit_training;
                sharded by the GPU count under fsdp / zero3, host-resident under zero3_offload
  adapter+opt   LoRA (or full) parameters, their gradients, AdamW moments (paged 8-bit moments live in managed memory,
                outside the allocator), the DDP gradient bucket; sharded under ZeRO / FSDP
  activations   what autograd keeps per token and decoder layer for the backward. A frozen linear keeps nothing (its
                input is only needed for a weight gradient nobody asked for), so a Qwen2 layer with LoRA on q/v keeps:
                two RMSNorm fp32 inputs (8h), q/k/v/out for sdpa (4h + 4kv; K/V repeated to h when a mask forces
                the non-flash kernel; packed rows keep each prompt's K/V twice), one LoRA input (2h),
                SiLU-gate/up/SiLU-out (6i). With checkpointing a layer keeps only its input (2h) and one layer is
                recomputed at a time.
  transient     the largest short-lived working set: one layer's MLP intermediates while the reference forward
                runs next to the stored policy activations, or the backward's gradients of them
  lm head       trl's fused chunked log-prob head: a [4096 x 32768] logits tile, a bf16 copy of a weight chunk when
                the head is fp32, the fp32 hidden-state gradient
  masks         a padded batch under sdpa: each layer converts the bool mask to a float one and keeps it for backward

Calibrated on the only GPU measurements the project has (2 x H200, trl 1.16): the issue's anchor table (1.5B shape,
512-token pairs) and the seed QLoRA DDP run (tests/test_plan.py checks all of them within 15 %). Numbers for
zero3 / fsdp / offload are the same physics with no measurement behind them yet.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from dist_dpo.errors import UserError
from dist_dpo.strategies import planned, planned_names, relative_speed

GIB = 2**30
STRATEGIES = planned_names()  # from the strategy table, fastest first (zero3_offload: ZeRO-3 with CPU offload)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# trl's fused LM head (trl/trainer/utils.py, trl/kernels/chunked_logprob.py): tokens per tile x vocabulary per tile.
HEAD_TOKENS, HEAD_VOCAB = 4096, 32768
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weight + 8-bit absmax per 64 + fp32 scale per 256 absmax
# Fitted once against the anchors (see module docstring), then left alone:
TRANSIENT_MLP = 2.0  # short-lived MLP intermediates per token, in units of (bytes x intermediate_size)
ALLOCATOR_SLACK = 1.08  # reserved / allocated seen in dist_dpo_run.json (2.061 / 1.92)
ZERO3_MAX_LIVE_PARAMS = 1e9  # ds_configs/zero3*.json: stage3_max_live_parameters (= stage3_max_reuse_distance)
CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS workspace + NCCL buffers: outside max_memory_allocated


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder linear, the ones LoRA targets and NF4 quantizes."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_dims().values())

    @property
    def layer_params(self) -> int:
        return (self.params - self.vocab * self.hidden * (1 if self.tied else 2)) // self.layers


def shape_from_config(config: dict, architecture: str = "Qwen2ForCausalLM") -> Shape:
    from dist_dpo.model_zoo import param_count

    c = config
    heads = c["num_attention_heads"]
    return Shape(hidden=c["hidden_size"], intermediate=c["intermediate_size"], layers=c["num_hidden_layers"],
                 heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                 head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                 tied=bool(c.get("tie_word_embeddings")), params=param_count({"architecture": architecture, "config": c}))


def load_shape(shape: str | None = None, model: str | None = None) -> tuple[str, Shape]:
    """(name, Shape) from a model_zoo shape name or a local model dir's config.json."""
    if shape:
        from dist_dpo.model_zoo import get_shape

        entry = get_shape(shape)
        return shape, shape_from_config(entry["config"], entry["architecture"])
    if not model:
        raise UserError("plan needs --shape NAME or --model PATH")
    p = Path(model).expanduser() / "config.json"
    if not p.is_file():
        raise UserError(f"--model {model}: no config.json there; pass a saved model dir or --shape")
    cfg = json.loads(p.read_text())
    cfg = cfg.get("text_config", cfg)
    return model, shape_from_config(cfg, (cfg.get("architectures") or ["Qwen2ForCausalLM"])[0])


@dataclass(frozen=True)
class Job:
    """One rank's share of one DPO micro-step. `rows x seq_len` is the padded batch the decoder sees: trl stacks
    chosen and rejected (rows = 2 x pairs); the shared-prompt layout runs one row per pair."""
    shape: Shape
    strategy: str = "ddp"  # single | ddp | zero2 | fsdp | zero3 | zero3_offload
    quant: str = "none"  # none | 4bit
    gpus: int = 1
    pairs: int = 4  # per-device micro-batch
    seq_len: int = 512  # padded tokens per row
    rows_per_pair: int = 2
    completion_frac: float = 0.75  # share of the tokens that are scored (only sizes the LM-head tiles)
    lora_r: int = 8  # 0: full fine-tuning
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    checkpoint_every: int = 0  # 0: no checkpointing; n: every n-th decoder layer (1 = all)
    prepare_kbit: bool = False  # peft upcasts embedding/norms to fp32 (strategy table: single, ddp, zero2)
    paged_optimizer: bool = False  # paged_adamw_8bit: moments in managed memory, not the allocator's
    masked_attention: bool = False  # padding in the batch or the shared-prompt mask: sdpa leaves flash attention
    shared_mask: bool = False  # one float mask for all layers (dist-dpo's layout) instead of a copy per layer
    # dist-dpo's packed rows (speed/attention.py): one unpadded row, no mask; seq_len is then the mean tokens per pair
    # of the micro-batch, and attention keeps keys/values for each prompt twice (prompt+chosen, prompt+rejected)
    kv_token_frac: float = 1.0  # keys/values kept per token: 1 + the prompt share under packed rows
    repeat_kv: bool | None = None  # K/V expanded to every query head; None: when attention is masked (sdpa's path)
    liger: bool = False  # liger RMSNorm / SwiGLU kernels keep bf16 inputs instead of fp32 / three tensors

    @property
    def tokens(self) -> int:
        return self.pairs * self.rows_per_pair * self.seq_len


def packed_job(job: Job, lengths, ranks: int = 1, expand_kv: bool = True, order: list[int] | None = None) -> Job:
    """`job` as dist-dpo's packed rows run it (speed/attention.py) on pairs of these (prompt, chosen, rejected)
    lengths: the micro-batch with the most tokens, unpadded, each prompt's K/V kept twice. `order`: the sampler's
    order of the pairs (speed/batching.py; micro-batches are consecutive runs of `job.pairs` in it); without it, the
    `job.pairs` longest pairs together - an upper bound: transformers' length grouping sorts within random
    megabatches, so the longest pairs rarely share a batch (on the var set 10.6 k instead of 13.3 k tokens, which
    planned the measured peak at -0.2 % instead of +21 %). `ranks` > 1: a step's pairs split by cost across that
    many ranks (balance_ranks), each holding about 1/ranks of the step's tokens. `expand_kv`: K/V per query head
    (varlen_attn without enable_gqa)."""
    step = job.pairs * ranks
    if order is not None:
        chunks = [order[i:i + step] for i in range(0, len(order), step)]
        top = [(sum(lengths[i]), lengths[i][0]) for i in max(chunks, key=lambda ch: sum(sum(lengths[i]) for i in ch))]
    else:
        top = sorted(((p + c + r, p) for p, c, r in lengths), reverse=True)[:step]
    tokens, prompts = sum(t for t, _ in top) / ranks, sum(p for _, p in top) / ranks
    scored = sum(c + r for _, c, r in lengths) / max(sum(p + c + r for p, c, r in lengths), 1)
    return replace(job, seq_len=math.ceil(tokens / job.pairs), rows_per_pair=1, completion_frac=scored,
                   masked_attention=False, shared_mask=False, kv_token_frac=1 + prompts / tokens, repeat_kv=expand_kv)


def layer_activation_bytes(job: Job) -> float:
    """Bytes autograd keeps per token in one decoder layer without checkpointing (see module docstring)."""
    s = job.shape
    h, i = s.hidden, s.intermediate
    act = 4 if job.prepare_kbit and job.quant == "4bit" else 2  # fp32 embedding -> fp32 residual stream and MLP
    norms = 2 * (act if job.liger else 4) * h
    # transformers repeats K/V when sdpa gets a mask; so does dist-dpo's packed path where torch's variable-length
    # kernel takes no enable_gqa (torch 2.11)
    repeat = job.masked_attention if job.repeat_kv is None else job.repeat_kv
    kv = s.q_dim if repeat else s.kv_dim
    attn = 2 * (2 * s.q_dim + 2 * kv * job.kv_token_frac)  # bf16 under autocast: q, k, v, out
    targets = set(ALL_TARGETS if job.lora_r == 0 else job.targets)
    lora_inputs = 2 * (h * bool(targets & {"q_proj", "k_proj", "v_proj"}) + s.q_dim * ("o_proj" in targets)
                       + h * bool(targets & {"gate_proj", "up_proj"}) + i * ("down_proj" in targets))
    mlp = (2 if job.liger else 3) * act * i
    return norms + attn + lora_inputs + mlp


def trainable_params(job: Job) -> int:
    if job.lora_r == 0:
        return job.shape.params
    dims = job.shape.linear_dims()
    return job.shape.layers * sum(job.lora_r * (dims[t][0] + dims[t][1]) for t in job.targets if t in dims)


def estimate(job: Job) -> dict[str, float]:
    """Peak allocated GiB per rank, by term."""
    s, w = job.shape, max(job.gpus, 1)
    strategy, offload = planned(job.strategy)
    sharded = strategy.weights != "replicated"
    embed = s.vocab * s.hidden * (1 if s.tied else 2)
    other = s.params - embed - s.linear_params  # norms, biases
    if job.quant == "4bit":
        kept = 4 if job.prepare_kbit else 2
        weights = s.linear_params * NF4_BYTES + (embed + other) * kept
        layer_bytes = s.layer_params * NF4_BYTES
    else:
        weights = 2.0 * s.params
        layer_bytes = 2.0 * s.layer_params
    # ZeRO-3 keeps a gathered parameter until it is not reused within stage3_max_reuse_distance, up to
    # stage3_max_live_parameters (both 1e9 in ds_configs/zero3*.json): in DPO every weight is reused (reference and
    # policy forward, backward), so up to 1e9 parameters stay gathered - all of a model below 1B (measured: ZeRO-3
    # used more than DDP on a 0.5B shape), 2 GB of a 7B one in bf16.
    live = weights * min(1.0, ZERO3_MAX_LIVE_PARAMS / s.params)
    if strategy.weights == "zero3" and offload:
        weights = max(live, 2 * layer_bytes + 2.0 * embed)  # nothing resident: gathered copies only
    elif strategy.weights == "zero3":
        weights = weights / w + max(live, 2 * layer_bytes)
    elif strategy.weights == "fsdp2":  # FSDP2: own shard + the layer gathered now and the one prefetched + the embedding and the head,
        # which FSDP2 keeps gathered between forward and backward. A tied head is ONE parameter in two units
        # (accelerate carves the embedding and [norm, head] apart): each unit gathers its own full copy. Measured on
        # 2 x H200 (0.5B shape, tied): FSDP2 peaks 0.2 GiB (~ one embedding) above the untied formula, on 1 and 2 GPUs.
        copies = 2.0 * embed - (embed if s.tied else 2.0 * embed) / w
        weights = weights / w + 2 * layer_bytes + copies

    n_train = trainable_params(job)
    full = job.lora_r == 0
    # Adapters: fp32 (peft's default; dist-dpo keeps QLoRA's fp32 too), bf16 where DeepSpeed holds bf16 working copies
    # of them (QLoRA under ZeRO, every PEFT run under ZeRO-3: trl's autocast_adapter_dtype=False there)
    deepspeed_bf16 = strategy.engine == "deepspeed" and (strategy.weights == "zero3" or job.quant == "4bit")
    pbytes = 2 if (deepspeed_bf16 or full) else 4
    grads = n_train * pbytes
    moments = 0 if job.paged_optimizer else 2 * n_train * pbytes
    if strategy.engine in ("deepspeed", "fsdp2"):  # the optimizer state is sharded
        master = 4 * n_train if pbytes == 2 and strategy.engine == "deepspeed" else 0  # ZeRO keeps fp32 masters
        opt = (grads + moments + master) / w + (0 if sharded else n_train * pbytes)
        if offload:
            opt = grads / w  # moments and master weights live on the host
    else:
        opt = n_train * pbytes + grads + moments  # params + grads + moments; DDP adds its gradient bucket
        if strategy.engine == "ddp" and w > 1:
            opt += grads

    act_bytes = 4 if job.prepare_kbit and job.quant == "4bit" else 2
    a_layer = layer_activation_bytes(job)
    ckpt = math.ceil(s.layers / job.checkpoint_every) if job.checkpoint_every else 0
    saved = job.tokens * (ckpt * act_bytes * s.hidden + (s.layers - ckpt) * a_layer)
    saved += job.tokens * 3 * act_bytes * s.hidden  # embedding output, final norm, head input
    recompute = job.tokens * a_layer if ckpt else 0
    transient = job.tokens * TRANSIENT_MLP * act_bytes * s.intermediate + recompute
    if job.masked_attention:
        rows = job.pairs * job.rows_per_pair
        mask = rows * job.seq_len ** 2 * 2
        saved += mask * (1 if job.shared_mask else s.layers)

    scored = min(job.tokens * job.completion_frac, HEAD_TOKENS)
    head = scored * HEAD_VOCAB * 2 + job.tokens * job.completion_frac * s.hidden * 4
    if job.quant == "4bit" and job.prepare_kbit:
        head += HEAD_VOCAB * s.hidden * 2  # the fp32 head's chunk cast to bf16 for the matmul
    parts = {"weights": weights, "adapter_opt": opt, "activations": saved, "transient": transient, "lm_head": head}
    out = {k: v / GIB for k, v in parts.items()}
    out["peak"] = sum(out.values())
    out["needs"] = out["peak"] * ALLOCATOR_SLACK + CUDA_CONTEXT_GIB
    return out


def checkpoint_speed(job: Job) -> float:
    """Throughput relative to no checkpointing: a DPO step costs 6N per token (policy forward + backward, reference
    forward); recomputing a checkpointed layer adds its forward (2N) again."""
    if not job.checkpoint_every:
        return 1.0
    frac = math.ceil(job.shape.layers / job.checkpoint_every) / job.shape.layers
    return 6 / (6 + 2 * frac)


CHECKPOINT_CHOICES = (0, 4, 2, 1)  # none, every 4th layer, every 2nd, all: least recompute first


def least_checkpointing(job: Job, gpu_mem_gib: float) -> Job | None:
    """The job with the least checkpointing that fits `gpu_mem_gib`, or None when even full checkpointing does not."""
    for every in CHECKPOINT_CHOICES:
        candidate = replace(job, checkpoint_every=every)
        if estimate(candidate)["needs"] <= gpu_mem_gib:
            return candidate
    return None


@dataclass
class Row:
    job: Job
    est: dict
    fits: bool
    speed: float
    notes: list[str] = field(default_factory=list)


def plan_rows(job: Job, strategies: list[str], gpu_mem_gib: float, checkpointing: str = "auto") -> list[Row]:

    rows = []
    for name in strategies:
        # modeling.py runs prepare_model_for_kbit_training (fp32 upcast) only for fp16-compute cards; plans are bf16
        base = replace(job, strategy=name, prepare_kbit=False)
        if checkpointing == "auto":
            chosen = least_checkpointing(base, gpu_mem_gib) or replace(base, checkpoint_every=1)
        else:
            chosen = replace(base, checkpoint_every={"none": 0, "all": 1}.get(checkpointing, None)
                             if checkpointing in ("none", "all") else int(checkpointing))
        est = estimate(chosen)
        fits = est["needs"] <= gpu_mem_gib
        rows.append(Row(chosen, est, fits, relative_speed(name) * checkpoint_speed(chosen)))
    return rows


def recommend(rows: list[Row]) -> Row | None:
    fitting = [r for r in rows if r.fits]
    return max(fitting, key=lambda r: r.speed) if fitting else None


def _ckpt_label(every: int) -> str:
    return "none" if every == 0 else "all" if every == 1 else f"1/{every}"


def print_table(name: str, rows: list[Row], gpu_mem_gib: float) -> Row | None:
    job = rows[0].job
    kind = "full fine-tune" if job.lora_r == 0 else f"LoRA r{job.lora_r} on {','.join(job.targets)}"
    print(f"dist-dpo plan: {name} ({job.shape.params / 1e9:.2f}B params) | {kind} | quant {job.quant} | "
          f"{job.gpus} GPU(s) x {gpu_mem_gib:g} GiB | {job.pairs} pairs x {job.rows_per_pair} rows x "
          f"{job.seq_len} tokens per micro-step")
    best = recommend(rows)
    print(f"\n{'strategy':14} {'ckpt':>5} {'weights':>8} {'adapt+opt':>9} {'activ.':>7} {'transient':>9} "
          f"{'lm head':>7} {'peak':>7} {'needs':>7} {'fits':>4} {'speed':>6}")
    for r in rows:
        e = r.est
        mark = "  <- recommended" if r is best else ""
        print(f"{r.job.strategy:14} {_ckpt_label(r.job.checkpoint_every):>5} {e['weights']:8.2f} "
              f"{e['adapter_opt']:9.2f} {e['activations']:7.2f} {e['transient']:9.2f} {e['lm_head']:7.2f} "
              f"{e['peak']:7.2f} {e['needs']:7.2f} {'yes' if r.fits else 'NO':>4} {r.speed:6.2f}{mark}")
    print("\nGiB per GPU. peak = torch.cuda.max_memory_allocated(); needs = peak x allocator slack + CUDA context. "
          "speed: relative throughput (strategy overhead x checkpoint recompute), a prediction.")
    if best is None:
        print("nothing fits: lower --batch or --seq-len, use --quant 4bit, or add GPUs with fsdp / zero3")
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dist-dpo plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", help="a model_zoo shape (dist-dpo build-model --list)")
    p.add_argument("--model", help="a local model dir (its config.json is read)")
    p.add_argument("--strategy", default="all", help=f"one of {', '.join(STRATEGIES)}, or all")
    p.add_argument("--quant", default="none", choices=("none", "4bit"))
    p.add_argument("--batch", type=int, default=4, help="preference pairs per GPU per micro-step")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (prompt + answer), padded")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="GPU memory (default: this machine's GPU, else 80)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma-separated, or all-linear")
    p.add_argument("--checkpointing", default="auto", help="auto (least that fits), none, all, or N (every N-th layer)")
    p.add_argument("--optim", default="adamw_torch", help="paged_adamw_8bit keeps the moments outside the allocator")
    p.add_argument("--liger", action="store_true", help="liger RMSNorm/SwiGLU kernels")
    p.add_argument("--padded", action="store_true", help="the batch has padding (sdpa leaves flash attention)")
    a = p.parse_args(argv)
    name, shape = load_shape(a.shape, a.model)
    strategies = list(STRATEGIES) if a.strategy == "all" else [a.strategy]
    if any(s not in STRATEGIES for s in strategies):
        raise UserError(f"--strategy {a.strategy}: choose one of {', '.join(STRATEGIES)} or all")
    if a.quant == "4bit" and a.lora_r == 0:
        raise UserError("--quant 4bit trains an adapter on top of the frozen base: --lora-r must be > 0")
    if a.checkpointing not in ("auto", "none", "all") and not a.checkpointing.isdigit():
        raise UserError(f"--checkpointing {a.checkpointing}: use auto, none, all or a layer interval N")
    mem = a.gpu_mem_gib if a.gpu_mem_gib is not None else gpu_memory_gib() or 80.0
    targets = ALL_TARGETS if a.targets == "all-linear" else tuple(t for t in a.targets.split(",") if t)
    job = Job(shape=shape, quant=a.quant, gpus=a.gpus, pairs=a.batch, seq_len=a.seq_len, lora_r=a.lora_r,
              targets=targets, paged_optimizer="paged" in a.optim, liger=a.liger, masked_attention=a.padded)
    best = print_table(name, plan_rows(job, strategies, mem, a.checkpointing), mem)
    return 0 if best is not None else 1


def cap_gpu_memory(gib: float | None, device: int) -> None:
    """`gpu_memory_gib`: this process may allocate at most `gib` on its GPU (an OOM beyond), as on a smaller card."""
    import torch

    if gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory / GIB
        # the allocator's share: the card minus what lives outside it (context, cuBLAS, NCCL), as the plan counts
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(gib - CUDA_CONTEXT_GIB, 0.5) / total), device)


def gpu_memory_gib(device: int = 0) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB
