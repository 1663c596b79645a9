"""q, k and v projections of each attention layer as ONE matmul: the default where every rank holds whole weights
(the strategy table's `fuses_qkv`); DIST_DPO_AB_FUSED_QKV=0 is the benchmark's A/B row without it.

What it buys (the `separateqkv` rows of benchmarks/throughput.py, benchmarks/README.md): +7 % end to end on the
var6k set on one GPU, with a shorter host step; on 2048-token pairs the steady rate is unchanged.

Why: short-pair steps are host-bound (the GPU computes 20-60 % of a var6k step, ~2,900 kernel launches per
step), so every launch is host time the GPU waits for. Three projections of one input
cost 3 matmuls in each forward (policy and reference) and 3 matmuls + 2 gradient sums in the backward; fused they
cost 1 + 1 (the split's backward is one concatenation). For Qwen2.5-1.5B that is ~200 launches fewer per step, and
the k/v matmuls (256 output columns) stop running alone at low efficiency.

How: the three frozen base weights (and biases) are copied into one [q + k + v, hidden] tensor and the modules'
weights become views into it (no extra memory; a broadcast into them lands in the fused copy). The first of the
three projections called with a given input computes all three and hands the other two their part when they are
called with the same input tensor, as transformers' attention does. LoRA adapters (peft wraps q_proj / v_proj) add
their delta to their part as before. Only plain frozen nn.Linear bases on one device qualify: no 4-bit / 8-bit
layers, no FSDP / ZeRO-3 shards (a base whose weight no longer points into the fused copy falls back to its own
matmul, call by call).
"""

from __future__ import annotations

import types

import torch

from dist_dpo.speed import switch


class _Fused:
    def __init__(self, linears: list[torch.nn.Linear]):
        self.linears = linears
        self.sizes = [m.out_features for m in linears]
        with torch.no_grad():
            self.weight = torch.cat([m.weight for m in linears])
            self.bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        start = 0
        for m, n in zip(linears, self.sizes):  # the modules' weights become views into the fused copy
            m.weight.data = self.weight[start:start + n]
            if self.bias is not None:
                m.bias.data = self.bias[start:start + n]
            start += n
        self.ptrs = [m.weight.data_ptr() for m in linears]
        self.input, self.parts, self.taken = None, None, [True] * len(linears)

    def intact(self) -> bool:
        return [m.weight.data_ptr() for m in self.linears] == self.ptrs

    def part(self, i: int, x: torch.Tensor, own) -> torch.Tensor:
        if not switch.live("fused_qkv"):
            return own(x)
        if x is not self.input or self.taken[i]:
            if not self.intact():  # a wrapper re-allocated the weights (dtype cast, sharding): the plain matmul
                return own(x)
            out = torch.nn.functional.linear(x, self.weight, self.bias)
            self.input, self.parts, self.taken = x, list(out.split(self.sizes, dim=-1)), [False] * len(self.sizes)
        self.taken[i] = True
        part = self.parts[i]
        if all(self.taken):  # every part handed out: hold no activation longer than the layer does
            self.input, self.parts = None, None
        return part


def _base(module):
    return getattr(module, "base_layer", module)  # peft's LoRA wrapper, or the Linear itself


def _qualifies(linears) -> bool:
    first = linears[0]
    return all(type(m) is torch.nn.Linear and not m.weight.requires_grad and m.weight.is_floating_point()
               and m.weight.device == first.weight.device and m.weight.dtype == first.weight.dtype
               and (m.bias is None) == (first.bias is None) and m.in_features == first.in_features for m in linears)


def install(model) -> int:
    """Fuse q/k/v of every attention module of `model` that qualifies; returns how many. Installing twice changes
    nothing."""
    n = 0
    for attn in model.modules():
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
            continue
        wrappers = [getattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")]
        if "_dist_dpo_own_forward" in _base(wrappers[0]).__dict__:  # fused already
            n += 1
            continue
        if any(getattr(w, "lora_variant", None) for w in wrappers):  # DoRA & co. may update their part in place
            continue
        linears = [_base(w) for w in wrappers]
        if not _qualifies(linears):
            continue
        fused = _Fused(linears)
        for i, m in enumerate(linears):
            m._dist_dpo_own_forward = m.forward
            m.forward = types.MethodType(_make_forward(fused, i), m)
        n += 1
    return n


def _make_forward(fused: _Fused, i: int):
    def forward(self, x):
        return fused.part(i, x, self._dist_dpo_own_forward)
    return forward
