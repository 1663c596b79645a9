"""Reference log-probs kept across epochs: the first epoch's own reference forward stores each pair's chosen and
rejected reference log-probs; later epochs, and a run resumed from a checkpoint, read them instead of running the
reference again.

The reference is frozen (the base model with the adapter off, or a separate frozen model), so a pair's reference
log-probs are the same numbers in every epoch up to the summation order of the batch they are computed in: what
trl's own `precompute_ref_log_probs` relies on too, but without its separate pass before training. The cache is off
where that is not so: a reference that moves (`sync_ref_model`), a model with dropout (its reference forward is random
in training mode), trl's own precomputed values, or trl's loss instead of the speed path's (dist_dpo/speed/loss.py).

How a pair is found: the train set gets a `ref_row` column (its row index; the trainer keeps it among trl's
signature columns), the collator hands the micro-batch's rows on as `ref_rows` (a tensor that goes to the device with
the batch) and `ref_rows_host` (the same as a list, for decisions on the host without waiting for the GPU). Values are
stored on the device as they are computed, without a host sync; at each epoch's end and before each checkpoint every
rank takes the others' (one all-reduce) so that all ranks hold every value computed so far.

When a cached value is used: in one process or under DDP (a no-grad forward talks to no other rank), per
micro-batch, as soon as all of its rows are held; under FSDP2 and DeepSpeed the reference forward may be a collective
every rank must join (weights are gathered in it), so there only once every row of the train set is held (the same
decision on every rank).

A checkpoint carries the values (`ref_logps.pt`) with a key of the model, the data's tokens and the truncation;
a resume whose key differs recomputes them and says so once.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

COLUMN = "ref_row"
BATCH_KEYS = ("ref_rows", "ref_rows_host")
FILE = "ref_logps.pt"
DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "activation_dropout")


def unsupported_reason(trainer, recipe, base) -> str | None:
    """Why reference log-probs cannot be kept across epochs for this run (None: they can)."""
    return recipe_reason(recipe, base.config) or \
        ("trl's precompute_ref_log_probs gives them" if trainer.precompute_ref_logps else None) or \
        ("sync_ref_model: the reference moves" if getattr(trainer.args, "sync_ref_model", False) else None)


def recipe_reason(recipe, config) -> str | None:
    """What in the recipe or the model's config keeps the cache off (the preflight asks it before anything loads)."""
    t = recipe.train
    if t.ref_logps_cache is False:
        return "ref_logps_cache: false"
    if not t.fast_path:
        return "fast_path: false (trl's own loss)"
    if t.loss_type != "sigmoid":
        return f"trl's loss: loss_type {t.loss_type}"
    if t.dpo_extra.get("precompute_ref_log_probs"):
        return "trl's precompute_ref_log_probs gives them"
    if t.dpo_extra.get("sync_ref_model"):
        return "sync_ref_model: the reference moves"
    cfg = config.get_text_config()
    dropout = {k: getattr(cfg, k) for k in DROPOUT_KEYS if isinstance(getattr(cfg, k, None), (int, float))
               and getattr(cfg, k) > 0}
    if dropout:
        return f"the model has dropout ({', '.join(f'{k}={v}' for k, v in dropout.items())}): its reference " \
               "forward is random in training mode"
    return None


def add_rows(dataset):
    """The train set with its row index as a column (the collator passes it on)."""
    if COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(COLUMN, list(range(len(dataset))))


def batch_rows(examples: list[dict]) -> dict:
    """The collator's part: the micro-batch's rows, as a tensor for the device and a list for the host."""
    rows = [int(e[COLUMN]) for e in examples]
    return {"ref_rows": torch.tensor(rows, dtype=torch.long), "ref_rows_host": rows}


class RefLogpsCache:
    def __init__(self, rows: int, device, per_batch: bool, key_parts: dict, dataset):
        self.values = torch.full((rows, 2), -math.inf, dtype=torch.float32, device=device)
        self.held = torch.zeros(rows, dtype=torch.bool)  # host: rows whose values every rank holds
        self.complete = False
        self.per_batch = per_batch
        self.used, self.computed = 0, 0  # micro-steps that read the cache / ran the reference
        self._key_parts, self._dataset, self._key = key_parts, dataset, None

    def lookup(self, inputs: dict):
        """(reference chosen, reference rejected) log-probs of the micro-batch, or None: run the reference."""
        rows = inputs.get("ref_rows_host")
        if rows is None:
            return None
        ready = self.complete or (self.per_batch and bool(self.held[rows].all()))
        if not ready:
            self.computed += 1
            return None
        self.used += 1
        v = self.values.index_select(0, inputs["ref_rows"])
        return v[:, 0], v[:, 1]

    def store(self, inputs: dict, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        rows = inputs.get("ref_rows")
        if rows is not None:
            self.values.index_copy_(0, rows, torch.stack([chosen, rejected], dim=1).detach().float())

    def share(self) -> None:
        """Every rank, at the same point: each takes the values the others computed (one all-reduce, one host copy)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.values, op=dist.ReduceOp.MAX)  # -inf where a rank has none
        self.held = torch.isfinite(self.values).all(dim=1).cpu()
        self.complete = bool(self.held.all())

    @property
    def key(self) -> str:
        """What the values depend on: the model, the reference, the truncation and every token of the train set."""
        if self._key is None:
            h = hashlib.sha256(json.dumps(self._key_parts, sort_keys=True, default=str).encode())
            h.update(_tokens_digest(self._dataset))
            self._key = h.hexdigest()
        return self._key

    def save(self, directory: Path) -> None:
        torch.save({"format": 1, "key": self.key, "values": self.values.cpu()}, directory / FILE)

    def load(self, directory: Path) -> str | None:
        """Read a checkpoint's values on every rank; returns why they were not taken (None: taken). Every rank takes
        them or none does (one all-reduce): ranks that disagreed would not run the same reference forwards."""
        why = self._readable(directory)
        if _agree(why is None, self.values.device):
            state = torch.load(directory / FILE, map_location="cpu", weights_only=True)
            self.values.copy_(state["values"].to(self.values.device))
            self.held = torch.isfinite(self.values).all(dim=1).cpu()
            self.complete = bool(self.held.all())
            return None
        return why or "another rank could not read them"

    def _readable(self, directory: Path) -> str | None:
        path = directory / FILE
        if not path.is_file():
            return "the checkpoint has none"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file costs one epoch's reference forwards, not the run
            return f"{FILE} cannot be read ({type(e).__name__})"
        if not isinstance(state, dict) or not isinstance(state.get("values"), torch.Tensor):
            return f"{FILE} holds no values"
        if state.get("key") != self.key or tuple(state["values"].shape) != tuple(self.values.shape):
            return "they were computed for another model, data or truncation"
        return None


def _agree(ok: bool, device) -> bool:
    """Whether `ok` holds on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _tokens_digest(dataset) -> bytes:
    """A digest of every token of the train set's three columns, read as Arrow batches (never a Python list per row)."""
    import pyarrow.compute as pc

    h = hashlib.sha256(str(len(dataset)).encode())
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=50_000):
        for k in columns:
            h.update(pc.list_value_length(batch[k]).to_numpy(zero_copy_only=False).tobytes())
            h.update(pc.list_flatten(batch[k]).to_numpy(zero_copy_only=False).tobytes())
    return h.digest()


def key_parts(trainer, base) -> dict:
    """The run's settings the reference log-probs depend on, besides the tokens."""
    a = trainer.args
    ref = trainer.ref_model
    peft_config = getattr(trainer.model, "peft_config", None) or {}
    if ref is not None:
        reference = getattr(ref, "name_or_path", type(ref).__name__)
    elif "ref" in peft_config:  # a reference adapter of its own (trl's "ref" adapter): its settings say which
        reference = "adapter 'ref': " + json.dumps(peft_config["ref"].to_dict(), sort_keys=True, default=str)
    else:
        reference = "adapter off"
    return {"model": getattr(base, "name_or_path", None), "config": base.config.to_json_string(use_diff=False),
            "reference": reference, "padding_free": getattr(a, "padding_free", None),
            "max_length": a.max_length, "truncation_mode": a.truncation_mode, "bf16": a.bf16, "fp16": a.fp16,
            "pad_to_multiple_of": a.pad_to_multiple_of}


def share_at_epoch_end(cache: RefLogpsCache):
    """A TrainerCallback: at each epoch's end (every rank reaches it) the ranks share what they computed."""
    from transformers import TrainerCallback

    class ShareAtEpochEnd(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            cache.share()

    return ShareAtEpochEnd()
