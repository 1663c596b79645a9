"""What the model sees per micro-step: pairs grouped by length, and rows that compute each prompt once.

trl pads every pair of a micro-batch to the longest one and stacks [chosen; rejected], so on real (long-tailed)
preference data most of a batch is padding, and every prompt runs twice.
  - `length_grouped_sampler`: transformers' LengthGroupedSampler over trl's tokenized columns (trl drops any length
    column we could add before tokenizing), seeded explicitly so that every rank draws the same order and
    accelerate's per-rank sharding of the batches stays disjoint; on several ranks each micro-step's pairs are
    dealt out one by one, so no rank always gets the longest ones.
  - `SharedPromptCollator`: trl's collator, plus (when cheaper) one row per pair [prompt | chosen | rejected] that
    `head.py` runs instead; or, where `attention.packed_rows_reason` allows (flash attention's variable-length
    kernel on this GPU), all pairs packed into ONE row without padding or mask. Truncation is trl's (`keep_start`:
    prompt + answer cut to max_length), so every layout scores the same tokens.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch

PAD_MULTIPLE = 16  # shared rows are padded to this: sdpa's memory-efficient kernel copies a misaligned mask per layer
# Cost of one masked query-key pair (sdpa memory-efficient kernel, full square) relative to a causal flash pair.
# A prediction: benchmarks/throughput.py's prefix-sharing on/off rows measure it.
MASKED_ATTENTION_PENALTY = 2.0
BATCH_KEY = "speed_rows"  # where a batch carries its `SpeedRows`, next to trl's padded rows


@dataclass
class SpeedRows:
    """One micro-batch laid out for the speed path's forward (`head.py`), built on the CPU next to trl's padded rows.
    Shared rows: one row [prompt | chosen | rejected] per pair, `segments` telling the 4-D mask which part each token
    is. Packed rows: every pair in ONE row, `varlen` holding the attention segments (attention.py)."""
    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [rows, width]: rejected continues after the prompt, as in its own row
    pred_index: torch.Tensor  # flat index (row * width + column) of the position predicting each scored token
    targets: torch.Tensor  # the scored token ids, in the same order
    out_index: torch.Tensor  # where trl's [chosen; rejected] x (width - 1) log-prob layout holds each of them
    segments: torch.Tensor | None = None  # shared rows: int8, 0 prompt, 1 chosen, 2 rejected, -1 padding
    varlen: object | None = None  # packed rows: attention.Varlen

    def to(self, *args, **kwargs) -> "SpeedRows":  # accelerate's send_to_device moves any object with .to
        return SpeedRows(**{k: None if v is None else v.to(*args, **kwargs) for k, v in vars(self).items()})

    def pin_memory(self) -> "SpeedRows":  # the DataLoader's pin_memory thread
        return SpeedRows(**{k: None if v is None else v.pin_memory() for k, v in vars(self).items()})


def pair_lengths(dataset, max_length: int | None) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token counts per row after trl's keep_start truncation."""
    import pyarrow.compute as pc

    cap = max_length or 10**9
    p, c, r = [], [], []
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    # Arrow lengths, batch by batch: a Python list per row would cost gigabytes on a large set
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=50_000):
        prompt, chosen, rejected = (pc.list_value_length(batch[k]).to_pylist() for k in columns)
        for n_p, n_c, n_r in zip(prompt, chosen, rejected):
            n_p = min(n_p, cap)
            p.append(n_p)
            c.append(min(n_c, cap - n_p))
            r.append(min(n_r, cap - n_p))
    return p, c, r


def length_grouped_sampler(lengths: list[int], batch_size: int, seed: int, per_device: int = 0, world: int = 1):
    """transformers' LengthGroupedSampler; on several ranks (`world` > 1, `per_device` pairs each per micro-batch),
    the pairs of each micro-step are dealt out one by one instead of in contiguous runs: the order is sorted
    longest first within a megabatch, and accelerate gives rank r the r-th run of `per_device` pairs, so rank 0
    held the longest pairs of every step (3.8 % more tokens on var6k, every step; the others waited). Dealt out,
    the ranks' shares differ by 0.3 %. Each step trains the same pairs either way.
    Each epoch's order comes from (seed, epoch) alone, as in `rebalanced_grouped_sampler`: a run resumed in epoch e
    builds a fresh sampler, which must draw epoch e's order, not continue a generator from epoch 0."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeeded(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:  # accelerate's DataLoaderShard.set_epoch calls it
            self.epoch = epoch

        def __iter__(self):
            self.generator.manual_seed(seed + self.epoch)
            return super().__iter__()

    grouped = EpochSeeded(batch_size, lengths=lengths, generator=torch.Generator())
    return RanksDealt(grouped, per_device, world) if world > 1 and per_device > 1 else grouped


class RanksDealt(torch.utils.data.Sampler):
    """`base`'s order, each block of `per_device` x `world` indices (one micro-step of every rank) reordered so that
    the rank-r run of it holds every world-th index starting at r."""

    def __init__(self, base, per_device: int, world: int):
        self.base, self.per_device, self.world = base, per_device, world

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __iter__(self):
        order, block = list(self.base), self.per_device * self.world
        for start in range(0, len(order), block):
            chunk = order[start:start + block]
            if len(chunk) < block:  # the last, short micro-step: as accelerate would split it
                yield from chunk
                continue
            for rank in range(self.world):
                yield from chunk[rank::self.world]


def rebalanced_grouped_sampler(lengths: list[int], per_device: int, accum: int, world: int, rank: int, seed: int,
                               drop_last: bool):
    """Length-grouped optimizer steps whose pairs are split across ranks by cost, not count (several GPUs).

    With a fixed number of pairs per rank, the sorted batches go round robin and every step pairs a batch with the
    next-shorter one: a step lasts as long as its widest batch, so the other rank idles (on 2 x H200 rank 0 ran 59 %
    of the decoder tokens; 2-GPU scaling 0.75). transformers' BatchRebalanceSampler splits each step's pairs into
    contiguous length groups of equal padded cost - fewer long pairs on one rank, more short ones on another - but it
    draws random steps; this feeds it length-grouped ones. The step's pairs are the same as with fixed batches;
    `loss.compute_loss` divides each rank's sum by the nominal per-device count, so the step's loss and gradient are
    the mean over those pairs, as before (tests/test_speed.py checks the gradient against one process)."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

    class GroupedRebalance(BatchRebalanceSampler):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            # accelerate's DataLoaderShard.set_epoch reaches a batch sampler's epoch only through `.sampler` when a
            # shard wrapper sits in between (transformers leaves one, neutralised): without this every epoch would
            # draw epoch 0's order.
            self.sampler = types.SimpleNamespace(set_epoch=self.set_epoch)

        def __iter__(self):
            generator = torch.Generator()
            generator.manual_seed(seed + self.epoch)
            order = list(LengthGroupedSampler(self.effective_batch_size, lengths=self.lengths, generator=generator))
            for step in range(self.num_global_batches):  # the parent's loop over its own (random) order
                pairs = order[step * self.effective_batch_size:(step + 1) * self.effective_batch_size]
                if len(pairs) < self.dp_size * self.grad_accum:  # a short last step: every (rank, slot) gets >= 1
                    pairs += (order * self.dp_size * self.grad_accum)[:self.dp_size * self.grad_accum - len(pairs)]
                yield from self._yield_global_batch(pairs)

    return GroupedRebalance(lengths=lengths, effective_batch_size=per_device * accum * world, dp_size=world,
                            grad_accum=accum, seed=seed, rank=rank, drop_last=drop_last)


@dataclass
class LayoutCost:
    """Relative cost of a micro-batch in each layout: padded tokens through the decoder's linears, plus attention
    pairs weighted by (attention FLOPs per pair) / (linear FLOPs per token) = 2 q_dim / params per layer."""
    attention_per_pair: float

    @classmethod
    def for_config(cls, config) -> "LayoutCost":
        from dist_dpo.plan import shape_from_config

        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        shape = shape_from_config(d)
        return cls(attention_per_pair=2 * shape.q_dim / max(shape.layer_params, 1))

    def pairs_layout(self, rows: int, width: int, padded: bool) -> float:
        attention = rows * width**2 * (MASKED_ATTENTION_PENALTY if padded else 0.5)  # no padding: causal flash
        return rows * width + self.attention_per_pair * attention

    def shared_layout(self, rows: int, width: int) -> float:
        return rows * width + self.attention_per_pair * rows * width**2 * MASKED_ATTENTION_PENALTY


@dataclass
class SharedPromptCollator:
    """trl's `DataCollatorForPreference` output, plus the shared-prompt rows (a `SpeedRows` under BATCH_KEY) when `mode` is "true",
    or "auto" and `cost` says they are cheaper for this micro-batch."""
    base: object  # trl.trainer.dpo_trainer.DataCollatorForPreference
    mode: str = "auto"  # auto | true | false
    cost: LayoutCost | None = None
    packed: bool = False  # share through packed rows (attention.py) instead of padded rows with a 4-D mask
    tokens_real: int = 0  # non-pad tokens of trl's layout (what throughput counts)
    tokens_run: int = 0  # tokens the decoder actually ran (padding and repeated prompts included)
    batches: dict = field(default_factory=lambda: {"packed": 0, "shared": 0, "pairs": 0})
    ref_rows: bool = False  # hand the train set's row indices on (speed/ref_cache.py)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.base(examples)
        if self.ref_rows and examples and "ref_row" in examples[0]:  # training rows (evaluation rows have none)
            from dist_dpo.speed.ref_cache import batch_rows

            batch.update(batch_rows(examples))
        real = int(batch["attention_mask"].sum())
        self.tokens_real += real
        if not self._share(examples, batch, real):
            self.tokens_run += batch["input_ids"].numel()
            self.batches["pairs"] += 1
            return batch
        build = self._packed_rows if self.packed else self._shared_rows
        shared = build(examples, width_out=batch["input_ids"].size(1) - 1)
        self.tokens_run += shared.input_ids.numel()
        self.batches["packed" if self.packed else "shared"] += 1
        batch[BATCH_KEY] = shared
        return batch

    def _truncated(self, e: dict) -> tuple[list, list, list]:
        cap = self.base.max_length or 10**9
        p = e["prompt_ids"][:cap]
        return p, e["chosen_ids"][: cap - len(p)], e["rejected_ids"][: cap - len(p)]

    def _share(self, examples: list[dict], batch: dict, real: int) -> bool:
        if self.mode == "false" or self.base.truncation_mode != "keep_start" or self.base.pad_to_multiple_of:
            return False  # keep_end cuts chosen's and rejected's prompts differently; padding rules are trl's
        lengths = [tuple(map(len, self._truncated(e))) for e in examples]
        if any(p == 0 for p, _, _ in lengths):  # trl scores no first answer token without a prompt
            return False
        if self.mode == "true" or self.packed:  # packed: no padding, prompt once, flash - never dearer than trl's rows
            return True
        rows, width = batch["input_ids"].shape
        shared_width = -(-max(sum(x) for x in lengths) // PAD_MULTIPLE) * PAD_MULTIPLE
        return self.cost.shared_layout(len(examples), shared_width) < self.cost.pairs_layout(rows, width,
                                                                                              real < rows * width)

    def _shared_rows(self, examples: list[dict], width_out: int) -> SpeedRows:
        """`width_out`: trl's padded width minus one, the width of its per-token log-prob layout."""
        pairs = len(examples)
        seqs, positions, segments, pred, targets, place = [], [], [], [], [], []
        for i, e in enumerate(examples):
            p, c, r = self._truncated(e)
            n_p, n_c, n_r = len(p), len(c), len(r)
            seqs.append(p + c + r)
            positions.append(list(range(n_p + n_c)) + list(range(n_p, n_p + n_r)))
            segments.append([0] * n_p + [1] * n_c + [2] * n_r)
            # Answer token k is predicted at row position n_p + k - 1 of its own sequence: in the shared row that
            # is the same place for chosen; for rejected it is the last prompt token (k = 0), else the previous
            # rejected token. `place` is where trl's layout holds that log-prob ([chosen; rejected] x width_out).
            for k in range(n_c):
                pred.append((i, n_p + k - 1))
                targets.append(c[k])
                place.append(i * width_out + n_p + k - 1)
            for k in range(n_r):
                pred.append((i, n_p - 1 if k == 0 else n_p + n_c + k - 1))
                targets.append(r[k])
                place.append((pairs + i) * width_out + n_p + k - 1)
        width = -(-max(len(s) for s in seqs) // PAD_MULTIPLE) * PAD_MULTIPLE
        pad = self.base.pad_token_id
        return SpeedRows(
            input_ids=torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
            position_ids=torch.tensor([q + [0] * (width - len(q)) for q in positions]),
            segments=torch.tensor([g + [-1] * (width - len(g)) for g in segments], dtype=torch.int8),
            pred_index=torch.tensor([row * width + col for row, col in pred]),
            targets=torch.tensor(targets),
            out_index=torch.tensor(place),
        )

    def _packed_rows(self, examples: list[dict], width_out: int) -> SpeedRows:
        """All pairs back to back in one row [p0 c0 r0 p1 c1 r1 ...], plus the two attention segments of each pair
        (`attention.Varlen`): prompt+chosen over itself, rejected over prompt+rejected. Log-prob positions as in
        `_shared_rows`, offset by where the pair starts."""
        from dist_dpo.speed.attention import Varlen

        pairs = len(examples)
        ids, positions, pred, targets, place = [], [], [], [], []
        cu_q, cu_k, kv_index = [0], [0], []
        for i, e in enumerate(examples):
            p, c, r = self._truncated(e)
            n_p, n_c, n_r = len(p), len(c), len(r)
            o = len(ids)
            ids += p + c + r
            positions += list(range(n_p + n_c)) + list(range(n_p, n_p + n_r))
            kv_index += list(range(o, o + n_p + n_c))
            cu_q.append(cu_q[-1] + n_p + n_c)
            cu_k.append(cu_k[-1] + n_p + n_c)
            if n_r:
                kv_index += list(range(o, o + n_p)) + list(range(o + n_p + n_c, o + n_p + n_c + n_r))
                cu_q.append(cu_q[-1] + n_r)
                cu_k.append(cu_k[-1] + n_p + n_r)
            for k in range(n_c):
                pred.append(o + n_p + k - 1)
                targets.append(c[k])
                place.append(i * width_out + n_p + k - 1)
            for k in range(n_r):
                pred.append(o + (n_p - 1 if k == 0 else n_p + n_c + k - 1))
                targets.append(r[k])
                place.append((pairs + i) * width_out + n_p + k - 1)
        q_len = [b - a for a, b in zip(cu_q, cu_q[1:])]
        k_len = [b - a for a, b in zip(cu_k, cu_k[1:])]
        return SpeedRows(
            input_ids=torch.tensor([ids]),
            position_ids=torch.tensor([positions]),
            pred_index=torch.tensor(pred),
            targets=torch.tensor(targets),
            out_index=torch.tensor(place),
            varlen=Varlen(cu_q=torch.tensor(cu_q, dtype=torch.int32), cu_k=torch.tensor(cu_k, dtype=torch.int32),
                          kv_index=torch.tensor(kv_index), max_q=max(q_len), max_k=max(k_len)),
        )

    @property
    def run_per_real(self) -> float:
        """Decoder tokens run per non-pad token of trl's layout: > 1 is padding, < 1 is prompts computed once."""
        return self.tokens_run / self.tokens_real if self.tokens_real else 0.0
