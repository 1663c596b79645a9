"""`dist-dpo merge RUN_OR_ADAPTER_DIR --out DIR`: fold the LoRA adapter into its base and save a plain model.

The base is loaded UNQUANTIZED (bf16 on GPU, fp32 on CPU) even when the run was QLoRA: merging into 4-bit weights
would round the update away, so the adapter goes into the dequantized base. peft's merge_and_unload does the merge.
Before anything is kept the command checks that the merged model gives the same logits as base + adapter on a few
bundled prompts, then that the saved files load with plain transformers and give them again. --out is written
through a temp dir and renamed into place: it is complete or absent, never half-written.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from pathlib import Path

import torch

from dist_dpo.errors import UserError
from dist_dpo.run_artifacts import RECIPE_FILE, CommandParser, locate

# A few prompts in the languages of the bundled data; any text works, these also exercise the chat template.
PROBE_PROMPTS = ("你好，帮我写一首诗", "What's the best way to improve my posture?", "学Excel的时候最容易犯什么错误？")
# max |logit diff| / max |logit| allowed: fp32 merges are exact up to summation order; bf16/fp16 round the merged
# weight once (a relative error of ~2^-8 per weight).
DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def build_parser() -> CommandParser:
    p = CommandParser(prog="dist-dpo merge", description="Merge a LoRA adapter into its base and verify the result.")
    p.add_argument("path", help="Run dir (train output_dir) or adapter dir.")
    p.add_argument("--out", required=True, help="New directory for the merged model (must not exist or be empty).")
    p.add_argument("--base", help="Base model (default: the one the run trained on).")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="Merged weights dtype: auto is bf16 on GPU, fp32 on CPU.")
    p.add_argument("--max_shard_size", default="5GB", help="Largest safetensors shard, e.g. 2GB or 500MB.")
    p.add_argument("--tolerance", type=float,
                   help="Largest accepted max|logit diff| / max|logit| (default: 1e-4 fp32, 3e-2 bf16, 1e-2 fp16).")
    return p


def check_args(a, out: Path) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(a.max_shard_size)
    except ValueError:
        raise UserError(f"--max_shard_size '{a.max_shard_size}' is not a size: write e.g. 5GB or 500MB") from None
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file: choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out '{out}' already exists and is not empty: choose a new directory (nothing was written)")


def probe_inputs(tok, system: str | None) -> list[torch.Tensor]:
    ids = []
    for text in PROBE_PROMPTS:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        if getattr(tok, "chat_template", None):
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        else:
            enc = tok(text, return_tensors="pt")
        ids.append(enc["input_ids"])
    return ids


@torch.no_grad()
def logits_of(model, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids.to(model.device)).logits.float().cpu() for ids in probes]


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> tuple[float, float]:
    """(max |diff|, max |diff| / max |reference|)."""
    diff = max((a - b).abs().max().item() for a, b in zip(reference, other))
    scale = max(a.abs().max().item() for a in reference)
    return diff, diff / max(scale, 1e-12)


def model_card(art, base_path: str, dtype: torch.dtype, checks: dict, shards: int) -> str:
    r = art.recipe
    recipe_lines = []
    if r is not None:
        m, lo, d, t = r.model, r.lora, r.data, r.train
        quant = "4-bit NF4 (QLoRA)" if m.load_in_4bit else "8-bit" if m.load_in_8bit else "none"
        recipe_lines = [
            "## Training recipe",
            "",
            f"- base model: `{m.model_name_or_path}`, quantization during training: {quant}",
            f"- LoRA: r={lo.lora_r}, alpha={lo.lora_alpha}, dropout={lo.lora_dropout}, "
            f"targets={', '.join(lo.lora_target_modules)}",
            f"- data: `{d.dataset_name}` (train split `{d.train_split}`), system prompt: {d.system_prompt or '(none)'}",
            f"- DPO: loss {t.loss_type}, beta {t.beta}, learning rate {t.learning_rate} ({t.lr_scheduler_type}), "
            f"max_steps {t.max_steps}, epochs {t.num_train_epochs}, batch {t.per_device_train_batch_size} per "
            f"device x {t.gradient_accumulation_steps} accumulation, max_length {t.max_length}, seed {t.seed}",
            f"- the full resolved recipe is in `{RECIPE_FILE}` next to this card",
            "",
        ]
        if m.load_in_4bit or m.load_in_8bit:
            recipe_lines[-1:-1] = [
                "- the adapter was trained on a quantized base; it is merged here into the unquantized base "
                "(never into 4-bit weights, which would round the update away)"
            ]
    return "\n".join([
        "---",
        f"base_model: {r.model.model_name_or_path if r else base_path}",
        "library_name: transformers",
        "tags: [dpo, lora, merged, dist-dpo]",
        "---",
        "",
        f"# {Path(str(art.path)).name} (merged)",
        "",
        f"A LoRA adapter trained with DPO by dist-dpo, merged into its base `{base_path}` with peft "
        f"`merge_and_unload`. Weights: {str(dtype).removeprefix('torch.')}, {shards} safetensors shard(s).",
        "",
        *recipe_lines,
        "## Verification (done by `dist-dpo merge`)",
        "",
        f"Logits on {len(PROBE_PROMPTS)} bundled prompts, max |difference| (relative to max |logit|):",
        f"- merged vs base + adapter: {checks['merged'][0]:.3g} ({checks['merged'][1]:.3g})",
        f"- reloaded from these files with plain transformers vs base + adapter: {checks['reloaded'][0]:.3g} "
        f"({checks['reloaded'][1]:.3g})",
        f"- tolerance: {checks['tolerance']:.3g} (relative)",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "or `dist-dpo chat PATH`.",
        "",
    ])


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    out = Path(a.out).expanduser().resolve()
    check_args(a, out)
    art = locate(a.path)
    if art.adapter_dir is None:
        raise UserError(f"{art.path} holds a full model, not a LoRA adapter: there is nothing to merge")

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_dpo.run_artifacts import (check_adapter_fits, inference_device_dtype, load_base, load_tokenizer_for,
                                        resolve_base)

    device, dtype = inference_device_dtype(a.dtype)  # bf16 on GPU, fp32 on CPU: never the 4-bit of a QLoRA run
    tolerance = a.tolerance if a.tolerance is not None else DEFAULT_TOLERANCE[dtype]
    base_path = resolve_base(art, a.base)
    trust = bool(art.recipe and art.recipe.model.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the config of base '{base_path}': {str(e).splitlines()[0]}") from None
    if getattr(config, "quantization_config", None):
        raise UserError(f"base '{base_path}' is stored quantized; merging needs the unquantized original: pass it "
                        "with --base")
    model = load_base(base_path, dtype=dtype, device=device, trust_remote_code=trust)  # never quantized
    check_adapter_fits(art.adapter_dir, model)
    model = PeftModel.from_pretrained(model, str(art.adapter_dir))
    tok = load_tokenizer_for(art, base_path)
    probes = probe_inputs(tok, art.system_prompt)
    reference = logits_of(model, probes)

    merged = model.merge_and_unload()
    checks = {"merged": compare(reference, logits_of(merged, probes)), "tolerance": tolerance}
    print(f"merge check: merged vs base + adapter, max |logit diff| {checks['merged'][0]:.3g} "
          f"(relative {checks['merged'][1]:.3g}, tolerance {tolerance:.3g})", file=sys.stderr)
    if checks["merged"][1] > tolerance:
        raise UserError(f"merge check FAILED: merged logits differ from base + adapter by {checks['merged'][0]:.3g} "
                        f"(relative {checks['merged'][1]:.3g} > {tolerance:.3g}); nothing was written. Try --dtype "
                        "float32")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        merged.save_pretrained(tmp, max_shard_size=a.max_shard_size)
        tok.save_pretrained(tmp)
        del merged, model
        # What users will do: load the files with plain transformers, no peft, no dist-dpo.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, trust_remote_code=trust).to(device)
        checks["reloaded"] = compare(reference, logits_of(reloaded, probes))
        del reloaded
        print(f"merge check: reloaded from disk vs base + adapter, max |logit diff| {checks['reloaded'][0]:.3g} "
              f"(relative {checks['reloaded'][1]:.3g})", file=sys.stderr)
        if checks["reloaded"][1] > tolerance:
            raise UserError(f"merge check FAILED after saving: the saved files reload with logits off by "
                            f"{checks['reloaded'][0]:.3g}; nothing was kept in {out}")
        shards = len(list(tmp.glob("*.safetensors")))
        if art.recipe is not None:
            shutil.copy2(art.path / RECIPE_FILE, tmp / RECIPE_FILE)
        (tmp / "README.md").write_text(model_card(art, base_path, dtype, checks, shards), encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty (checked above); os.replace wants it gone
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged model: {out} ({shards} safetensors shard(s), {str(dtype).removeprefix('torch.')})")
    return 0
