"""The memory plan (dist_dpo/plan.py) against the peaks the GPU matrix measured, cell by cell.

    python3 benchmarks/plan_vs_matrix.py [--json benchmarks/results/gpu_matrix.json]      (CPU, seconds)

Each matrix cell trained the same 0.5B-shaped model on the built-in data; the plan is asked about its longest
micro-batch (dist-dpo's packed row where the cell logged it ran one; else trl's two rows or the masked shared-prompt
row, whichever it predicts larger) with the cell's
strategy, quantization, batch and checkpointing. Prints measured vs planned GiB and the error; exit 1 when a cell
is off by more than 15 %.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BOUND = 0.15


def pair_lengths(max_length: int, seed: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) tokens of the built-in data as the matrix cells tokenized it."""
    from transformers import AutoTokenizer

    from dist_dpo.config import parse_recipe
    from dist_dpo.data import load_preference_data

    tok = AutoTokenizer.from_pretrained(ROOT / "dist_dpo" / "assets" / "tokenizer")
    recipe = parse_recipe(["--config", str(ROOT / "recipes" / "demo.yaml")])
    train, _ = load_preference_data(recipe.data, tok, max_length, seed)

    def n(messages, generation_prompt=False):
        out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        return len(out["input_ids"] if hasattr(out, "keys") else out)

    rows = []
    for r in train:
        p = n(r["prompt"], True)
        rows.append((p, n(r["prompt"] + r["chosen"]) - p, n(r["prompt"] + r["rejected"]) - p))
    return rows


def main() -> int:
    from dist_dpo import plan

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "gpu_matrix.json"))
    a = ap.parse_args()
    doc = json.loads(Path(a.json).read_text())
    setup = doc["setup"]
    _, shape = plan.load_shape(setup["shape"])
    lengths = pair_lengths(setup["max_length"], 7)
    trl_width = max(p + max(c, r) for p, c, r in lengths)
    shared_width = -(-max(p + c + r for p, c, r in lengths) // 16) * 16
    worst = 0.0
    print(f"{'cell':30} {'measured':>8} {'planned':>8} {'error':>7}")
    for c in doc["cells"]:
        if c.get("peak_mem_gib") is None:
            continue
        per_device = 2 if c["name"].startswith("ref-alt2") else 4 if c["name"].startswith("ref-alt") else 8
        base = plan.Job(shape, c["strategy"], "4bit" if c["quant"] == "qlora" else "none", gpus=c["gpus"],
                        pairs=per_device, lora_r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), checkpoint_every=1)
        if "packed" in (c.get("prompt_layout") or ""):  # the cells ran balance_ranks (split by cost)
            torch_minor = tuple(int(x) for x in doc["environment"]["versions"]["torch"].split(".")[:2])
            jobs = [plan.packed_job(base, lengths, ranks=c["gpus"], expand_kv=torch_minor < (2, 13))]
        else:
            jobs = [replace(base, seq_len=width, rows_per_pair=rows, masked_attention=True, shared_mask=rows == 1)
                    for rows, width in ((2, trl_width), (1, shared_width))]
        planned = max(plan.estimate(j)["peak"] for j in jobs)
        err = planned / c["peak_mem_gib"] - 1
        worst = max(worst, abs(err))
        print(f"{c['name']:30} {c['peak_mem_gib']:8.2f} {planned:8.2f} {err:+7.1%}")
    print(f"largest error {worst:.1%} (bound {BOUND:.0%})")
    return 0 if worst <= BOUND else 1


if __name__ == "__main__":
    raise SystemExit(main())
