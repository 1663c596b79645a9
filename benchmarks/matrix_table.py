"""Render benchmarks/results/gpu_matrix.json as the README's "Tested matrix" table (between the markers).

    python3 benchmarks/matrix_table.py [--json benchmarks/results/gpu_matrix.json] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"
ORDER = ["single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload"]


def cell_text(c: dict) -> str:
    if c["status"] == "ok" and c["agrees"]:
        mem = f"{c['peak_mem_gib']:.1f} GiB" if c.get("peak_mem_gib") is not None else "-"
        sps = f"{c['seconds_per_step']:.2f} s/step" if c.get("seconds_per_step") else ""
        return f"✅ {mem}, {sps}"
    return f"❌ {c.get('reason', c['status'])[:80]}"


def render(doc: dict) -> str:
    rows = {}
    for c in doc["cells"]:
        if c["name"].startswith("ref-alt"):
            continue
        rows.setdefault((c["launcher"], c["strategy"]), {})[c["quant"]] = c
    env = doc.get("environment", {})
    lines = [
        f"Card: {', '.join(sorted(set(env.get('cards', []))))} · commit {str(env.get('git_commit'))[:10]} · "
        f"tolerance (3 x measured layout noise): {doc.get('tolerance', {}).get('tolerance')}",
        "",
        "| launcher | strategy | LoRA (bf16) | QLoRA (4-bit) |",
        "|---|---|---|---|",
    ]
    for (launcher, strategy), by_q in sorted(rows.items(), key=lambda kv: (kv[0][0], ORDER.index(kv[0][1]))):
        lines.append(f"| {launcher} | {strategy} | {cell_text(by_q['lora']) if 'lora' in by_q else '-'} | "
                     f"{cell_text(by_q['qlora']) if 'qlora' in by_q else '-'} |")
    lines += ["", f"Reproduce: `{doc['command']}`"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="benchmarks/results/gpu_matrix.json")
    p.add_argument("--readme", default="README.md")
    a = p.parse_args()
    table = render(json.loads(Path(a.json).read_text()))
    readme = Path(a.readme)
    text = readme.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
