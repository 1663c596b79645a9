"""Render benchmarks/results/gpu_matrix.json as the "Tested matrix" table of docs/strategies.md (between its
matrix markers), or benchmarks/results/combinations.json as its recipe x strategy table (the combinations markers).

    python3 benchmarks/matrix_table.py [--json benchmarks/results/gpu_matrix.json] [--doc docs/strategies.md]
    python3 benchmarks/matrix_table.py --combinations benchmarks/results/combinations.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "strategies.md"  # where both tables live
BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"
ORDER = ["single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload"]


def cell_text(c: dict) -> str:
    """✅ trains, loss within tolerance of its reference, adapter reloads (and merges); ⚠️ trains and saves a
    loadable adapter but a check is outside its bound (said which); 🚫 refused before launch, as the strategy table
    says it must be; ❌ failed."""
    if c["status"] == "refused":
        return f"🚫 refused before launch: {c.get('reason', '')[:100]}" if c.get("agrees") else \
            f"❌ refused, but not as planned: {c.get('reason', '')[:80]}"
    if c["status"] != "ok":
        return f"❌ {c.get('reason', c['status'])[:80]}"
    if c.get("stale"):
        return f"⏳ {c['stale']}"
    parts = []
    if c.get("max_loss_diff") is not None:
        sign = "≤" if c.get("loss_agrees") else ">"
        parts.append(f"Δloss {c['max_loss_diff']:.4f} {sign} {c['tolerance']:.4f}")
        if c.get("same_strategy_1gpu_diff") is not None:  # vs the same strategy on one GPU (precision, no split)
            parts.append(f"vs its 1-GPU run {c['same_strategy_1gpu_diff']:.4f}")
    if c.get("peak_mem_gib") is not None:
        parts.append(f"{c['peak_mem_gib']:.2f} GiB")
    check = c.get("adapter_check") or {}
    if check and not check.get("ok", False):
        if check.get("merged_ok") is False and "merged_logits_mean_abs_diff" not in check:
            parts.append(f"bf16 merge: max Δlogit {check['merged_logits_max_abs_diff']:.3f} > the old fixed 0.05 bound")
        elif check.get("merged_ok") is False and "merged_fp32_mean_abs_diff" not in check:
            parts.append(f"bf16 merge loads, top-1 {check['merged_top1_agreement']:.0%}, but mean Δlogit "
                         f"{check['merged_logits_mean_abs_diff']:.3f} > 10 % of the adapter's effect "
                         f"{check['adapter_effect_mean_abs']:.3f} (that bound is replaced; not re-run)")
        else:
            parts.append("adapter " + ("reload" if check.get("logps_rel_diff", 0) > 2e-3 else "merge") + " check failed")
    mark = "✅" if c["agrees"] else "⚠️"
    return f"{mark} {', '.join(parts)}"


def render(doc: dict) -> str:
    rows, grouped = {}, {}
    for c in doc["cells"]:
        if c["name"].startswith(("ref-alt", "ref1-")):  # the noise floor and the 1-GPU diagnostics: not user cells
            continue
        if c.get("group"):  # another family or the tutorial's optimizer: their own table below
            if c["gpus"] > 1:
                grouped.setdefault((c["group"], c["shape"], c["optim"], c["strategy"]), {})[c["quant"]] = c
            continue
        rows.setdefault((c["launcher"], c["strategy"]), {})[c["quant"]] = c
    env = doc.get("environment", {})
    tol = doc.get("tolerance", {})
    lines = [
        f"Card: {', '.join(sorted(set(env.get('cards', []))))} · "
        + (f"commit {str(env.get('git_commit'))[:10]} · " if not doc.get("runs") else
           "commits " + " then ".join(f"{str(r['git_commit'])[:7]} ({len(r['cells'])} cells)" for r in doc["runs"])
           + " · ")
        + f"{doc['setup']['shape']}, {doc['setup']['steps']} steps, global batch {doc['setup']['global_batch']} · "
        + ("tolerance = 3 x the largest loss difference between the single-GPU reference and its re-runs with other "
           "micro-batch layouts " if "how" in tol else
           "tolerance = 3 x the loss difference of the single-GPU reference re-run with another micro-batch layout ")
        +
        f"(LoRA {tol.get('tolerance', {}).get('lora', 0):.4f}, QLoRA {tol.get('tolerance', {}).get('qlora', 0):.4f})"
        + (f" · {doc['cells_at_once_per_gpu_group']} cells shared each GPU pair, so no timings here "
           "(benchmarks/throughput.py has them)" if doc.get("cells_at_once_per_gpu_group", 1) > 1 else ""),
        "",
        "| launcher | strategy | LoRA (bf16) | QLoRA (4-bit) |",
        "|---|---|---|---|",
    ]
    for (launcher, strategy), by_q in sorted(rows.items(), key=lambda kv: (kv[0][0], ORDER.index(kv[0][1]))):
        lines.append(f"| {launcher} | {strategy} | {cell_text(by_q['lora']) if 'lora' in by_q else '-'} | "
                     f"{cell_text(by_q['qlora']) if 'qlora' in by_q else '-'} |")
    if grouped:
        lines += ["", "Other families (untied LM heads) and the tutorial's optimizer, each against its own single-GPU "
                      "reference and noise floor (" + ", ".join(
                          f"{k} {v:.4f}" for k, v in tol.get("tolerance", {}).items() if "/" in k) + "):", "",
                  "| group | model | optimizer | strategy | LoRA (bf16) | QLoRA (4-bit) |", "|---|---|---|---|---|---|"]
        for (group, shape, optim, strategy), by_q in sorted(grouped.items(),
                                                            key=lambda kv: (kv[0][0], ORDER.index(kv[0][3]))):
            lines.append(f"| {group} | {shape} | {optim} | {strategy} | "
                         f"{cell_text(by_q['lora']) if 'lora' in by_q else '-'} | "
                         f"{cell_text(by_q['qlora']) if 'qlora' in by_q else '-'} |")
    diag = [c for c in doc["cells"] if c["name"].startswith("ref1-")]
    if diag:
        lines += ["", "One-GPU runs of the sharded strategies (same batch, no data split) against the single-GPU "
                      "reference, and the 2-GPU cells against them: " + "; ".join(
                          f"{c['name']} " + (f"{c.get('max_loss_diff', float('nan')):.4f}" if not c.get("stale") else "stale")
                          for c in diag if c["status"] == "ok")]
    if doc.get("runs"):
        lines += ["", "Reproduce (2 GPUs; one command at a single commit): "
                      "`python3 benchmarks/gpu_matrix.py --out benchmarks/results --share 3`. This table joins runs "
                      "at several commits (`gpu_matrix.py --overlay`): " + "; ".join(f"`{_portable(r['command'])}` at {str(r['git_commit'])[:7]}"
                                                                               for r in doc["runs"])]
    else:
        lines += ["", f"Reproduce (2 GPUs): `{_portable(doc['command'])}`"]
    return "\n".join(lines)


def _portable(command: str) -> str:
    """The recorded command with the run's own scratch folders as placeholders: what a reader types."""
    return re.sub(r"(--(?:out|work)) \S+", lambda m: f"{m.group(1)} {'$OUT' if m.group(1) == '--out' else '/tmp/work'}",
                  command)


COMBO_BEGIN, COMBO_END = "<!-- combinations:begin -->", "<!-- combinations:end -->"


def combination_text(c: dict) -> str:
    """What one recipe x strategy cell does (benchmarks/combinations.py)."""
    if c["status"] == "trained":
        mem = f", {c['peak_mem_gib']:.2f} GiB" if c.get("peak_mem_gib") else ""
        loss = f"loss {c['losses'][-1]:.4f}" if c.get("losses") else "no loss logged"
        return f"✅ trains ({loss}{mem}, adapter verified: {c['adapter']['tensors']} tensors)"
    if c["status"] == "refused":
        return f"⛔ refused: {c['line']}"
    if c["status"] == "pending":
        return "not run"
    return f"❌ {c.get('line') or 'failed'}"[:160]


def render_combinations(doc: dict) -> str:
    """Recipes as columns, strategy paths as rows, each cell what the combination does."""
    recipes = list(dict.fromkeys(c["recipe"] for c in doc["cells"]))
    paths = list(dict.fromkeys(c["path"] for c in doc["cells"]))
    by = {(c["path"], c["recipe"]): c for c in doc["cells"]}
    env = doc.get("environment", {})
    lines = [f"Card: {', '.join(sorted(set(env.get('cards', []))))} · commit {str(env.get('git_commit'))[:10]} · "
             f"{env.get('shape')} shape, {doc['setup']['steps']} steps, NGPUS=1, each cell `make <target> "
             "RECIPE=recipes/<recipe>.yaml` (`benchmarks/combinations.py`)", "",
             "| make | " + " | ".join(f"`{r}`" for r in recipes) + " |", "|---|" + "---|" * len(recipes)]
    for path in paths:
        target = next((c["target"] for c in doc["cells"] if c["path"] == path and c.get("target")), path)
        lines.append(f"| `{target}` | " + " | ".join(combination_text(by[(path, r)]).replace("|", "/")
                                                  if (path, r) in by else "-" for r in recipes) + " |")
    return "\n".join(lines)


def replace_block(doc: Path, begin: str, end: str, table: str) -> None:
    text = doc.read_text(encoding="utf-8")
    if begin not in text:
        raise SystemExit(f"{doc} has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    doc.write_text(head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="benchmarks/results/gpu_matrix.json")
    p.add_argument("--doc", default=str(DOC),
                   help="the markdown file whose marker block gets the table (default: docs/strategies.md)")
    p.add_argument("--combinations", metavar="JSON",
                   help="render benchmarks/results/combinations.json into the doc's combinations block instead")
    a = p.parse_args()
    if a.combinations:
        table = render_combinations(json.loads(Path(a.combinations).read_text()))
        replace_block(Path(a.doc), COMBO_BEGIN, COMBO_END, table)
    else:
        table = render(json.loads(Path(a.json).read_text()))
        replace_block(Path(a.doc), BEGIN, END, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
