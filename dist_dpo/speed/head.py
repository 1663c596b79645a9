"""The DPO forward: trl's fused log-prob head, fed either trl's padded rows or dist-dpo's shared-prompt rows.

trl (1.16) patches the model so that `model(..., labels=..., fused_lm_head=True)` returns per-token log-probs laid
out like its padded batch ([chosen rows; rejected rows] x (L - 1)). Three things fall short there:
  - the head computes entropy, mean logit and top-1 for every token of every forward (the reference forward too),
    though trl only logs them;
  - its backward computes every logits tile a second time (`logprob.py` takes the gradient in the forward instead);
  - the backbone must run the padded [chosen; rejected] rows, so the prompt is computed twice.
This forward keeps trl's contract (same output layout, so trl's loss code reads it unchanged) and its kernel
(trl.kernels.ChunkedLogProbFunction), and adds two keyword arguments: `speed_outputs=` chooses the logging-only
outputs per call, `speed_rows=` (a `batching.SpeedRows` from `batching.SharedPromptCollator`) runs the shared-prompt
layout: one row [prompt | chosen | rejected] per pair, rejected positions continuing after the prompt, a mask that
hides chosen from rejected; or all pairs packed in one row, attention in segments (`attention.py`). Every scored token
sees exactly the tokens and positions it sees in trl's rows, so its log-prob is the same number.
"""

from __future__ import annotations

import functools
import types

import torch

from dist_dpo.speed import logprob, switch

EXTRAS = ("entropy", "mean_logits", "is_top1")  # trl's logging-only per-token outputs


class HeadState:
    """What a forward computes when its caller does not say (`speed_outputs` absent): trl's own calls want everything
    its `_compute_loss` reads."""

    def __init__(self, default_extras: tuple[str, ...] = EXTRAS):
        self.default_extras = default_extras


def unsupported_reason(model) -> str | None:
    """Why this forward cannot stand in for trl's on `model` (None: it can)."""
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return "the model has no output embedding"
    return None


def logit_transform(config) -> tuple[float | None, float]:
    """(final soft-cap, logit scale) as trl's `add_fused_lm_head` (1.16) reads them from the config, so both heads
    compute the same logits: Gemma's final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling ..."""
    cfg = config.get_text_config()
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    return getattr(cfg, "final_logit_softcapping", None), 1.0 if scale is None else scale


def mask_reason(attn_implementation: str) -> str | None:
    """The shared-prompt rows need a 4-D mask, which sdpa and eager attention take as is (flash/flex do not)."""
    if attn_implementation in ("sdpa", "eager", "dist_dpo_sdpa"):  # the last: attention.py's
        return None
    return f"attn_implementation {attn_implementation} takes no 4-D mask"


def install(model, state: HeadState) -> None:
    """Wrap the forward trl patched onto `model` (the bare CausalLM, under any PEFT wrapper); a second call only
    hands the installed head the new state."""
    if "_dist_dpo_head_state" in model.__dict__:
        model._dist_dpo_head_state.__dict__.update(state.__dict__)
        return
    model._dist_dpo_head_state = state
    trl_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, speed_outputs=None, speed_rows=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, labels=labels, **kwargs)
        if not switch.live("head"):  # trl's own forward on trl's rows (the self-check's reference, or turned off)
            return trl_forward(*args, fused_lm_head=True, labels=labels, **kwargs)
        if speed_rows is not None and not switch.live("packed_rows" if speed_rows.varlen is not None else
                                                       "shared_rows"):
            speed_rows = None
        extras = state.default_extras if speed_outputs is None else tuple(speed_outputs)
        return _dpo_forward(self, labels, speed_rows, extras, kwargs)

    model.forward = types.MethodType(forward, model)


def _dpo_forward(model, labels, layout, extras: tuple[str, ...], kwargs: dict):
    """`layout`: a batching.SpeedRows, or None for trl's padded rows."""
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs["use_cache"] = False
    kwargs.pop("num_items_in_batch", None)
    rows, width = labels.shape  # trl's padded layout: the output keeps it
    trl_mask = kwargs.get("attention_mask")
    if layout is not None and layout.varlen is not None:  # packed rows: attention.py's segments; an empty 4-D
        # mask, which every model's mask builder passes through as it is (masking_utils._preprocess_mask_arguments),
        # so no [T, T] mask is built
        kwargs.update(input_ids=layout.input_ids, position_ids=layout.position_ids,
                      attention_mask=layout.input_ids.new_zeros((1, 1, 0, 0), dtype=torch.bool),
                      packed_segments=layout.varlen)
    elif layout is not None:
        kwargs.update(input_ids=layout.input_ids, position_ids=layout.position_ids,
                      attention_mask=layer_masks(model, layout.segments, layout.position_ids, _mask_dtype(model)))
    out_backbone = None
    if layout is not None:
        out_backbone = model.base_model(**kwargs)
        hidden = out_backbone.last_hidden_state
        hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, layout.pred_index)
        targets, place = layout.targets, layout.out_index
    else:
        out_backbone = model.base_model(**kwargs)
        hidden = out_backbone.last_hidden_state[:, :-1]
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
    if kwargs.get("output_router_logits"):
        out["aux_loss"] = _router_aux_loss(model, out_backbone, trl_mask if layout is None else None)
    return FusedCausalLMOutput(**out)


def _router_aux_loss(model, backbone_out, attention_mask):
    """The MoE load-balancing loss exactly as trl's fused head computes it (1.16: Mixtral's function, the config's
    expert counts, trl's attention mask). Its averages run over every token of the rows, so it equals trl's only on
    trl's rows: speed.apply keeps trl's rows when the aux loss is on."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = model.config.get_text_config()
    return load_balancing_loss_func(backbone_out.router_logits, cfg.num_experts, cfg.num_experts_per_tok,
                                    attention_mask)


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
            if softcap is None and scale == 1.0 and logprob.covers(hidden, weight, bias, outputs):
                # the policy's training forward, outside logging steps, on plain logits
                return logprob.log_probs(hidden, weight, targets, _CHUNKED_LOGPROB_CHUNK_SIZE), None, None, None, None
            return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                                softcap, scale, outputs)

    softcap, scale = logit_transform(model.config)

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


def layer_masks(model, segments: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """The shared rows' mask for each kind of attention layer: one tensor where every layer attends alike, else
    {layer type: mask} (the models with mixed layers take that mapping as their attention_mask). A sliding-window
    layer hides keys `sliding_window` or more POSITIONS back (masking_utils.sliding_window_overlay: kv > q - w), so a
    rejected token sees exactly the prompt and rejected tokens it sees in trl's row."""
    from dist_dpo.architectures import attention_layer_types

    window = getattr(model.config.get_text_config(), "sliding_window", None)
    types = attention_layer_types(model.config)
    unknown = types - {"full_attention", "sliding_attention"}
    if unknown:  # speed.apply keeps such families on trl's rows; never guess a mask for them
        raise RuntimeError(f"shared rows cannot build masks for {sorted(unknown)} layers")
    leak = switch.broken("shared_rows")  # tests only: rejected tokens see the chosen ones
    masks = {t: shared_prompt_mask(segments, dtype, positions if t == "sliding_attention" else None, window, leak)
             for t in types}
    return next(iter(masks.values())) if len(masks) == 1 else masks


def shared_prompt_mask(segments: torch.Tensor, dtype: torch.dtype, positions: torch.Tensor | None = None,
                       window: int | None = None, leak: bool = False) -> torch.Tensor:
    """[rows, 1, T, T] additive mask for rows [prompt | chosen | rejected | pad]: causal, pad keys hidden, and
    rejected tokens (segment 2) never see chosen ones (segment 1). Segments: 0 prompt, 1 chosen, 2 rejected, -1 pad."""
    t = segments.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (k >= 0) & ~((q == 2) & (k == 1) & (not leak))
    if window is not None and positions is not None:
        allowed &= positions[:, None, :] > positions[:, :, None] - window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
