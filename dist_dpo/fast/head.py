"""The DPO forward: trl's fused log-prob head, fed either trl's padded rows or dist-dpo's shared-prompt rows.

trl (1.16) patches the model so that `model(..., labels=..., fused_lm_head=True)` returns per-token log-probs laid
out like its padded batch ([chosen rows; rejected rows] x (L - 1)). Three things fall short there:
  - the head computes entropy, mean logit and top-1 for every token of every forward (the reference forward too),
    though trl only logs them;
  - its backward computes every logits tile a second time (`logprob.py` takes the gradient in the forward instead);
  - the backbone must run the padded [chosen; rejected] rows, so the prompt is computed twice.
This forward keeps trl's contract (same output layout, so trl's loss code reads it unchanged) and its kernel
(trl.kernels.ChunkedLogProbFunction), and adds: `dd_extras=` to choose the logging-only outputs per call, and the
shared-prompt layout from `batching.SharedPromptCollator` (keys `dd_*`): one row [prompt | chosen | rejected] per
pair, rejected positions continuing after the prompt, a mask that hides chosen from rejected; or all pairs packed
in one row, attention in segments (`attention.py`, key `dd_varlen`). Every scored token
sees exactly the tokens and positions it sees in trl's rows, so its log-prob is the same number.
"""

from __future__ import annotations

import functools
import types

import torch

from dist_dpo.fast import logprob

EXTRAS = ("entropy", "mean_logits", "is_top1")  # trl's logging-only per-token outputs
_SCALING_KEYS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


class HeadState:
    """What a forward computes when its caller does not say (`dd_extras` absent): trl's own calls want everything
    its `_compute_loss` reads."""

    def __init__(self, default_extras: tuple[str, ...] = EXTRAS):
        self.default_extras = default_extras


def unsupported_reason(model) -> str | None:
    """Why this forward cannot stand in for trl's on `model` (None: it can)."""
    cfg = model.config.get_text_config()
    scaled = [k for k in _SCALING_KEYS if getattr(cfg, k, None) not in (None, 1.0)]
    if scaled:  # trl folds these into its head; ours does not, so such models keep trl's forward
        return f"logit scaling ({', '.join(scaled)}) is handled by trl's head only"
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return "the model has no output embedding"
    return None


def shared_layout_ok(model) -> bool:
    """The shared-prompt rows need a 4-D mask, which sdpa and eager attention take as is (flash/flex do not)."""
    return model.config._attn_implementation in ("sdpa", "eager", "dist_dpo_sdpa")  # the last: attention.py


def install(model, state: HeadState) -> None:
    """Wrap the forward trl patched onto `model` (the bare CausalLM, under any PEFT wrapper)."""
    trl_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, dd_extras=None, **kwargs):
        layout = {k: kwargs.pop(k) for k in [k for k in kwargs if k.startswith("dd_")]}
        if not fused_lm_head:
            return trl_forward(*args, labels=labels, **kwargs)
        extras = state.default_extras if dd_extras is None else tuple(dd_extras)
        return _dpo_forward(self, labels, layout, extras, kwargs)

    model.forward = types.MethodType(forward, model)


def _dpo_forward(model, labels, layout: dict, extras: tuple[str, ...], kwargs: dict):
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs["use_cache"] = False
    kwargs.pop("num_items_in_batch", None)
    rows, width = labels.shape  # trl's padded layout: the output keeps it
    if "dd_varlen" in layout:  # packed rows: attention.py's segments, no mask to build
        cfg = model.config.get_text_config()
        kwargs.update(input_ids=layout["dd_input_ids"], position_ids=layout["dd_position_ids"],
                      attention_mask={t: None for t in set(getattr(cfg, "layer_types", None) or ["full_attention"])},
                      dd_varlen=layout["dd_varlen"])
    elif layout:
        kwargs.update(input_ids=layout["dd_input_ids"], position_ids=layout["dd_position_ids"],
                      attention_mask=shared_prompt_mask(layout["dd_segments"], _mask_dtype(model)))
    if layout:
        hidden = model.base_model(**kwargs).last_hidden_state
        hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, layout["dd_pred_index"])
        targets, place = layout["dd_targets"], layout["dd_out_index"]
    else:
        hidden = model.base_model(**kwargs).last_hidden_state[:, :-1]
        shifted = labels[:, 1:]
        scored = shifted != -100
        hidden, targets = hidden[scored], shifted[scored]
        place = scored.reshape(-1).nonzero().squeeze(-1)
    values = _log_probs(model, hidden, targets, ("log_probs", *extras))
    out = {}
    place = place.to(values[0].device)
    for name, v in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"), values):
        if v is None:
            continue
        flags = v.dtype == torch.bool
        v = v.to(torch.uint8) if flags else v
        # back into trl's [rows, width - 1] layout; the out-of-place index_copy keeps the gradient path
        v = v.new_zeros(rows * (width - 1)).index_copy(0, place, v).view(rows, width - 1)
        out[name] = v.bool() if flags else v
    out["label_mask"] = labels[:, 1:] != -100
    return FusedCausalLMOutput(**out)


def _log_probs(model, hidden, targets, outputs):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, maybe_gather_lm_head_ctx

    def head_log_probs(hidden, targets):
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # sharded outside any FSDP2 unit's hooks; the kernel needs it whole
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        hidden, targets = hidden.to(weight.device), targets.to(weight.device)
        with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3: gather the head for the direct weight access
            if logprob.covers(hidden, weight, bias, outputs):  # the policy's training forward, outside logging steps
                return logprob.log_probs(hidden, weight, targets, _CHUNKED_LOGPROB_CHUNK_SIZE), None, None, None, None
            return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None,
                                                1.0, outputs)

    head = model.get_output_embeddings()
    if not isinstance(head, FSDPModule):
        return head_log_probs(hidden, targets)
    # FSDP2 unshards a module's weight in that module's forward hooks (accelerate groups the head with the final
    # norm). Reading head.weight without calling the module skipped them: the weight was whole only where another
    # module of its group had run, and torch warned that the head "did not run forward before backward". Run as the
    # head's forward (for this call only), its hooks unshard the weight for the kernel and again for its backward.
    own = head.__dict__.get("forward")
    head.forward = head_log_probs
    try:
        return head(hidden, targets)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _mask_dtype(model) -> torch.dtype:
    # The additive mask must be in the dtype attention runs in: sdpa keeps one float mask for all layers only
    # when it needs no cast (a bool mask would be converted, and kept for backward, once per layer).
    device = model.get_input_embeddings().weight.device
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.get_input_embeddings().weight.dtype


def shared_prompt_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, T, T] additive mask for rows [prompt | chosen | rejected | pad]: causal, pad keys hidden, and
    rejected tokens (segment 2) never see chosen ones (segment 1). Segments: 0 prompt, 1 chosen, 2 rejected, -1 pad."""
    t = segments.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (k >= 0) & ~((q == 2) & (k == 1))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
