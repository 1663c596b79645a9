"""Two commits side by side, from results of the same card and job: throughput rows and the architecture matrix.

    python3 benchmarks/before_after.py BEFORE_DIR AFTER_DIR --out before_after.json

Each directory holds what `throughput.py --out DIR` and `arch_matrix.py --out DIR` wrote (throughput.json,
arch_matrix.json); benchmarks/gpu_one_card.sh (BEFORE_TREE=...) runs both trees into such a pair. For every
throughput row both ran: tokens/s end to end and steady, peak memory, and after / before; for the matrix: each
cell's agreement with trl in both. A change that was meant to keep behaviour passes when every matrix cell that
agreed before still agrees and no row is slower than NOISE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# A row counts as slower when after / before falls below this: what two runs of one commit on one card differ by
# at the short rows' length (a few per cent), with room.
NOISE = 0.95


def load(directory: Path, name: str) -> dict | None:
    path = directory / name
    return json.loads(path.read_text()) if path.is_file() else None


def throughput_pairs(before: dict | None, after: dict | None) -> list[dict]:
    if not before or not after:
        return []
    old = {r["name"]: r for r in before.get("rows", []) if r.get("status") == "ok"}
    out = []
    for row in after.get("rows", []):
        b = old.get(row["name"])
        if row.get("status") != "ok" or b is None:
            continue
        pair = {"row": row["name"]}
        for key in ("tokens_per_s", "steady_tokens_per_s", "peak_mem_gib"):
            pair[f"{key}_before"], pair[f"{key}_after"] = b.get(key), row.get(key)
            pair[f"{key}_ratio"] = row[key] / b[key] if b.get(key) and row.get(key) else None
        pair["within_noise"] = all(pair[f"{k}_ratio"] is not None and pair[f"{k}_ratio"] >= NOISE
                                   for k in ("tokens_per_s", "steady_tokens_per_s"))
        out.append(pair)
    return out


def matrix_pairs(before: dict | None, after: dict | None) -> list[dict]:
    if not before or not after:
        return []
    key = lambda c: (c["shape"], c["quant"])  # noqa: E731
    old = {key(c): c for c in before.get("cells", [])}
    return [{"shape": c["shape"], "quant": c["quant"], "agrees_before": old[key(c)].get("agrees"),
             "agrees_after": c.get("agrees"), "loss_diff_before": old[key(c)].get("loss_diff"),
             "loss_diff_after": c.get("loss_diff")}
            for c in after.get("cells", []) if key(c) in old]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--out", type=Path, help="where to write the comparison (JSON)")
    a = p.parse_args(argv)
    docs = {side: {n: load(d, n) for n in ("throughput.json", "arch_matrix.json")}
            for side, d in (("before", a.before), ("after", a.after))}
    if not any(docs["before"].values()) or not any(docs["after"].values()):
        print(f"before_after.py: no throughput.json or arch_matrix.json in {a.before} and {a.after}", file=sys.stderr)
        return 2
    rows = throughput_pairs(docs["before"]["throughput.json"], docs["after"]["throughput.json"])
    cells = matrix_pairs(docs["before"]["arch_matrix.json"], docs["after"]["arch_matrix.json"])
    meta = lambda d: {k: d.get(k) for k in ("git_commit", "commit", "cards", "versions", "command")} if d else None  # noqa: E731
    doc = {"what": "before / after, same card, same job", "noise": NOISE,
           "before": {n: meta(d) for n, d in docs["before"].items()},
           "after": {n: meta(d) for n, d in docs["after"].items()},
           "throughput": rows, "arch_matrix": cells,
           "regressed_cells": [c for c in cells if c["agrees_before"] and not c["agrees_after"]],
           "slower_rows": [r["row"] for r in rows if not r["within_noise"]]}
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print("| row | before tok/s | after tok/s | after/before | steady after/before | peak GiB before -> after |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['row']} | {r['tokens_per_s_before']:,.0f} | {r['tokens_per_s_after']:,.0f} | "
              f"{r['tokens_per_s_ratio']:.3f} | {r['steady_tokens_per_s_ratio'] or 0:.3f} | "
              f"{r['peak_mem_gib_before']:.1f} -> {r['peak_mem_gib_after']:.1f} |")
    agree = sum(bool(c["agrees_after"]) for c in cells)
    regressed = ", ".join(c["shape"] + "/" + c["quant"] for c in doc["regressed_cells"]) or "none"
    print(f"\narchitecture matrix: {agree} of {len(cells)} cells agree after "
          f"({sum(bool(c['agrees_before']) for c in cells)} before); regressed: {regressed}")
    return 1 if doc["regressed_cells"] or doc["slower_rows"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
