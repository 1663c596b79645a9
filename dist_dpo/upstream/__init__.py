"""Every private name of trl, transformers, peft, accelerate, DeepSpeed and torch that dist-dpo relies on, in one list.
The module globals it swaps for one call are in `swaps.py` beside this file.

dist-dpo stays thin over these libraries, but a few things can only be done through their internals: a Trainer
method overridden (there is no hook), a private constant read (trl's tiling), a module global swapped for one call.
A name that moves in a new release would break a run silently, in training; here it breaks
`tests/test_upstream_contract.py` instead, which resolves every entry at the installed versions and checks the
parameters dist-dpo passes or receives. A new use of an upstream internal is added here with what it is for;
`tests/test_upstream_contract.py` also scans the package for private names that are not listed.

`written_for` is the release each entry was written and tested against (constraints.txt pins them for CI).
`python -m dist_dpo.upstream` prints what is missing or changed at the installed versions.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

TRL, TRANSFORMERS, PEFT, DEEPSPEED, TORCH = "trl 1.16", "transformers 5.17", "peft 0.21", "deepspeed 0.19", "torch 2.13"


@dataclass(frozen=True)
class Internal:
    target: str  # "package.module:Object.attribute"
    use: str  # override (a method of a mixin of DistDPOTrainer) | import | read | write | swap (set for one call)
    used_by: str  # the dist-dpo module
    why: str
    written_for: str
    params: tuple[str, ...] = ()  # leading parameters the code passes or receives, in order ("self" included)
    set_by_source: bool = False  # an instance attribute: checked by its assignment in the owner class's source

    @property
    def name(self) -> str:
        return self.target.rsplit(".", 1)[-1].rsplit(":", 1)[-1]


INTERNALS: tuple[Internal, ...] = (
    # --- Trainer methods overridden by DistDPOTrainer's mixins (no hook exists for what they do) ---
    Internal("transformers:Trainer._save_checkpoint", "override", "checkpoints.py, trainer.py",
             "save into a staging directory, then publish atomically; the reference log-probs go with it",
             TRANSFORMERS, ("self", "model", "trial")),
    Internal("transformers:Trainer._get_output_dir", "override", "checkpoints.py",
             "where _save_checkpoint writes: the staging directory while it runs", TRANSFORMERS, ("self", "trial")),
    Internal("transformers:Trainer._load_optimizer_and_scheduler", "override", "checkpoints.py, portable.py",
             "CPU ranks named 'cpu:0' cannot map_location; portable resume loads its own state", TRANSFORMERS,
             ("self", "checkpoint")),
    Internal("transformers:Trainer._load_from_checkpoint", "override", "portable.py",
             "portable resume loads the adapter with its optimizer state", TRANSFORMERS,
             ("self", "resume_from_checkpoint", "model")),
    Internal("transformers:Trainer._load_rng_state", "override", "portable.py",
             "portable resume restores the RNG of the rank it runs as", TRANSFORMERS, ("self", "checkpoint")),
    Internal("transformers:Trainer._get_train_sampler", "override", "trainer.py",
             "pairs grouped by length (the speed path)", TRANSFORMERS, ("self", "train_dataset")),
    Internal("transformers:Trainer._save", "read", "checkpoints.py",
             "ZeRO-1/2 adapters saved from the model as under DDP", TRANSFORMERS, ("self", "output_dir")),
    Internal("trl:DPOTrainer._prepare_dataset", "override", "data.py",
             "every rank tokenizes its part of the data at once", TRL,
             ("self", "dataset", "processing_class", "args", "dataset_name")),
    Internal("trl:DPOTrainer._set_signature_columns_if_needed", "override", "trainer.py",
             "the train set's row index reaches the collator (reference log-probs kept across epochs)", TRL, ("self",)),
    Internal("transformers:Trainer._signature_columns", "read", "trainer.py",
             "the columns the Trainer keeps; the row index is added to trl's", TRANSFORMERS, set_by_source=True),
    Internal("trl:DPOTrainer._compute_loss", "read", "config.py",
             "its branches are the recipe's loss_type choices (the contract test checks each one)", TRL),
    # --- Trainer state read or written ---
    Internal("transformers:Trainer._train_batch_size", "write", "trainer.py",
             "the Trainer copies the batch size at construction; merged micro-batches update the copy", TRANSFORMERS,
             set_by_source=True),
    Internal("trl:DPOTrainer._metrics", "read", "speed/loss.py",
             "the speed path's loss appends the values trl's own loss would log", TRL, set_by_source=True),
    Internal("trl:DPOTrainer._total_train_tokens", "read", "speed/loss.py", "trl's token count, kept as trl keeps it",
             TRL, set_by_source=True),
    Internal("trl:DPOTrainer._tp_size", "read", "speed/loss.py", "trl's token count divides by it", TRL,
             set_by_source=True),
    Internal("trl:DPOTrainer._is_vision_dataset", "read", "speed/loss.py", "the speed path's loss takes text pairs only", TRL,
             set_by_source=True),
    Internal("transformers.integrations.deepspeed:_hf_deepspeed_config_weak_ref", "swap", "upstream/swaps.py",
             "unset while a model is built on one rank only (inside ZeRO-3's Init it would wait for the others)",
             TRANSFORMERS),
    # --- module globals swapped for the length of one call ---
    Internal("trl.trainer.dpo_trainer:global_then_local_main_first", "swap", "upstream/swaps.py, data.py",
             "off while every rank tokenizes its own part", TRL),
    Internal("transformers.trainer:deepspeed_load_checkpoint", "swap", "upstream/swaps.py",
             "off while a portable resume loads its own state", TRANSFORMERS, ("deepspeed_engine", "checkpoint_path")),
    Internal("transformers:Trainer._prepare_for_training", "read", "upstream/swaps.py",
             "it calls deepspeed_load_checkpoint on a resume: the swap must wrap it", TRANSFORMERS),
    Internal("torch:load", "swap", "upstream/swaps.py", "map_location 'cpu' for a CPU rank named 'cpu:0'", TORCH),
    # --- trl's fused log-prob head, fed dist-dpo's rows ---
    Internal("trl.trainer.utils:_CHUNKED_LOGPROB_CHUNK_SIZE", "import", "speed/head.py",
             "the vocabulary chunk trl's head uses (same numbers as trl)", TRL),
    Internal("trl.trainer.utils:maybe_gather_lm_head_ctx", "import", "speed/head.py",
             "the LM head gathered under ZeRO-3 as trl gathers it", TRL),
    Internal("trl.trainer.utils:FusedCausalLMOutput", "import", "speed/head.py", "trl's output type of the head", TRL),
    Internal("trl.trainer.utils:use_adapter", "import", "speed/loss.py",
             "the reference forward with the adapter off, as trl does it", TRL, ("model", "adapter_name")),
    Internal("trl.kernels:ChunkedLogProbFunction", "import", "speed/head.py", "trl's log-prob kernel", TRL),
    Internal("trl.kernels.chunked_logprob:TOKEN_CHUNK_SIZE", "import", "speed/logprob.py", "trl's token tiling", TRL),
    Internal("trl.kernels.chunked_logprob:_addmm_fp32", "import", "speed/logprob.py",
             "trl's fp32-accumulating matmul (same rounding as trl)", TRL),
    Internal("trl.data_utils:common_prefix_length", "import", "data.py", "the prompt shared by chosen and rejected",
             TRL),
    # --- transformers' attention and masks, for shared and packed rows ---
    Internal("transformers.masking_utils:_preprocess_mask_arguments", "read", "speed/head.py",
             "a 4-D mask passes through every mask builder unchanged", TRANSFORMERS),
    Internal("transformers.configuration_utils:PretrainedConfig._attn_implementation", "read",
             "speed/attention.py, speed/__init__.py", "which attention kernel the model runs", TRANSFORMERS),
    Internal("transformers:PreTrainedModel._from_config", "read", "model_zoo.py",
             "random-weight models of real architectures", TRANSFORMERS, ("config",)),
    Internal("transformers:PreTrainedModel._init_weights", "read", "model_zoo.py",
             "the architecture's own initialisation, module by module", TRANSFORMERS, ("self", "module")),
    Internal("torch:ops.aten._flash_attention_forward", "read", "speed/attention.py",
             "flash attention's variable-length kernel with grouped K/V heads", TORCH),
    Internal("torch:ops.aten._flash_attention_backward", "read", "speed/attention.py",
             "its backward", TORCH),
    # --- DeepSpeed's ZeRO optimizer, for the portable checkpoint ---
    Internal("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state",
             "read", "portable.py", "the optimizer state exists before a portable resume writes into it",
             DEEPSPEED, ("self",)),
    Internal("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer._hp_optimizer_states_linked", "read",
             "portable.py", "whether that state exists yet", DEEPSPEED, set_by_source=True),
)


def resolve(target: str):
    """The object `target` names ("module:Attr.attr"), importing the module; AttributeError/ImportError if gone."""
    module, _, path = target.partition(":")
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def problem(entry: Internal) -> str | None:
    """What is wrong with `entry` at the installed versions, in one line; None when it holds."""
    where = f"{entry.target} ({entry.use} in dist_dpo/{entry.used_by}, written for {entry.written_for})"
    if entry.set_by_source:
        owner_target, _, attr = entry.target.rpartition(".")
        try:
            owner = resolve(owner_target)
            source = inspect.getsource(inspect.getmodule(owner))
        except (ImportError, AttributeError, OSError, TypeError) as e:
            return f"{where}: cannot read its owner: {e}"
        return None if f"self.{attr}" in source or f".{attr} =" in source else f"{where}: no longer set by its owner"
    try:
        obj = resolve(entry.target)
    except (ImportError, AttributeError) as e:
        return f"{where}: missing ({type(e).__name__}: {e})"
    if entry.params:
        try:
            names = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError) as e:
            return f"{where}: no signature to check ({e})"
        first = names[:len(entry.params)]
        if entry.params[0] not in ("self", "cls") and names[:1] in (("self",), ("cls",)):
            first = names[1:len(entry.params) + 1]
        if first != entry.params:
            return f"{where}: parameters are now {names}, dist-dpo relies on {entry.params}"
    return None


def problems() -> list[str]:
    return [p for p in map(problem, INTERNALS) if p]
