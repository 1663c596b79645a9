"""`dist-dpo eval RUN_DIR`: the base model (adapter disabled) against the tuned one on the test split.

    python -m dist_dpo eval outputs/demo                                   one process
    accelerate launch --config_file accelerate_configs/cpu.yaml -m dist_dpo eval outputs/demo    rows sharded

Per preference pair it scores log p(answer | prompt), summed over the answer tokens, under both models; rows are
sharded across ranks and gathered on global rank 0, which writes eval.json and eval.md. Metrics:
  preference accuracy    share of pairs with logp(chosen) > logp(rejected): the model's own preference, for BOTH
  logp margin            mean logp(chosen) - logp(rejected), for BOTH
  reward accuracy/margin DPO's implicit reward beta * (logp_tuned - logp_base), chosen vs rejected: TUNED only,
                         since the base is the reference (its reward is 0 by definition)
  per-token accuracy     the preference on mean per-token log-probs: summed logps favour the shorter answer
plus N side-by-side greedy generations for the same prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from dist_dpo.errors import UserError
from dist_dpo.run_artifacts import CommandParser, locate

EVAL_JSON, EVAL_MD = "eval.json", "eval.md"


def build_parser() -> CommandParser:
    p = CommandParser(prog="dist-dpo eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="Run dir (train output_dir) or adapter dir.")
    p.add_argument("--dataset", help="Preference data to use instead of the run's (same forms as dataset_name).")
    p.add_argument("--split", default="test", choices=("test", "train"),
                   help="test: the run's test split (or its held-out part, as train made it).")
    p.add_argument("--system", help="System prompt (default: the run's data.system_prompt). '' for none.")
    p.add_argument("--max_samples", type=int, help="Evaluate only the first N pairs.")
    p.add_argument("--batch_size", type=int, help="Pairs per process per forward (default: the run's eval batch).")
    p.add_argument("--generations", type=int, default=4, help="Side-by-side generations to show (0: none).")
    p.add_argument("--max_new_tokens", type=int, default=64, help="Length of each side-by-side generation.")
    p.add_argument("--base", help="Base model for the adapter (default: the one the run trained on).")
    p.add_argument("--out", help="Where eval.json / eval.md go (default: the run dir).")
    return p


def eval_recipe(art, a):
    """The run's recipe with the command-line changes; a bare adapter dir needs --dataset."""
    from dist_dpo.config import Recipe

    if art.adapter_dir is None:
        raise UserError(f"{art.path} has no adapter (adapter_config.json): eval compares an adapter against its base")
    recipe = art.recipe
    if recipe is None:
        if not a.dataset:
            raise UserError(f"{art.path} has no resolved_config.yaml, so its data is unknown: pass --dataset")
        recipe = Recipe()
        recipe.model = dataclasses.replace(recipe.model, model_name_or_path=art.adapter_base or "")
    data = recipe.data
    if a.dataset:
        data = dataclasses.replace(data, dataset_name=a.dataset)
    if a.system is not None:
        data = dataclasses.replace(data, system_prompt=a.system or None)
    if a.max_samples is not None:
        if a.max_samples < 1:
            raise UserError(f"--max_samples must be >= 1, got {a.max_samples}")
        data = dataclasses.replace(data, max_eval_samples=a.max_samples, max_train_samples=a.max_samples)
    if a.batch_size is not None and a.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {a.batch_size}")
    if a.generations < 0 or a.max_new_tokens < 1:
        raise UserError("--generations must be >= 0 and --max_new_tokens >= 1")
    return dataclasses.replace(recipe, data=data)


def eval_args(recipe, rt, out: Path, batch_size: int):
    """A DPOConfig for scoring only: trl's tokenization, collator and sharded data loader, nothing trained."""
    from trl import DPOConfig

    from dist_dpo.modeling import resolve_dtype

    dtype = resolve_dtype(recipe.model, rt)
    on_gpu = rt.device_type == "cuda"
    return DPOConfig(
        output_dir=str(out), per_device_eval_batch_size=batch_size, per_device_train_batch_size=batch_size,
        max_length=recipe.train.max_length, beta=recipe.train.beta, report_to=[], gradient_checkpointing=False,
        use_cpu=not on_gpu, bf16=on_gpu and dtype == torch.bfloat16, fp16=on_gpu and dtype == torch.float16,
        ddp_timeout=recipe.train.collective_timeout_s, seed=recipe.train.seed, disable_tqdm=True,
        log_level="warning" if rt.is_main else "error", log_level_replica="error", dataloader_num_workers=0,
    )


def load_tuned(art, recipe, rt, base_path: str):
    """The base as the run trained it (4-bit where the run was QLoRA, on GPUs) with the adapter on top."""
    from peft import PeftModel

    from dist_dpo.logs import get_logger
    from dist_dpo.modeling import load_model
    from dist_dpo.run_artifacts import check_adapter_fits
    from dist_dpo.strategies import strategy_for

    m = recipe.model
    if rt.device_type == "cpu" and (m.load_in_4bit or m.load_in_8bit):
        get_logger().warning("the run trained on a 4/8-bit base; on CPU the base is evaluated unquantized")
        m = dataclasses.replace(m, load_in_4bit=False, load_in_8bit=False)
    model = load_model(m, base_path, rt, strategy_for(rt.strategy), gradient_checkpointing=False)
    check_adapter_fits(art.adapter_dir, model)
    return PeftModel.from_pretrained(model, str(art.adapter_dir)).eval()


def completion_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, token count) of every answer in a trl preference batch ([chosen..., rejected...]).
    trl computes these inside its loss only; this is the same fused-head forward, kept per row."""
    mask = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(mask == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                use_cache=False, fused_lm_head=True)
    shifted = mask[:, 1:]
    return out.log_probs[:, -shifted.size(1):].sum(1).float(), shifted.sum(1).float()


@torch.no_grad()
def score(trainer) -> dict[str, torch.Tensor]:
    """Per-row logps of both models over this rank's shard, gathered (in dataset order) on every rank."""
    model = trainer.model
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("tc", "tr", "bc", "br", "nc", "nr")}
    for batch in trainer.get_eval_dataloader():  # accelerate's loader: this rank's rows, already on its device
        tuned, n = completion_logps(model, batch)
        with model.disable_adapter():  # the base = DPO's reference for a fresh adapter
            base, _ = completion_logps(model, batch)
        rows = trainer.accelerator.gather_for_metrics((*tuned.chunk(2), *base.chunk(2), *n.chunk(2)))
        for key, value in zip(cols, rows):
            cols[key].append(value.cpu())
    return {k: torch.cat(v) for k, v in cols.items()}


def summarize(s: dict[str, torch.Tensor], beta: float) -> dict:
    def preference(chosen, rejected, nc, nr) -> dict:
        return {
            "preference_accuracy": (chosen > rejected).float().mean().item(),
            "logp_margin": (chosen - rejected).mean().item(),
            "logps_chosen": chosen.mean().item(),
            "logps_rejected": rejected.mean().item(),
            "per_token_accuracy": (chosen / nc > rejected / nr).float().mean().item(),
        }

    base = preference(s["bc"], s["br"], s["nc"], s["nr"])
    tuned = preference(s["tc"], s["tr"], s["nc"], s["nr"])
    rc, rr = beta * (s["tc"] - s["bc"]), beta * (s["tr"] - s["br"])
    tuned.update(reward_accuracy=(rc > rr).float().mean().item(), reward_margin=(rc - rr).mean().item(),
                 rewards_chosen=rc.mean().item(), rewards_rejected=rr.mean().item())
    return {"base": base, "tuned": tuned}


@torch.no_grad()
def side_by_side(model, tok, rows, n: int, max_new_tokens: int) -> list[dict]:
    """Greedy answers of both models to the first n prompts (greedy: the comparison is repeatable)."""
    out = []
    for row in rows.select(range(min(n, len(rows)))):
        prompt = row["prompt"]
        if isinstance(prompt, list):
            ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            question = prompt[-1]["content"]
        else:
            ids, question = tok(prompt, return_tensors="pt"), prompt
        ids = {k: v.to(model.device) for k, v in ids.items()}
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=tok.pad_token_id)
        start = ids["input_ids"].shape[1]
        tuned = model.generate(**ids, **kw)[0, start:]
        with model.disable_adapter():
            base = model.generate(**ids, **kw)[0, start:]
        chosen = row["chosen"][-1]["content"] if isinstance(row["chosen"], list) else row["chosen"]
        out.append({"prompt": question, "base": tok.decode(base, skip_special_tokens=True).strip(),
                    "tuned": tok.decode(tuned, skip_special_tokens=True).strip(), "chosen": chosen})
    return out


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    art = locate(a.path)
    recipe = eval_recipe(art, a)
    out = Path(a.out).expanduser() if a.out else art.path
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file: choose a directory")

    from dist_dpo.logs import setup_console
    from dist_dpo.runtime import resolve_runtime

    rt = resolve_runtime()
    log = setup_console(rt)
    from dist_dpo.strategies import strategy_for

    if not strategy_for(rt.strategy).evaluates:  # eval replicates the model and shards rows
        raise UserError(f"eval shards rows, not weights: launch it with accelerate_configs/ddp.yaml or cpu.yaml, "
                        f"torchrun or plain python, not {rt.strategy}")
    batch_size = a.batch_size or recipe.train.per_device_eval_batch_size
    args = eval_args(recipe, rt, out, batch_size)  # before the model: it sets up the process group

    from dist_dpo.data import load_preference_data
    from dist_dpo.run_artifacts import load_tokenizer_for, resolve_base

    base_path = resolve_base(art, a.base)
    tok = load_tokenizer_for(art, base_path)
    train_rows, test_rows = load_preference_data(recipe.data, tok, recipe.train.max_length, recipe.train.seed)
    rows = test_rows if a.split == "test" else train_rows
    model = load_tuned(art, recipe, rt, base_path)  # after the data: a bad dataset fails in seconds

    from trl import DPOTrainer

    # train_dataset is required by trl; one row keeps its tokenization cheap.
    trainer = DPOTrainer(model=model, args=args, train_dataset=rows.select([0]), eval_dataset=rows,
                         processing_class=tok)
    if "ref" in model.peft_config:  # trl copies a loaded adapter as the reference; ours is the base (adapter off)
        model.delete_adapter("ref")
    log.info("eval: %d %s pairs of %s | %s | %d per process per batch", len(rows), a.split,
             recipe.data.dataset_name, rt.describe(), batch_size)
    scores = score(trainer)
    if rt.is_main:
        result = {
            "run": str(art.path), "base_model": base_path, "dataset": recipe.data.dataset_name, "split": a.split,
            "pairs": int(scores["tc"].numel()), "beta": recipe.train.beta, "world_size": rt.world_size,
            "system_prompt": recipe.data.system_prompt, **summarize(scores, recipe.train.beta),
            "definitions": DEFINITIONS,
            "generations": side_by_side(trainer.model, tok, rows, a.generations, a.max_new_tokens),
            "rows": [{k: round(v[i].item(), 4) for k, v in scores.items()} for i in range(scores["tc"].numel())],
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / EVAL_JSON).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (out / EVAL_MD).write_text(markdown(result), encoding="utf-8")
        b, t = result["base"], result["tuned"]
        log.info("preference accuracy base %.3f -> tuned %.3f | logp margin base %.2f -> tuned %.2f | "
                 "reward accuracy %.3f, reward margin %.3f (tuned vs base as reference)",
                 b["preference_accuracy"], t["preference_accuracy"], b["logp_margin"], t["logp_margin"],
                 t["reward_accuracy"], t["reward_margin"])
        log.info("wrote %s and %s", out / EVAL_JSON, out / EVAL_MD)
    trainer.accelerator.wait_for_everyone()
    return 0


DEFINITIONS = {
    "preference_accuracy": "share of pairs where the model itself gives the chosen answer a higher log-probability "
                           "(summed over answer tokens) than the rejected one",
    "logp_margin": "mean of logp(chosen) - logp(rejected), nats, summed over answer tokens",
    "logps_chosen/logps_rejected": "mean summed log-probability of the chosen / rejected answers",
    "per_token_accuracy": "preference accuracy on the mean per-token log-probability (removes the length bias of "
                          "summed log-probs)",
    "reward_accuracy": "tuned only: share of pairs where DPO's implicit reward beta*(logp_tuned - logp_base) is "
                       "higher for chosen than for rejected (trl's rewards/accuracies); the base is the reference, "
                       "so its own implicit reward is 0 for every answer",
    "reward_margin": "tuned only: mean implicit reward of chosen minus rejected (trl's rewards/margins); it equals "
                     "beta * (tuned logp_margin - base logp_margin)",
}


def markdown(r: dict) -> str:
    b, t = r["base"], r["tuned"]

    def row(name, key, fmt="{:.3f}"):
        diff = t[key] - b[key]
        return f"| {name} | {fmt.format(b[key])} | {fmt.format(t[key])} | {diff:+.3f} |"

    lines = [
        f"# Base vs tuned: {Path(r['run']).name}",
        "",
        f"{r['pairs']} preference pairs, `{r['dataset']}` [{r['split']}], base `{r['base_model']}`, "
        f"beta {r['beta']}, evaluated on {r['world_size']} process(es). System prompt: "
        f"{r['system_prompt'] or '(none)'}",
        "",
        "## The model's own preference (both models)",
        "",
        "log p(answer | prompt) summed over the answer tokens; accuracy = share of pairs with chosen > rejected.",
        "",
        "| metric | base | tuned | tuned - base |",
        "|---|---|---|---|",
        row("preference accuracy", "preference_accuracy"),
        row("logp margin (chosen - rejected)", "logp_margin", "{:.2f}"),
        row("mean logp(chosen)", "logps_chosen", "{:.2f}"),
        row("mean logp(rejected)", "logps_rejected", "{:.2f}"),
        row("per-token preference accuracy", "per_token_accuracy"),
        "",
        "## DPO implicit reward (tuned only)",
        "",
        "reward = beta * (logp_tuned - logp_base). The base is the reference, so for the base every reward is 0 "
        "(accuracy 0, margin 0): this is not a comparison of two models but how far the tuned one moved.",
        "",
        "| metric | tuned |",
        "|---|---|",
        f"| reward accuracy (chosen reward > rejected reward) | {t['reward_accuracy']:.3f} |",
        f"| reward margin | {t['reward_margin']:.3f} |",
        f"| mean reward chosen / rejected | {t['rewards_chosen']:.3f} / {t['rewards_rejected']:.3f} |",
        "",
        "Summed log-probs favour the shorter answer, so a base model can show a preference it never learned; the "
        "per-token row removes that length effect.",
    ]
    if r["generations"]:
        lines += ["", "## Side by side (greedy)", ""]
        for i, g in enumerate(r["generations"], 1):
            lines += [f"### {i}. {g['prompt']}", "", f"- **base:** {g['base'] or '(empty)'}",
                      f"- **tuned:** {g['tuned'] or '(empty)'}", f"- *chosen in the data:* {g['chosen']}", ""]
    return "\n".join(lines).rstrip() + "\n"
