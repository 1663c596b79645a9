"""The policy's per-token log-probs with their hidden-state gradient taken in the forward: one vocabulary matmul fewer.

trl's `ChunkedLogProbFunction` (1.16) never materializes the [tokens, vocab] logits: its forward runs the logits
tile by tile into an online log-sum-exp, and its backward runs every tile AGAIN to turn it into softmax
probabilities before the gradient matmul. So each policy token pays three vocabulary-wide matmuls (forward,
recompute, gradient), 2 x hidden x vocab FLOPs each: for Qwen2.5-1.5B at 2048 tokens that recompute is ~4 % of
a step. Here the forward keeps, beside the log-sum-exp, the running sum of exp(logit - max) x head row (rescaled
whenever the max grows, as flash attention does), so it ends with

    d logp(y) / d hidden = W[y] - softmax(logits) @ W

and the backward only scales that row by each token's incoming gradient. Same numbers: the logits tile is the
same bf16 matmul, the log-sum-exp folds it in fp32 as trl does, the probabilities enter the gradient matmul in
bf16 as trl's recomputed tile does, and the matmul accumulates in fp32 (trl's `_addmm_fp32`).

Only for what it covers: log-probs alone (logging steps that want entropy & co. use trl's kernel), a gradient for
the hidden states only (a frozen head without bias: LoRA / QLoRA), no logit scaling (head.unsupported_reason).
The A/B switch HEAD_RECOMPUTE keeps trl's kernel everywhere (dist_dpo/ab_switches.py).
"""

from __future__ import annotations

import torch

TOKENS_PER_TILE = None  # the tile's rows; None: trl's TOKEN_CHUNK_SIZE (4096), as its kernel tiles
BLOCK = 1024  # the fold kernel's columns per load

try:  # triton ships with torch's CUDA builds; without it (CPU) the tiles are folded with torch ops
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU wheels
    triton = None


def covers(hidden: torch.Tensor, weight: torch.Tensor, bias, outputs: tuple[str, ...]) -> bool:
    """Whether `log_probs` (below) can stand in for trl's kernel on this call."""
    from dist_dpo import ab_switches

    return (tuple(outputs) == ("log_probs",) and torch.is_grad_enabled() and hidden.requires_grad
            and not weight.requires_grad and bias is None and not ab_switches.flag("HEAD_RECOMPUTE"))


def log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[N] fp32 log-probs of `targets` under softmax(hidden @ weight.T); differentiable in `hidden`."""
    return _GradInForward.apply(hidden, weight, targets, chunk_size)


class _GradInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE, _addmm_fp32  # trl's tiling and fp32 accumulation

        ctx.set_materialize_grads(False)
        rows_per_tile = TOKENS_PER_TILE or TOKEN_CHUNK_SIZE
        device = hidden.device
        compute = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        n_all, vocab = hidden.size(0), weight.size(0)
        logps = torch.empty(n_all, device=device, dtype=torch.float32)
        # d logp / d hidden per token, fp32: the backward's product is rounded once, as trl's fp32 accumulator is
        unit = torch.empty(hidden.shape, device=device, dtype=torch.float32)
        buf = torch.empty((min(n_all, rows_per_tile), chunk_size), device=device, dtype=compute)
        for t0 in range(0, n_all, rows_per_tile):
            t1 = min(t0 + rows_per_tile, n_all)
            n, h, y = t1 - t0, hidden[t0:t1].to(compute), targets[t0:t1]
            running_max = torch.full((n,), float("-inf"), device=device, dtype=torch.float32)
            sum_exp = torch.zeros(n, device=device, dtype=torch.float32)
            target_logit = torch.zeros(n, device=device, dtype=torch.float32)
            rescale = torch.empty(n, device=device, dtype=torch.float32)
            expected = torch.zeros((n, hidden.size(1)), device=device, dtype=torch.float32)  # sum e^(z - max) W
            for v0 in range(0, vocab, chunk_size):
                v1 = min(v0 + chunk_size, vocab)
                w = weight[v0:v1].to(compute)
                tile = buf[:n, :v1 - v0]
                torch.mm(h, w.t(), out=tile)
                _fold(tile, y, v0, running_max, sum_exp, target_logit, rescale)  # tile <- e^(z - max), bf16
                expected.mul_(rescale[:, None])
                _addmm_fp32(expected, tile, w)
            logps[t0:t1] = target_logit - running_max - sum_exp.log()
            rows = weight.index_select(0, y).float()
            torch.sub(rows, expected / sum_exp[:, None], out=unit[t0:t1])
        ctx.save_for_backward(unit)
        ctx.hidden_dtype = hidden.dtype
        return logps

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        (unit,) = ctx.saved_tensors
        return (unit * grad.float()[:, None]).to(ctx.hidden_dtype), None, None, None


def _fold(tile, targets, start, running_max, sum_exp, target_logit, rescale) -> None:
    """Fold one vocabulary chunk of logits into each row's running max and sum of exponentials, take the target's
    logit if it falls in the chunk, and overwrite the tile with e^(logit - new max) for the gradient matmul;
    `rescale` gets e^(old max - new max) for what was accumulated before."""
    if triton is not None and tile.is_cuda:
        _fold_kernel[(tile.size(0),)](tile, tile.stride(0), targets, start, tile.size(1), running_max, sum_exp,
                                      target_logit, rescale, BLOCK=BLOCK)
        return
    z = tile.float()
    new_max = torch.maximum(running_max, z.amax(dim=1))
    local = targets - start
    inside = (local >= 0) & (local < tile.size(1))
    picked = z.gather(1, local.clamp(0, tile.size(1) - 1)[:, None]).squeeze(1)
    target_logit.copy_(torch.where(inside, picked, target_logit))
    e = torch.exp(z - new_max[:, None])
    rescale.copy_(torch.exp(running_max - new_max))
    sum_exp.mul_(rescale).add_(e.sum(dim=1))
    running_max.copy_(new_max)
    tile.copy_(e)


if triton is not None:
    @triton.jit
    def _fold_kernel(tile_ptr, stride, targets_ptr, start, width, max_ptr, sum_ptr, target_ptr, rescale_ptr,
                     BLOCK: tl.constexpr):
        # One program per token (row): its max over the chunk first, then exponentials, their sum, the bf16 write
        row = tl.program_id(0).to(tl.int64)
        base = tile_ptr + row * stride
        old = tl.load(max_ptr + row)
        m = old
        for b in range(0, width, BLOCK):
            cols = b + tl.arange(0, BLOCK)
            z = tl.load(base + cols, mask=cols < width, other=-float("inf")).to(tl.float32)
            m = tl.maximum(m, tl.max(z, axis=0))
        local = tl.load(targets_ptr + row) - start
        if (local >= 0) & (local < width):
            tl.store(target_ptr + row, tl.load(base + local).to(tl.float32))
        s = 0.0
        for b in range(0, width, BLOCK):
            cols = b + tl.arange(0, BLOCK)
            inside = cols < width
            z = tl.load(base + cols, mask=inside, other=-float("inf")).to(tl.float32)
            e = tl.where(inside, tl.exp(z - m), 0.0)
            s += tl.sum(e, axis=0)
            tl.store(base + cols, e.to(tile_ptr.dtype.element_ty), mask=inside)
        scale = tl.exp(old - m)
        tl.store(rescale_ptr + row, scale)
        tl.store(sum_ptr + row, tl.load(sum_ptr + row) * scale + s)
        tl.store(max_ptr + row, m)
