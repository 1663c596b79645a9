"""Every module global of an upstream library that dist-dpo swaps, each for the length of one call (a context
manager that restores exactly what it found, so nesting and repeating are safe). Each is listed in
dist_dpo/upstream/__init__.py with the release it was written against; tests/test_upstream_contract.py fails the
day a name moves."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def zero3_init_off():
    """transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref unset (transformers 5.17): build a model as
    if ZeRO-3 were off. Once the DPOConfig registered a ZeRO-3 config, transformers builds every model inside
    deepspeed.zero.Init, which broadcasts each parameter from rank 0: a model built on ONE rank only (the meta
    skeleton of the preflight, the built-in model) would wait forever for peers that never join."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref  # transformers has set/unset but no getter; restore exactly
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


@contextlib.contextmanager
def deepspeed_resume_load_off():
    """transformers.trainer.deepspeed_load_checkpoint a no-op (transformers 5.17): Trainer._prepare_for_training calls
    it on every resume under DeepSpeed, and it raises without the checkpoint's `global_step*/` folder (one written
    under another strategy) or loads per-partition files of another world size. A portable resume loads its own
    state in `_load_optimizer_and_scheduler`, which runs right after (dist_dpo/portable.py)."""
    import transformers.trainer as hf

    native = hf.deepspeed_load_checkpoint
    hf.deepspeed_load_checkpoint = lambda *args, **kwargs: None
    try:
        yield
    finally:
        hf.deepspeed_load_checkpoint = native


@contextlib.contextmanager
def torch_load_on_cpu():
    """torch.load with map_location "cpu" where it was asked for a CPU device with an index (torch 2.13): accelerate
    names a multi-process CPU rank's device "cpu:0", which torch.load cannot map to ("don't know how to restore data
    location"), so a CPU run could not load its optimizer state. Plain "cpu" is the same memory."""
    import torch

    load = torch.load

    def load_on_cpu(*args, **kwargs):
        if isinstance(kwargs.get("map_location"), torch.device) and kwargs["map_location"].type == "cpu":
            kwargs["map_location"] = "cpu"
        return load(*args, **kwargs)

    torch.load = load_on_cpu
    try:
        yield
    finally:
        torch.load = load


@contextlib.contextmanager
def trl_tokenize_order_off():
    """trl.trainer.dpo_trainer.global_then_local_main_first a null context (trl 1.16): trl tokenizes on the main
    process first and then on the others; while every rank tokenizes its own part of an in-memory dataset
    (dist_dpo/data.py), none waits for another. Yields False where trl has no such name (then trl's own order runs)."""
    import trl.trainer.dpo_trainer as dpo_module

    ordered = getattr(dpo_module, "global_then_local_main_first", None)
    if ordered is None:
        yield False
        return
    dpo_module.global_then_local_main_first = contextlib.nullcontext
    try:
        yield True
    finally:
        dpo_module.global_then_local_main_first = ordered
