"""What the speed path changes, measured on CPU (no GPU needed): the numbers behind benchmarks/NOTES.md.

    python3 benchmarks/cpu_effects.py            (~2 minutes on 2 cores)

1. Decoder tokens run per non-pad token on the benchmark sets, 16 pairs per micro-batch: trl's random batches,
   length-grouped batches, and grouped + shared-prompt rows (exact token counts from the chat template).
2. trl's fused head at the Qwen2.5-1.5B size (hidden 1536, vocab 151936) on CPU: log-probs only vs. with the
   logging extras (entropy, mean logit, top-1), forward + backward. The torch fallback, not the Triton kernel.
3. One DPO micro-step on the built-in tiny model, trl's path vs. the speed path, on the same batches.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def layout_ratios(pairs: int = 16) -> dict:
    import preference_sets as ps
    from transformers import AutoConfig

    from dist_dpo.speed.batching import PAD_MULTIPLE, LayoutCost, length_grouped_sampler
    from dist_dpo.model_zoo import SHAPES

    cost = LayoutCost.for_config(AutoConfig.for_model(**SHAPES["qwen2.5-1.5b"]["config"]))
    out = {}
    for name, (_, max_length, n) in ps.SETS.items():
        d = ps.write_set(name, Path("/tmp/dist_dpo_cpu_effects"), n)
        lens = [ps.token_lengths(r) for r in ps.read_rows(d)]
        lens = [(p, min(c, max_length - p), min(r, max_length - p)) for p, c, r in lens]
        real = sum(2 * p + c + r for p, c, r in lens)
        order_random = list(range(len(lens)))
        random.Random(0).shuffle(order_random)
        order_grouped = list(length_grouped_sampler([p + c + r for p, c, r in lens], pairs, seed=42))

        def run(order, layout):
            total = 0
            for k in range(0, len(order), pairs):
                b = [lens[i] for i in order[k:k + pairs]]
                trl_width = max(p + max(c, r) for p, c, r in b)
                shared_width = -(-max(p + c + r for p, c, r in b) // PAD_MULTIPLE) * PAD_MULTIPLE
                padded = any(p + c != trl_width or p + r != trl_width for p, c, r in b)
                shared = layout == "shared" or (layout == "auto" and cost.shared_layout(len(b), shared_width) <
                                                cost.pairs_layout(2 * len(b), trl_width, padded))
                total += len(b) * shared_width if shared else 2 * len(b) * trl_width
            return round(total / real, 3)

        out[name] = {"trl random": run(order_random, "pairs"), "grouped": run(order_grouped, "pairs"),
                     "grouped + shared prompt": run(order_grouped, "shared"),
                     "grouped + auto (dist-dpo default)": run(order_grouped, "auto")}
    return out


def head_extras_cost(tokens: int = 256, repeats: int = 5) -> dict:
    import torch
    from trl.kernels import ChunkedLogProbFunction

    torch.manual_seed(0)
    hidden = torch.randn(tokens, 1536, requires_grad=True)
    weight = torch.randn(151936, 1536) * 0.02
    targets = torch.randint(0, 151936, (tokens,))
    variants = {"log_probs only": ("log_probs",),
                "with entropy/mean_logits/is_top1": ("log_probs", "entropy", "mean_logits", "is_top1")}
    runs = {k: [] for k in variants}
    for _ in range(repeats):  # alternate, keep the best: this VM's timings wander
        for label, outputs in variants.items():
            t = time.perf_counter()
            lp = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, outputs)[0]
            lp.sum().backward()
            runs[label].append(time.perf_counter() - t)
    return {k: round(min(v), 3) for k, v in runs.items()}


def step_times(steps: int = 6) -> dict:
    import datasets
    import preference_sets as ps
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dist_dpo import speed
    from dist_dpo.config import Recipe
    from dist_dpo.model_zoo import ensure_builtin_model
    from dist_dpo.runtime import resolve_runtime
    from dist_dpo.trainer import DistDPOTrainer

    path = ensure_builtin_model()
    data = datasets.Dataset.from_list([ps.conversational(r) for r in ps.variable_rows(8 * steps, seed=5, cap=200)])
    out = {}
    for label in ("trl", "speed path, trl's rows", "speed path"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        args = DPOConfig(output_dir="/tmp/dist_dpo_cpu_effects/run", per_device_train_batch_size=8, report_to=[],
                         use_cpu=True, max_length=1024, logging_steps=10, gradient_checkpointing=False)
        trainer = (DPOTrainer if label == "trl" else DistDPOTrainer)(model=model, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(path),
                             peft_config=LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                    task_type="CAUSAL_LM"))
        if label != "trl":
            recipe = Recipe()
            recipe.train.gradient_checkpointing = False
            recipe.train.prefix_sharing = label == "speed path"
            speed.apply(trainer, recipe, resolve_runtime(device_type="cpu"))
        rows = list(trainer.train_dataset)
        rows.sort(key=lambda r: len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]))  # grouped
        trainer.model.train()
        trainer.state.logging_steps = 10
        runs = []
        for k in range(steps):
            batch = trainer.data_collator([{key: r[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                           for r in rows[8 * k:8 * k + 8]])
            trainer.state.global_step = k  # step k + 1: only step 10 would be a logging step
            t = time.perf_counter()
            trainer.compute_loss(trainer.model, batch).backward()
            runs.append(time.perf_counter() - t)
        out[label] = round(statistics.median(runs[1:]), 3)
    return out


def main() -> int:
    print("decoder tokens run / non-pad tokens (16 pairs per micro-batch):")
    for name, r in layout_ratios().items():
        print(f"  {name:10} " + " | ".join(f"{k} {v}" for k, v in r.items()))
    print("trl fused head, 256 scored tokens, 1.5B head, fwd+bwd seconds:", head_extras_cost())
    print("tiny model, one micro-step of 8 pairs (grouped batches), median seconds:", step_times())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
