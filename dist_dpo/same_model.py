"""Before step 1, every rank runs one short forward on the same tokens and compares the result with the others.

Ranks that hold different weights train a model nobody asked for, and nothing says so: the losses still fall and
the adapter still saves. Ways to get there: a 4-bit model quantized on one rank and handed to another without its
quantization state, a shard missing on one node, a device map that differs per rank. (On 2 x H200 the FSDP2 + QLoRA
cell's step-1 gradient was 3 % off the single-GPU run's; the cause, bitsandbytes#1945, changed every rank alike, which
this check cannot see: the start fingerprint it logs lets runs be compared with each other.)
One no-grad forward of a few tokens through the model as training calls it (FSDP2 / ZeRO-3 gather as they do in
training), in eval mode so LoRA dropout cannot differ, and one all_gather of a few numbers.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from dist_dpo.errors import UserError
from dist_dpo.logs import get_logger

TOKENS = 16
VOCAB_SLICE = 64  # logits compared per position: enough to see different weights, small to gather
# Same kernels on the same cards give the same numbers; different weights move logits by far more than this.
REL_TOLERANCE = 1e-2


def fingerprint(model, vocab_size: int, device) -> torch.Tensor:
    """`device`: the Trainer's (a ZeRO-3 or FSDP2 parameter may sit elsewhere or be a shard)."""
    ids = (torch.arange(TOKENS, device=device) * 7919 % max(vocab_size - 1, 1) + 1).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        model.train(was_training)
    return logits[0, :, :VOCAB_SLICE].float().flatten()


def spread(per_rank: torch.Tensor) -> tuple[float, int]:
    """(largest difference from rank 0 relative to rank 0's largest logit, the rank that has it)."""
    scale = per_rank[0].abs().max().clamp_min(1e-6)
    diff = (per_rank - per_rank[0]).abs().amax(dim=1) / scale
    rank = int(diff.argmax())
    return float(diff[rank]), rank


class SameModelCheck(TrainerCallback):
    def __init__(self, rt, strategy: str, quantization: str):
        self.rt, self.strategy, self.quantization = rt, strategy, quantization

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch.distributed as dist

        if model is None:
            return
        vocab = model.config.get_text_config().vocab_size
        mine = fingerprint(model, vocab, args.device)
        log = get_logger()
        # Printed for comparisons ACROSS runs too: the adapter starts as a no-op, so every strategy and launcher with
        # the same base model and precision should print nearly the same number (benchmarks/gpu_matrix.py reads it).
        log.info("start fingerprint: %.7e (mean |logit| of one 16-token forward before step 1)",
                 float(mine.abs().mean()))
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        worst, rank = spread(torch.stack(gathered).cpu())
        if worst > REL_TOLERANCE:
            raise UserError(
                f"the ranks hold different models before step 1 (rank {rank}'s logits differ from rank 0's by "
                f"{worst:.1%} of their scale; {self.strategy}, {self.quantization}): training on would silently "
                "train something else. Check that every node has the same model files; if they do, this is a loading "
                "bug - report it with logs/rank*.log (same_model_check: false skips this check)")
        log.info("same model on every rank: one forward, max difference from rank 0 %.1e of the logit scale", worst)
