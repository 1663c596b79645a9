"""What the model sees per micro-step: pairs grouped by length, and rows that compute each prompt once.

trl pads every pair of a micro-batch to the longest one and stacks [chosen; rejected], so on real (long-tailed)
preference data most of a batch is padding, and every prompt runs twice.
  - `length_grouped_sampler`: transformers' LengthGroupedSampler over trl's tokenized columns (trl drops any length
    column we could add before tokenizing), seeded explicitly so that every rank draws the same order and
    accelerate's per-rank sharding of the batches stays disjoint.
  - `SharedPromptCollator`: trl's collator, plus (when cheaper) one row per pair [prompt | chosen | rejected] that
    `head.py` runs instead. Truncation is trl's (`keep_start`: prompt + answer cut to max_length), so both layouts
    score the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PAD_MULTIPLE = 16  # shared rows are padded to this: sdpa's memory-efficient kernel copies a misaligned mask per layer
# Cost of one masked query-key pair (sdpa memory-efficient kernel, full square) relative to a causal flash pair.
# A prediction: benchmarks/throughput.py's prefix-sharing on/off rows measure it.
MASKED_ATTENTION_PENALTY = 2.0


def pair_lengths(dataset, max_length: int | None) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token counts per row after trl's keep_start truncation."""
    cap = max_length or 10**9
    p, c, r = [], [], []
    for prompt, chosen, rejected in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]):
        n = min(len(prompt), cap)
        p.append(n)
        c.append(min(len(chosen), cap - n))
        r.append(min(len(rejected), cap - n))
    return p, c, r


def length_grouped_sampler(lengths: list[int], batch_size: int, seed: int):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator()
    generator.manual_seed(seed)
    return LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)


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
    """trl's `DataCollatorForPreference` output, plus the shared-prompt rows (`dd_*` keys) when `mode` is "true",
    or "auto" and `cost` says they are cheaper for this micro-batch."""
    base: object  # trl.trainer.dpo_trainer.DataCollatorForPreference
    mode: str = "auto"  # auto | true | false
    cost: LayoutCost | None = None
    tokens_real: int = 0  # non-pad tokens of trl's layout (what throughput counts)
    tokens_run: int = 0  # tokens the decoder actually ran (padding and repeated prompts included)
    batches: dict = field(default_factory=lambda: {"shared": 0, "pairs": 0})

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.base(examples)
        real = int(batch["attention_mask"].sum())
        self.tokens_real += real
        shared = self._shared_rows(examples) if self.mode != "false" else None
        if shared is not None and self.mode == "auto":
            rows, width = batch["input_ids"].shape
            padded = real < rows * width
            if self.cost.shared_layout(shared["dd_input_ids"].size(0), shared["dd_input_ids"].size(1)) >= \
                    self.cost.pairs_layout(rows, width, padded):
                shared = None
        if shared is None:
            self.tokens_run += batch["input_ids"].numel()
            self.batches["pairs"] += 1
            return batch
        self.tokens_run += shared["dd_input_ids"].numel()
        self.batches["shared"] += 1
        batch.update(shared)
        return batch

    def _shared_rows(self, examples: list[dict]) -> dict | None:
        if self.base.truncation_mode != "keep_start":  # keep_end cuts chosen and rejected prompts differently
            return None
        cap = self.base.max_length or 10**9
        width_out = max(min(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])), cap)
                        for e in examples) - 1  # trl's padded width, shifted
        if self.base.pad_to_multiple_of:
            return None  # trl's width would differ from the one computed above; keep its layout
        pairs = len(examples)
        seqs, positions, segments, pred, targets, place = [], [], [], [], [], []
        for i, e in enumerate(examples):
            p = e["prompt_ids"][:cap]
            c = e["chosen_ids"][: cap - len(p)]
            r = e["rejected_ids"][: cap - len(p)]
            n_p, n_c, n_r = len(p), len(c), len(r)
            if n_p == 0:  # trl cannot score an answer's first token without a prompt; keep its layout
                return None
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
        return {
            "dd_input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
            "dd_position_ids": torch.tensor([q + [0] * (width - len(q)) for q in positions]),
            "dd_segments": torch.tensor([g + [-1] * (width - len(g)) for g in segments], dtype=torch.int8),
            "dd_pred_index": torch.tensor([row * width + col for row, col in pred]),
            "dd_targets": torch.tensor(targets),
            "dd_out_index": torch.tensor(place),
        }

    @property
    def run_per_real(self) -> float:
        """Decoder tokens run per non-pad token of trl's layout: > 1 is padding, < 1 is prompts computed once."""
        return self.tokens_run / self.tokens_real if self.tokens_real else 0.0
