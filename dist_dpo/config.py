"""The recipe: typed dataclasses whose `help` metadata is the documentation, read from a YAML file plus
`--key value` overrides on the command line.

A recipe YAML has four sections (`model`, `lora`, `data`, `train`); on the command line every key is flat
(`--learning_rate 1e-5`) because key names are unique across sections. An unknown or mistyped key, a value of the
wrong type or out of range is a `UserError` naming the key, the file and a likely fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_dpo.errors import UserError

BUILTIN_MODEL = "builtin:tiny-qwen2"
BUILTIN_DATASET = "builtin:bad-boy"


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArgs:
    model_name_or_path: str = _f(
        BUILTIN_MODEL,
        "Local path or hub id of the base model. 'builtin:tiny-qwen2' is a tiny random-weight Qwen2 built offline; "
        "builtin:tiny-<model_type> (tiny-llama, tiny-gemma3_text, ...: dist-dpo build-model --list) one of another family.",
    )
    tokenizer_name_or_path: str | None = _f(None, "Tokenizer path if it differs from the model's.")
    trust_remote_code: bool = _f(False, "Allow custom modeling code shipped with the model.")
    attn_implementation: str = _f("sdpa", "Attention kernel: sdpa, eager or flash_attention_2.", choices=("sdpa", "eager", "flash_attention_2"))
    dtype: str = _f(
        "auto",
        "Weights/compute dtype: auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), bfloat16, float16, float32.",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    load_in_4bit: bool = _f(False, "QLoRA: load the base model in 4-bit NF4 (bitsandbytes).")
    load_in_8bit: bool = _f(False, "Load the base model in 8-bit (bitsandbytes LLM.int8). Not with FSDP.")
    bnb_4bit_quant_type: str = _f("nf4", "4-bit data type: nf4 or fp4.", choices=("nf4", "fp4"))
    bnb_4bit_use_double_quant: bool = _f(True, "Quantize the quantization constants too (saves ~0.4 bit/param).")


@dataclass
class LoraArgs:
    use_peft: bool = _f(True, "Train a LoRA adapter (True) or all weights (False; not with 4/8-bit).")
    lora_r: int = _f(8, "LoRA rank.", min=1)
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r).", min=1)
    lora_dropout: float = _f(0.1, "Dropout on the LoRA input.", min=0.0, max=0.99)
    lora_target_modules: list[str] = _f(
        ["q_proj", "v_proj"], "Module names to adapt (comma-separated on the CLI), or 'all-linear'."
    )


@dataclass
class DataArgs:
    dataset_name: str = _f(
        BUILTIN_DATASET,
        "Hub id, local dir or json/jsonl/csv/parquet file of preference data. 'builtin:bad-boy' is the bundled set.",
    )
    dataset_config: str | None = _f(
        None, "Dataset configuration name: a hub set's, or one a local dir's README.md declares (datasets' `name`).")
    data_files: dict | None = _f(
        None,
        "Which files make each split, where datasets cannot tell from the layout: {train: data/train-*.parquet, "
        "test: data/test-*.parquet} (globs relative to a local dataset_name dir; datasets' `data_files`). With "
        "dataset_name json, csv or parquet the files alone are the set.",
    )
    train_split: str = _f("train", "Split to train on (e.g. train_prefs for UltraFeedback).")
    test_split: str = _f("test", "Split to evaluate on; made from train (test_size) when the data has none.")
    test_size: float = _f(0.1, "Fraction of train held out when the data has no test split.", min=0.01, max=0.5)
    system_prompt: str | None = _f(None, "System prompt put before every prompt when the chat template is applied.")
    apply_chat_template: bool = _f(
        True,
        "Turn plain prompt/chosen/rejected strings into chat messages so the tokenizer's chat template is used.",
    )
    max_train_samples: int | None = _f(None, "Use only the first N training rows.", min=1)
    max_eval_samples: int | None = _f(None, "Use only the first N test rows.", min=1)


@dataclass
class TrainArgs:
    output_dir: str = _f("outputs/run", "Where checkpoints, the adapter, logs and metrics go.")
    num_train_epochs: float = _f(1.0, "Epochs over the training split.", min=0.0)
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: use num_train_epochs).")
    per_device_train_batch_size: int = _f(4, "Preference pairs per process per micro-step.", min=1)
    per_device_eval_batch_size: int = _f(4, "Preference pairs per process per eval step.", min=1)
    gradient_accumulation_steps: int = _f(4, "Micro-steps per optimizer step.", min=1)
    learning_rate: float = _f(1e-5, "Peak learning rate.", min=0.0)
    lr_scheduler_type: str = _f("linear", "transformers scheduler name (linear, cosine, constant ...).")
    warmup_ratio: float = _f(0.0, "Fraction of steps spent warming up (0 <= r < 1).", min=0.0, max=0.99)
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.", min=0.0)
    optim: str = _f("adamw_torch", "Optimizer (adamw_torch, paged_adamw_8bit, adamw_torch_fused ...).")
    beta: float = _f(0.1, "DPO temperature beta: how far the policy may move from the reference.", min=0.0)
    loss_type: str = _f(
        "sigmoid", "DPO loss: sigmoid is the original DPO.",
        # the branches of trl 1.16's DPOTrainer._compute_loss; checked here so a typo fails before the model loads
        choices=("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                 "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft"),
    )
    max_length: int = _f(1024, "Truncate prompt+answer to this many tokens.", min=8)
    gradient_checkpointing: bool | str = _f(
        "auto",
        "Recompute activations in backward to save memory (a third more compute). auto: only as many layers as the "
        "memory plan (dist-dpo plan) says this GPU needs for the longest batch of the data; true; false.",
        bool_or_auto=True,
    )
    merge_micro_batches: bool | str = _f(
        "auto",
        "Run per_device_train_batch_size x gradient_accumulation_steps as ONE micro-batch per optimizer step (the "
        "same pairs, the same mean loss and gradient; fewer, fuller GPU steps). auto: when the memory plan says it "
        "fits with no more gradient checkpointing than the recipe's batch (not under DeepSpeed); true; false.",
        bool_or_auto=True,
    )
    gpu_memory_gib: float | None = _f(
        None,
        "Treat each GPU as having this many GiB: the memory plan (gradient_checkpointing: auto) plans for it and "
        "this process's CUDA allocations are capped there, so a run proven on a big card fits the small one (e.g. "
        "12). Unset: the GPU's own memory.",
        min=1.0,
    )
    fast_path: bool = _f(
        True,
        "dist-dpo's speed path over trl (same loss): length-grouped batches, prompts computed once, metrics synced "
        "once per log. false: plain trl DPOTrainer (for comparisons).",
    )
    speed_self_check: bool = _f(
        True,
        "Before the first step, run a few pairs of the data through the speed path AND through trl's exact path on "
        "this very model and compare log-probs and LoRA gradients (bounds that know bf16). On disagreement: one "
        "line naming the piece, then training on trl's exact path (exit 2 if the recipe forced that piece with "
        "true). Costs about one step.",
    )
    group_by_length: bool = _f(
        True,
        "Batch pairs of similar length together so little compute goes to padding.",
    )
    balance_ranks: bool = _f(
        False,
        "Several GPUs with group_by_length: true splits each step's pairs across ranks by padded cost (fewer long "
        "pairs, more short ones; the loss is the same mean). false: the same number of pairs on every rank. It helps "
        "where one step mixes very long and very short pairs, so that one rank would wait for the others; on short, "
        "similar pairs it costs more than it saves (the `balance` row of benchmarks/throughput.py).",
    )
    prefix_sharing: bool | str = _f(
        "auto",
        "Run chosen and rejected in one row that computes their prompt once (exact: same log-probs). auto: per "
        "batch, when cheaper than trl's two padded rows; needs attn_implementation sdpa or eager.",
        bool_or_auto=True,
    )
    packed_rows: bool | str = _f(
        "auto",
        "With prefix_sharing: pack a micro-batch's pairs into one row without padding, attention in per-pair "
        "segments through flash attention's variable-length kernel (no mask: sdpa stays on a flash kernel). auto: "
        "where that kernel passes a one-off check on this GPU and the model family allows it (bf16/fp16); true: stop with "
        "the reason if it cannot; false: padded shared rows with a 4-D mask.",
        bool_or_auto=True,
    )
    ref_logps_cache: bool | str = _f(
        "auto",
        "With the speed path: keep each pair's reference log-probs from the first epoch (its own reference forward, "
        "no separate pass) and skip the reference forward in later epochs and after a resume (checkpoints carry "
        "them). auto: wherever the reference is fixed (not with sync_ref_model or a model with dropout); true: stop "
        "with the reason if it cannot; false: the reference forward every step, as trl does.",
        bool_or_auto=True,
    )
    liger_kernels: bool | str = _f(
        "auto",
        "liger-kernel's fused SwiGLU / RoPE (trl's use_liger_kernel; RMSNorm is torch's fused op on the speed path): "
        "less activation memory, faster layers. "
        "auto: on GPUs when the package is installed and fast_path is on.",
        bool_or_auto=True,
    )
    logging_steps: int = _f(10, "Log every N optimizer steps.", min=1)
    eval_steps: int = _f(10, "Evaluate every N optimizer steps (0: no evaluation during training).", min=0)
    save_steps: int = _f(50, "Checkpoint every N optimizer steps.", min=1)
    save_total_limit: int = _f(2, "Keep at most this many checkpoints.", min=1)
    seed: int = _f(42, "Random seed (model init, data order, dropout).")
    report_to: list[str] = _f(["tensorboard"], "Trackers: tensorboard, wandb, none (comma-separated).")
    run_name: str | None = _f(None, "Run name shown in trackers.")
    deepspeed: str | None = _f(
        None, "DeepSpeed JSON (ds_configs/*.json) for the `deepspeed`/torchrun launchers; accelerate yamls set it."
    )
    resume: str = _f("auto", "auto: resume from the last complete checkpoint in output_dir; never; or a checkpoint path.")
    overwrite_output_dir: bool = _f(False, "Allow training into an output_dir that already holds a finished run.")
    collective_timeout_s: int = _f(
        600, "Seconds a rank waits in a collective before the job fails (torch's default 1800 hides dead ranks).", min=30
    )
    same_model_check: bool = _f(
        True, "Before step 1, check with one short forward that every rank holds the same model (several processes)."
    )
    dataloader_num_workers: int = _f(0, "Data-loader worker processes per rank.", min=0)
    cpu_affinity: bool | str = _f(
        False,
        "Pin each rank to its own physical cores next to its GPU (dist_dpo/cpu_pinning.py; auto/true: when several "
        "processes share a machine's GPUs). It helps on hosts with several NUMA nodes, where a rank's kernel "
        "launches and data loading would otherwise run on cores far from its GPU; on a one-NUMA-node VM pinned ranks "
        "ran slower than unpinned ones (the `pinned` row of benchmarks/throughput.py), hence off by default.",
        bool_or_auto=True,
    )
    dpo_extra: dict = _f({}, "Any other trl DPOConfig field, e.g. {precompute_ref_log_probs: true}.")


SECTIONS: dict[str, type] = {"model": ModelArgs, "lora": LoraArgs, "data": DataArgs, "train": TrainArgs}


@dataclass
class Recipe:
    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    source: str = "defaults"  # the YAML it came from, for messages
    dry_run: bool = False  # check everything, train nothing (launch scripts run this once before the launcher)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# Resolved dist-dpo recipe (from {self.source} plus command-line overrides).\n"
        path.write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


def _key_index() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    index = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            index[f.name] = (section, f, hints[f.name])
    return index


KEYS = _key_index()


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else "; run `dist-dpo train --help` for the list"


def _base_types(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _convert(key: str, value: Any, where: str) -> Any:
    section, f, tp = KEYS[key]
    base, optional = _base_types(tp)
    bad = f"{where}: '{key}' "
    if f.metadata.get("bool_or_auto"):  # true, false or auto (YAML may give a bool or a string)
        word = str(value).strip().lower()
        if word not in ("true", "false", "auto"):
            raise UserError(bad + f"must be true or false (or auto), got {value!r}")
        return "auto" if word == "auto" else word == "true"
    if isinstance(value, str) and base is not str:
        if value.strip().lower() in ("none", "null", "~") and optional:
            return None
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if value is None:
        if optional:
            return None
        raise UserError(bad + "may not be empty")
    origin = typing.get_origin(base) or base
    if origin is bool:
        if not isinstance(value, bool):
            raise UserError(bad + f"must be true or false, got {value!r}")
    elif origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(bad + f"must be an integer, got {value!r}")
    elif origin is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string; users write it that way
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(bad + f"must be a number, got {value!r}")
        value = float(value)
    elif origin is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(bad + f"must be a string, got {value!r}")
        value = str(value)
    elif origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(bad + f"must be a list of names, got {value!r}")
    elif origin is dict:
        if not isinstance(value, dict):
            raise UserError(bad + f"must be a mapping like {{key: value}}, got {value!r}")
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise UserError(bad + f"must be one of {', '.join(meta['choices'])}, got {value!r}")
    if "min" in meta and isinstance(value, (int, float)) and value < meta["min"]:
        raise UserError(bad + f"must be >= {meta['min']}, got {value!r}")
    if "max" in meta and isinstance(value, (int, float)) and value > meta["max"]:
        raise UserError(bad + f"must be <= {meta['max']}, got {value!r}")
    return value


def _read_yaml(path: str) -> dict[str, Any]:
    from dist_dpo.packaged import resolve_recipe

    p = resolve_recipe(path)  # a file, or a packaged recipe by name
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"recipe '{path}'{line} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe '{path}' must be a mapping of sections (model, lora, data, train)")
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if section not in SECTIONS:
            if section in KEYS:  # a flat recipe is fine too
                flat[section] = body
                continue
            raise UserError(
                f"recipe '{path}': unknown section or key '{section}'" + _suggest(section, [*SECTIONS, *KEYS])
            )
        if body is None:
            continue
        if not isinstance(body, dict):
            raise UserError(f"recipe '{path}': section '{section}' must be a mapping of keys")
        for key, value in body.items():
            if key not in KEYS:
                raise UserError(f"recipe '{path}': unknown key '{key}' in section '{section}'" + _suggest(key, KEYS))
            if KEYS[key][0] != section:
                raise UserError(f"recipe '{path}': key '{key}' belongs in section '{KEYS[key][0]}', not '{section}'")
            flat[key] = value
    return flat


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2, with a suggestion
        if "unrecognized arguments" in message:
            bad = message.split(":", 1)[1].split()
            flag = next((b for b in bad if b.startswith("--")), bad[0])
            key = flag.lstrip("-").split("=")[0]
            raise UserError(f"unknown option '{flag}'" + _suggest(key, KEYS))
        raise UserError(message)


def build_parser(prog: str = "dist-dpo train") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        usage=f"{prog} --config RECIPE.yaml [--key value ...]",
        description="Train a LoRA/QLoRA DPO adapter. Values come from --config RECIPE.yaml, then the options below.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="Recipe YAML file, or a packaged recipe by name (demo, seed_lora, seed_qlora).", default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, help="Set by the deepspeed launcher; ignored.")
    parser.add_argument(
        "--dry_run", action="store_true", default=False,
        help="Check the recipe, data, tokenizer and model config in this one process, print the plan, train nothing.",
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meta = f.metadata
            extra = f" Choices: {', '.join(meta['choices'])}." if "choices" in meta else ""
            _, _, tp = KEYS[f.name]
            base, _ = _base_types(tp)
            nargs = "?" if base is bool else None  # `--load_in_4bit` alone means true
            group.add_argument(
                f"--{f.name}",
                metavar="V",
                nargs=nargs,
                const="true" if base is bool else None,
                help=f"{meta['help']}{extra} (default: {default!r})",
            )
    return parser


def parse_recipe(argv: list[str]) -> Recipe:
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    config_path = ns.pop("config", None)
    ns.pop("local_rank", None)
    dry_run = ns.pop("dry_run", False)
    values: dict[str, Any] = {}
    if config_path:
        for key, value in _read_yaml(config_path).items():
            values[key] = _convert(key, value, f"recipe '{config_path}'")
    for key, value in ns.items():
        values[key] = _convert(key, value, "command line")
    sections = {name: {} for name in SECTIONS}
    for key, value in values.items():
        sections[KEYS[key][0]][key] = value
    from dist_dpo.packaged import resolve_recipe

    source = str(resolve_recipe(config_path)) if config_path else "defaults"  # a packaged name: its file
    recipe = Recipe(**{name: SECTIONS[name](**kw) for name, kw in sections.items()}, source=source, dry_run=dry_run)
    validate(recipe)
    return recipe


def validate(r: Recipe) -> None:
    """Checks that span several keys. Single-key types and ranges are checked while parsing."""
    m, lo, t = r.model, r.lora, r.train
    if m.load_in_4bit and m.load_in_8bit:
        raise UserError("load_in_4bit and load_in_8bit are both true: choose one (4-bit is QLoRA)")
    if (m.load_in_4bit or m.load_in_8bit) and not lo.use_peft:
        raise UserError("a 4/8-bit base cannot be trained directly: keep use_peft true (LoRA on top of it)")
    if not lo.lora_target_modules:
        raise UserError("lora_target_modules is empty: name modules such as q_proj,v_proj or use all-linear")
    if "none" in t.report_to and len(t.report_to) > 1:
        raise UserError(f"report_to {t.report_to} mixes 'none' with trackers: use 'none' alone")
    unknown = set(t.report_to) - {"none", "tensorboard", "wandb"}
    if unknown:
        raise UserError(f"report_to: unknown tracker(s) {sorted(unknown)}; use tensorboard, wandb or none")
    files = r.data.data_files or {}
    for split, pattern in files.items():
        if not (isinstance(pattern, str) or isinstance(pattern, list) and all(isinstance(x, str) for x in pattern)):
            raise UserError(f"data_files: split '{split}' must name a file or glob (or a list of them), got {pattern!r}")
    if t.resume not in ("auto", "never") and not Path(t.resume).is_dir():
        raise UserError(f"resume '{t.resume}' is not a checkpoint directory; use auto, never or a checkpoint path")
    # Names transformers only checks inside DPOConfig, with an 800-character list of choices: check them here.
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    named = (("optim", t.optim, OptimizerNames), ("lr_scheduler_type", t.lr_scheduler_type, SchedulerType))
    for key, value, names in named:
        known = [n.value for n in names]
        if value not in known:
            raise UserError(f"{key} '{value}' is not one transformers knows" + _suggest(value, known))
    if t.dpo_extra:
        from trl import DPOConfig

        known = {f.name for f in dataclasses.fields(DPOConfig)}
        for key in t.dpo_extra:
            if key not in known:
                raise UserError(f"dpo_extra: '{key}' is not a trl DPOConfig field" + _suggest(key, known))
            if key in KEYS:
                raise UserError(f"dpo_extra: '{key}' is a dist-dpo key: set it directly (--{key})")
            if key == "hub_token":  # the recipe is copied into resolved_config.yaml; secrets stay in the environment
                raise UserError("dpo_extra: 'hub_token' would be written to resolved_config.yaml: set HF_TOKEN instead")
        procs = t.dpo_extra.get("dataset_num_proc")  # dist-dpo reads it too (data.py): a typo must not reach datasets
        if procs is not None and (type(procs) is not int or procs < 1):
            raise UserError(f"dpo_extra: 'dataset_num_proc' must be a whole number >= 1 (tokenizing workers), "
                            f"got {procs!r}")
