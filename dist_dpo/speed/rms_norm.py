"""The decoder's RMSNorm as one torch op instead of liger's Triton kernel: the default; the A/B switch
DIST_DPO_AB_RMSNORM=liger is the benchmark's row with liger's.

What it buys on short pairs (the `lignorm` rows of benchmarks/throughput.py, benchmarks/README.md): +9 % end to
end on the var6k set, one GPU, with a shorter host step.

Why: the var steps are host-bound (the GPU computes 20-60 % of a step), so what a kernel costs to LAUNCH counts.
In a profile of a 1.5B step each liger RMSNorm call took ~200 us of host time (Triton's
Python launcher and liger's wrapper), an aten matmul 65-90 us, and a 1.5B step makes 171 RMSNorm calls (57 per
forward: policy, reference, backward). `torch.nn.functional.rms_norm` is one aten op, on CUDA a fused kernel
(`_fused_rms_norm`, torch >= 2.9) whose backward skips the gradient of the frozen weight; liger's backward always
computes that gradient and sums it in a second kernel. Numerics: x * rstd * w computed in fp32 and rounded once;
HF's Qwen2/Llama RMSNorm (and liger's "llama" mode) rounds x * rstd to the input dtype before multiplying by w - a
difference of one rounding step of bf16.

Liger keeps SwiGLU and RoPE; benchmarks/throughput.py's `lignorm` rows measure liger's RMSNorm next to the default.
"""

from __future__ import annotations

import types

import torch

from dist_dpo import ab_switches
from dist_dpo.speed import switch


def off_reason(family) -> str | None:
    """Why this family's norms stay as they are (None: they run as torch's rms_norm on the speed path)."""
    return family.reason("torch_norm") or (None if family.norm_classes else "no RMSNorm class of this family is proven")


def planned(t, family) -> bool:
    """Whether the speed path will run this family's norms as torch's rms_norm (`t`: the recipe's train section);
    dpo_args.py then leaves liger's RMSNorm out."""
    return bool(t.fast_path and family.reason("head") is None and off_reason(family) is None
                and ab_switches.value("RMSNORM") == "torch")


def install(model, norm_classes: tuple[str, ...]) -> int:
    """Every module of `model` whose class is one of `norm_classes` (the architecture table's: norms proven to compute
    x * rsqrt(mean(x^2) + eps) * w) and whose weight and epsilon we can read runs through F.rms_norm; returns how
    many. A module whose weight is kept in another dtype than its input (QLoRA's fp32 norms under fp16) falls back
    to its own forward, call by call. Installing twice changes nothing."""
    n = 0
    for m in model.modules():
        if "_dist_dpo_eps" in m.__dict__:  # installed already
            n += 1
            continue
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
        weight = getattr(m, "weight", None)
        if type(m).__name__ in norm_classes and isinstance(weight, torch.Tensor) and weight.dim() == 1 and \
                isinstance(eps, float):
            m._dist_dpo_own_forward, m._dist_dpo_eps = m.forward, eps
            m.forward = types.MethodType(_forward, m)
            n += 1
    return n


def _forward(self, hidden_states):
    if hidden_states.dtype != self.weight.dtype or not switch.live("torch_norm"):
        return self._dist_dpo_own_forward(hidden_states)
    out = torch.nn.functional.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self._dist_dpo_eps)
    return out * 0.5 if switch.broken("torch_norm") else out
