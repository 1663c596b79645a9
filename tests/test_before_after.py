"""benchmarks/before_after.py on CPU: two commits' throughput rows and architecture matrix side by side."""

from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import before_after  # noqa: E402


def _write(d, tokens: float, steady: float, agrees: bool, commit: str):
    d.mkdir()
    row = {"name": "dist-dpo/var/lora/1gpu", "status": "ok", "tokens_per_s": tokens, "steady_tokens_per_s": steady,
           "peak_mem_gib": 18.0}
    (d / "throughput.json").write_text(json.dumps({"git_commit": commit, "rows": [
        row, {"name": "dist-dpo/fixed2048/lora/1gpu", "status": "failed"}]}))
    (d / "arch_matrix.json").write_text(json.dumps({"git_commit": commit, "cells": [
        {"shape": "tiny-llama", "quant": "lora", "agrees": agrees, "loss_diff": 1e-4},
        {"shape": "tiny-qwen3", "quant": "qlora", "agrees": True, "loss_diff": 2e-4}]}))


def test_same_speed_and_agreement_pass(tmp_path, capsys):
    _write(tmp_path / "b", 12000.0, 19000.0, True, "aaa")
    _write(tmp_path / "a", 11900.0, 19500.0, True, "bbb")
    assert before_after.main([str(tmp_path / "b"), str(tmp_path / "a"), "--out", str(tmp_path / "ba.json")]) == 0
    doc = json.loads((tmp_path / "ba.json").read_text())
    (row,) = doc["throughput"]  # the failed row has no numbers to compare
    assert abs(row["tokens_per_s_ratio"] - 11900 / 12000) < 1e-9 and row["within_noise"]
    assert doc["before"]["throughput.json"]["git_commit"] == "aaa" and doc["after"]["arch_matrix.json"]["git_commit"] == "bbb"
    assert "2 of 2 cells agree after (2 before); regressed: none" in capsys.readouterr().out


def test_a_slower_row_or_a_cell_that_stopped_agreeing_fails(tmp_path, capsys):
    _write(tmp_path / "b", 12000.0, 19000.0, True, "aaa")
    _write(tmp_path / "a", 10000.0, 19000.0, False, "bbb")
    assert before_after.main([str(tmp_path / "b"), str(tmp_path / "a"), "--out", str(tmp_path / "ba.json")]) == 1
    doc = json.loads((tmp_path / "ba.json").read_text())
    assert doc["slower_rows"] == ["dist-dpo/var/lora/1gpu"]
    assert [c["shape"] for c in doc["regressed_cells"]] == ["tiny-llama"]
    assert "regressed: tiny-llama/lora" in capsys.readouterr().out


def test_no_results_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    assert before_after.main([str(tmp_path / "b"), str(tmp_path / "a")]) == 2
    assert "no throughput.json or arch_matrix.json" in capsys.readouterr().err
