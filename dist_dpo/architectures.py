"""THE table of what differs per model family for the speed path: the twin of strategies.py.

Each speed-path piece computes trl's DPO loss with less work, but each rests on a fact about the architecture
(an RMSNorm that is `x * rstd * w`, attention that a mask fully describes, q/k/v called on one input ...). A piece
runs on a family only where that fact holds and a test proved it (tests/test_families.py: the speed path against
trl's loss and LoRA gradients on a tiny random model of every family below; benchmarks/arch_matrix.py: the same on
a GPU in bf16, LoRA and QLoRA). A family that is not here gets no piece that depends on the architecture: trl's own
forward, and the speed-path line says so. Nothing is decided by a class-name pattern.

The pieces (dist_dpo/speed/):
  head          the log-prob head over dist-dpo's row layouts, logging-only outputs on logging steps only
                (head.py, logprob.py, loss.py); every piece below rides on it
  shared_rows   each prompt computed once: one row [prompt | chosen | rejected] per pair with a 4-D mask
                (batching.py); per layer type (full / sliding window) its own mask
  packed_rows   all pairs of a micro-batch in one unpadded row through flash attention's variable-length kernel
                (attention.py; CUDA, bf16/fp16; full-attention layers without soft-capping)
  fused_qkv     each layer's q/k/v projections as one matmul (fused_qkv.py)
  torch_norm    the family's RMSNorm as torch's one fused op (rms_norm.py), for norms that compute x * rstd * w
  lora_cast     peft's fp32 copy of every LoRA input skipped under autocast (lora_inputs.py)
  liger         liger-kernel's SwiGLU / RoPE kernels (trl's use_liger_kernel), on GPUs
"""

from __future__ import annotations

from dataclasses import dataclass, field

PIECES = ("head", "shared_rows", "packed_rows", "fused_qkv", "torch_norm", "lora_cast", "liger")
# How the README's table and `dist-dpo doctor` name them
PIECE_NAMES = {"head": "log-prob head", "shared_rows": "prompt once", "packed_rows": "packed rows",
               "fused_qkv": "fused q/k/v", "torch_norm": "fused RMSNorm", "lora_cast": "LoRA input cast",
               "liger": "liger"}

# Reasons shared by several families.
OFFSET_NORM = "its RMSNorm scales by (1 + w), not w (torch's rms_norm would multiply by w, ~0 at init)"
RECURRENT = ("its linear-attention (gated delta-net) layers carry a state along the row that no mask stops: in a "
             "shared or packed row the rejected answer would read the chosen one; trl's rows keep them apart")
NOT_PROVEN = "not proven on this family"


@dataclass(frozen=True)
class Family:
    name: str  # as users know it
    model_types: tuple[str, ...]  # transformers' config.model_type values of its causal LMs
    # piece -> why it is off for this family. Every piece of PIECES not named here is proven exact.
    off: dict[str, str] = field(default_factory=dict)
    # RMSNorm classes whose forward is x * rsqrt(mean(x^2) + eps) * w, to run as torch's rms_norm (torch_norm).
    norm_classes: tuple[str, ...] = ()
    # The sparse MoE block: under ZeRO-3 it is registered as a leaf module (deepspeed.utils.set_z3_leaf_modules),
    # else ranks that route tokens to different experts gather different parameters and hang (DeepSpeed #4966).
    moe_block: str | None = None
    # LoRA targets that stand for the recipe's default `q_proj, v_proj` where this family names them otherwise.
    attention_targets: tuple[str, ...] | None = None
    example: str = ""  # a model people train, for the README's table
    # piece -> the run-time condition under which a proven piece still stays off (said in the README's table)
    unless: dict[str, str] = field(default_factory=dict)

    def reason(self, piece: str) -> str | None:
        """Why `piece` is off for this family (None: it is proven exact)."""
        assert piece in PIECES, piece
        return self.off.get(piece)


ARCHITECTURE_TABLE: tuple[Family, ...] = (
    Family("Llama 3.x", ("llama",), norm_classes=("LlamaRMSNorm",), example="Llama-3.1-8B-Instruct"),
    Family("Mistral", ("mistral",), norm_classes=("MistralRMSNorm",), example="Mistral-7B-Instruct-v0.3",
           unless={"packed_rows": "a sliding window (v0.1)"}),
    Family("Qwen2 / Qwen2.5", ("qwen2",), norm_classes=("Qwen2RMSNorm",), example="Qwen2.5-1.5B-Instruct"),
    # q_norm / k_norm act on the projections' outputs: fusing q/k/v is unaffected; they are plain x * w norms.
    Family("Qwen3", ("qwen3",), norm_classes=("Qwen3RMSNorm",), example="Qwen3-8B"),
    Family("Qwen3-MoE", ("qwen3_moe",), norm_classes=("Qwen3MoeRMSNorm",), moe_block="Qwen3MoeSparseMoeBlock",
           unless={"shared_rows": "router aux loss on", "packed_rows": "router aux loss on"},
           # liger's Qwen3-MoE patch swaps the experts' forward, which then cannot run LoRA on expert weights.
           off={"liger": "liger's MoE expert kernel does not take LoRA on the experts"}, example="Qwen3-30B-A3B"),
    Family("Qwen3.5", ("qwen3_5_text", "qwen3_5_moe_text"), moe_block="Qwen3_5MoeSparseMoeBlock",
           off={"shared_rows": RECURRENT, "packed_rows": RECURRENT, "torch_norm": OFFSET_NORM,
                "liger": NOT_PROVEN}, example="Qwen3.5-9B"),
    Family("Qwen3-Next", ("qwen3_next",), moe_block="Qwen3NextSparseMoeBlock",
           off={"shared_rows": RECURRENT, "packed_rows": RECURRENT, "torch_norm": OFFSET_NORM,
                "liger": NOT_PROVEN}, example="Qwen3-Next-80B-A3B"),
    # Soft-capped attention logits (attn_logit_softcapping) are not in flash attention's variable-length kernel;
    # the final soft-cap is folded into the log-prob head as trl folds it.
    Family("Gemma-2", ("gemma2",),
           off={"torch_norm": OFFSET_NORM, "packed_rows": "soft-capped attention logits"}, example="gemma-2-9b-it"),
    Family("Gemma-3", ("gemma3_text",), off={"torch_norm": OFFSET_NORM}, example="gemma-3-12b-it",
           unless={"packed_rows": "sliding-window layers"}),
    # Gemma-4's norms are x * w computed in fp32 (no offset), its v_norm has no weight (left as it is).
    Family("Gemma-4", ("gemma4_text",), norm_classes=("Gemma4RMSNorm",), example="gemma-4-E4B-it",
           unless={"packed_rows": "sliding-window layers"}),
    # qkv_proj and gate_up_proj are already one matmul each.
    Family("Phi-3 / Phi-4", ("phi3",), norm_classes=("Phi3RMSNorm",), attention_targets=("qkv_proj",),
           off={"fused_qkv": "qkv_proj is already one matmul"},
           example="Phi-4-mini-instruct"),
    Family("OLMo-2", ("olmo2",), norm_classes=("Olmo2RMSNorm",), example="OLMo-2-1124-7B-Instruct"),
    Family("OLMo-3", ("olmo3",), norm_classes=("Olmo3RMSNorm",), example="Olmo-3-7B-Instruct",
           unless={"packed_rows": "sliding-window layers"}),
    # Some layers have no RoPE: positions reach only the layers that use them, in every layout alike.
    Family("SmolLM3", ("smollm3",), norm_classes=("SmolLM3RMSNorm",), example="SmolLM3-3B"),
    # Embedding, residual and attention multipliers inside the model; logits divided by logits_scaling, which the
    # log-prob head applies as trl's does. liger has no Granite patch.
    Family("Granite", ("granite",), norm_classes=("GraniteRMSNorm",), off={"liger": NOT_PROVEN},
           example="granite-3.3-8b-instruct"),
    # Half of each head rotated (partial_rotary_factor), q/k/v with biases (fused with them); GLM-4-0414 adds
    # post-attention and post-MLP norms.
    Family("GLM-4", ("glm", "glm4"), norm_classes=("GlmRMSNorm", "Glm4RMSNorm"), off={"liger": NOT_PROVEN},
           example="GLM-4-9B-0414"),
    Family("Mixtral", ("mixtral",), norm_classes=("MixtralRMSNorm",), moe_block="MixtralSparseMoeBlock",
           unless={"shared_rows": "router aux loss on", "packed_rows": "router aux loss on"},
           off={"liger": NOT_PROVEN}, example="Mixtral-8x7B-Instruct-v0.1"),
    # q_norm / k_norm over the whole projection (not per head): they act on the projections' outputs.
    Family("OLMoE", ("olmoe",), norm_classes=("OlmoeRMSNorm",), moe_block="OlmoeSparseMoeBlock",
           unless={"shared_rows": "router aux loss on", "packed_rows": "router aux loss on"},
           off={"liger": NOT_PROVEN}, example="OLMoE-1B-7B-0125-Instruct"),
    Family("ERNIE-4.5", ("ernie4_5",), norm_classes=("Ernie4_5RMSNorm",), off={"liger": NOT_PROVEN},
           example="ERNIE-4.5-0.3B-PT"),
)

_BY_TYPE = {t: f for f in ARCHITECTURE_TABLE for t in f.model_types}

UNLISTED = "model type not in dist-dpo's architecture table (dist_dpo/architectures.py)"


def family_for(model_type: str) -> Family:
    """The family of a config's model_type; an unlisted one gets every piece off, each with the same reason."""
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    return Family(f"unlisted ({model_type})", (model_type,), off={p: UNLISTED for p in PIECES})


def attention_layer_types(config) -> set[str]:
    """The kinds of attention layer a config builds: its `layer_types`, or for the configs without that list (Mistral)
    every layer sliding where a window is set and used."""
    cfg = config.get_text_config()
    types = getattr(cfg, "layer_types", None)
    if types:
        return set(types)
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return {"sliding_attention"}
    return {"full_attention"}


def summary(model_type: str) -> str:
    """One line for `dist-dpo doctor`: the family of a model type and what of the speed path it runs."""
    f = family_for(model_type)
    if model_type not in _BY_TYPE:
        return f"{f.name}: trains on trl's own path ({UNLISTED})"
    on = [PIECE_NAMES[p] + (f" (not with {f.unless[p]})" if p in f.unless else "") for p in PIECES if not f.reason(p)]
    off = [f"{PIECE_NAMES[p]} ({f.reason(p)})" for p in PIECES if f.reason(p)]
    return f"{f.name} (`{model_type}`): speed path with {', '.join(on)}" + (f"; off: {'; '.join(off)}" if off else "")


def family_of(model) -> Family:
    return family_for(model.config.get_text_config().model_type)


def markdown_table() -> str:
    """The README's supported-families table, generated from ARCHITECTURE_TABLE (python -m dist_dpo.architectures):
    yes, no (the table's reason), or what keeps a proven piece off at run time (e.g. sliding-window layers)."""
    names = PIECE_NAMES
    lines = ["| family | model_type | e.g. | " + " | ".join(names[p] for p in PIECES) + " |",
             "|---|---|---|" + "---|" * len(PIECES)]
    for f in ARCHITECTURE_TABLE:
        cells = ["no" if f.reason(p) else f"not with {f.unless[p]}" if p in f.unless else "yes" for p in PIECES]
        lines.append(f"| {f.name} | {', '.join(f'`{t}`' for t in f.model_types)} | {f.example} | " +
                     " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
