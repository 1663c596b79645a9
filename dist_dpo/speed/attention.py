"""Packed shared-prompt rows through flash attention: no padding, no mask, the prompt once.

The shared-prompt row [prompt | chosen | rejected] of `batching.py` needs a 4-D mask (rejected must not see chosen),
and a mask takes sdpa off its flash kernel onto the memory-efficient one: on 2 x H200 that cost exactly what the
prompt saved at 512 tokens (dist-dpo 43.6 k vs trl 43.6 k tok/s steady, with 12.5 % fewer tokens run). Packed
instead, a micro-batch is ONE row of every pair's tokens back to back, and attention is two causal segments per
pair, which torch's variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`) runs without a mask:
  - queries prompt+chosen over keys prompt+chosen (causal);
  - queries rejected over keys prompt+rejected (causal, aligned bottom-right: rejected token j sees the whole
    prompt and rejected tokens 0..j), the keys gathered by index.
Every scored token sees exactly the tokens (and, through `position_ids`, the positions) it sees in trl's rows.
Measured against the masked rows (2 x H200, torch 2.11, 1.5B shape): var set 1.34x end to end and 28.3 -> 20.6 GiB
in one call (steady 1.02x in another, cold one); fixed512 steady 0.98x - torch 2.11's kernel takes no grouped K/V,
so they are expanded per query head here (benchmarks/NOTES.md section 5c).

transformers routes attention by `config._attn_implementation`; "dist_dpo_sdpa" is sdpa unless a forward passes
`packed_segments=` (only `head._dpo_forward` does), so generation, evaluation and trl's own forwards are untouched.
A card, build or dtype the kernel does not serve is found by `packed_rows_reason` before training (a one-off
comparison against sdpa on this device); such runs keep the masked rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

IMPLEMENTATION = "dist_dpo_sdpa"


@dataclass
class Varlen:
    """One packed micro-batch's attention segments (built on the CPU by `batching.SharedPromptCollator`)."""
    cu_q: torch.Tensor  # int32 [segments + 1]: query segment starts in the packed row
    cu_k: torch.Tensor  # int32 [segments + 1]: key segment starts in the gathered keys
    kv_index: torch.Tensor  # int64 [keys]: packed-row position of every gathered key
    max_q: int
    max_k: int

    def to(self, *args, **kwargs) -> "Varlen":  # accelerate's send_to_device moves any object with .to
        return Varlen(self.cu_q.to(*args, **kwargs), self.cu_k.to(*args, **kwargs),
                      self.kv_index.to(*args, **kwargs), self.max_q, self.max_k)

    def pin_memory(self) -> "Varlen":  # the DataLoader's pin_memory thread
        return Varlen(self.cu_q.pin_memory(), self.cu_k.pin_memory(), self.kv_index.pin_memory(), self.max_q,
                      self.max_k)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, packed_segments=None,
                      **kwargs):
    """transformers' attention signature: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    if packed_segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise RuntimeError("packed rows support plain causal attention only")  # speed.apply never gets here
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1).index_select(0, packed_segments.kv_index)  # [keys, Hkv, D]
    v = value[0].transpose(0, 1).index_select(0, packed_segments.kv_index)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash_varlen(q.contiguous(), k, v, packed_segments, scaling)
    else:
        if q.is_cuda:
            _warn_slow(q.dtype)
        out = reference(q, k, v, packed_segments, scaling)
    return out.unsqueeze(0), None


@functools.lru_cache(maxsize=None)
def _warn_slow(dtype) -> None:
    from dist_dpo.logs import get_logger

    get_logger().warning("packed rows met %s attention inputs on the GPU: running the per-segment reference (slow); "
                         "set packed_rows: false", dtype)


def flash_varlen(q, k, v, varlen: Varlen, scale, gqa: str | None = None) -> torch.Tensor:
    """torch's varlen_attn, causal, across the API's versions (2.9: is_causal=; later: window_size=(-1, 0),
    scale=, enable_gqa=). Grouped K/V heads (`gqa`, default: what `kernel_reason` found to work) go as they are
    ("varlen": torch's enable_gqa; "aten": torch's flash op directly, see `_FlashGQA`) or expanded per query head
    ("expand")."""
    from torch.nn.attention.varlen import varlen_attn

    params = _parameters(varlen_attn)
    grouped = k.size(1) != q.size(1)
    if grouped and (gqa or gqa_mode()) == "aten":
        return _FlashGQA.apply(q, k, v, varlen.cu_q, varlen.cu_k, varlen.max_q, varlen.max_k,
                               q.size(-1) ** -0.5 if scale is None else scale)
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None:
        q = q * (scale * q.size(-1) ** 0.5)  # the kernel's default scale is 1/sqrt(head_dim)
    if grouped:
        if (gqa or gqa_mode()) == "varlen":
            kwargs["enable_gqa"] = True
        else:  # one key/value head per query head: 6x the K/V bytes at Qwen2.5's 12:2 heads
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    return varlen_attn(q, k, v, varlen.cu_q, varlen.cu_k, varlen.max_q, varlen.max_k, **kwargs)


class _FlashGQA(torch.autograd.Function):
    """torch's flash-attention op with grouped K/V heads as they are. Why our own: torch 2.11's varlen_attn (the
    GPU image's) has no enable_gqa, yet the flash kernel under it takes grouped heads natively (2.13's enable_gqa
    passes them straight through to the same op); expanding them instead cost 6x the K/V bytes per layer, saved
    for the backward. `kernel_reason` holds it to the sdpa reference, forward and backward, before any run uses it."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng, unused)
        ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu_q, cu_k, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, 0.0, True, rng, unused,
            scale=ctx.scale)
        return dq, dk, dv, None, None, None, None, None


_GQA: dict = {}  # "mode": how grouped K/V heads run, as `kernel_reason` found on this machine


def gqa_modes() -> list[str]:
    """How this torch can run grouped K/V heads, best first (the A/B switch VARLEN_GQA forces one: what the grouped
    kernel buys)."""
    from dist_dpo import ab_switches

    forced = ab_switches.value("VARLEN_GQA")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return ["expand"]
    modes = ["varlen"] if "enable_gqa" in _parameters(varlen_attn) else ["aten", "expand"]
    return [forced] if forced else modes


def gqa_mode() -> str:
    return _GQA.get("mode") or gqa_modes()[0]


def native_gqa() -> bool:
    """Whether grouped K/V heads reach the kernel as they are (else they are expanded per query head: more
    activation memory)."""
    return gqa_mode() != "expand"


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> frozenset:
    import inspect

    return frozenset(inspect.signature(fn).parameters)


def reference(q, k, v, varlen: Varlen, scale) -> torch.Tensor:
    """The same segments one by one through sdpa with an explicit bottom-right causal mask: the CPU path (tests) and
    the yardstick the GPU probe holds the flash kernel to."""
    cq, ck = varlen.cu_q.tolist(), varlen.cu_k.tolist()
    out = []
    for s in range(len(cq) - 1):
        qs, ks, vs = q[cq[s]:cq[s + 1]], k[ck[s]:ck[s + 1]], v[ck[s]:ck[s + 1]]
        n_q, n_k = qs.size(0), ks.size(0)
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        o = torch.nn.functional.scaled_dot_product_attention(
            qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), attn_mask=mask, scale=scale,
            enable_gqa=ks.size(1) != qs.size(1))
        out.append(o.transpose(0, 1))
    return torch.cat(out, dim=0)


def install(model) -> None:
    """Register the implementation with transformers and switch `model` (now on sdpa) to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = IMPLEMENTATION


def config_reason(config, attn_implementation: str) -> str | None:
    """Why packed rows cannot run on a model of this config, from the config alone (None: they can, on a GPU the
    kernel serves: `packed_rows_reason`)."""
    cfg = config.get_text_config()
    if attn_implementation not in ("sdpa", IMPLEMENTATION):
        return f"attn_implementation {attn_implementation}"
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "soft-capped attention logits"
    from dist_dpo.architectures import attention_layer_types

    if attention_layer_types(cfg) != {"full_attention"}:
        return "sliding-window layers"
    return None


def packed_rows_reason(model, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why packed rows cannot run on `model` training on `device` in `dtype` (None: they can)."""
    cfg = model.config.get_text_config()
    why = config_reason(model.config, model.config._attn_implementation)
    if why:
        return why
    if device.type != "cuda":
        return "no CUDA device (the variable-length kernel is flash attention's)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"compute dtype {dtype} (the kernel takes bf16/fp16)"
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return kernel_reason(device.index if device.index is not None else torch.cuda.current_device(), dtype, head_dim)


@functools.lru_cache(maxsize=None)
def kernel_reason(device_index: int, dtype: torch.dtype, head_dim: int) -> str | None:
    """Run the kernel once on this device against `reference`, forward and backward: a build without it, or
    another causal alignment, must not train silently on other attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return "this torch has no torch.nn.attention.varlen"
    device = torch.device("cuda", device_index)
    gen = torch.Generator(device="cpu").manual_seed(0)
    total, heads, kv_heads = 13, 4, 2
    q = torch.randn(total, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
    kv = torch.randn(2, total, kv_heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
    # pair: prompt 3, chosen 4, rejected 6 -> segments (7 queries over 7 keys) and (6 queries over 3 + 6 keys)
    index = torch.tensor(list(range(7)) + [0, 1, 2] + list(range(7, 13)), device=device)
    varlen = Varlen(cu_q=torch.tensor([0, 7, 13], dtype=torch.int32, device=device),
                    cu_k=torch.tensor([0, 7, 16], dtype=torch.int32, device=device), kv_index=index, max_q=7, max_k=9)
    scale = head_dim ** -0.5

    def run(fn, q, kv):  # output, and the gradients of q and of K/V (the prompt's keys gathered twice)
        out = fn(q, kv[0].index_select(0, index), kv[1].index_select(0, index))
        return (out, *torch.autograd.grad(out.float().square().sum(), (q, kv)))

    ref = run(lambda q, k, v: reference(q, k, v, varlen, scale), q.detach().float().requires_grad_(),
              kv.detach().float().requires_grad_())
    why = None
    for mode in gqa_modes():  # grouped K/V heads as they are first, expanded if that fails here
        try:
            fast = run(lambda q, k, v: flash_varlen(q, k, v, varlen, scale, gqa=mode), q, kv)
        except Exception as e:  # noqa: BLE001 - any failure means: the next mode, or keep the masked rows
            why = f"variable-length flash attention failed here ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            continue
        err = max(_relative(a, b) for a, b in zip(fast, ref))
        if err < 0.03:  # bf16 rounding is ~0.4 %; another alignment or mask is off by O(1)
            _GQA["mode"] = mode
            return None
        why = f"variable-length flash attention disagrees with sdpa here (max error {err:.3g}, {mode} K/V heads)"
    return why


def _relative(a, b) -> float:
    return ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
