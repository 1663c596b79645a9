"""`dist-dpo eval` on the shared demo run: 2 ranks under `accelerate launch` (rows sharded, gathered on rank 0) and
one process give the same per-row scores; the tuned model beats the base; bad inputs are one line, exit 2."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from test_report import _launch_env, cli, fresh_console_logger, shared_run  # noqa: F401  (fixture re-exported)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def distributed(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval2")
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           "accelerate_configs/cpu.yaml", "-m", "dist_dpo", "eval", str(run), "--out", str(out), "--generations", "2",
           "--max_new_tokens", "12"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "eval.json").read_text()), out, proc


def test_two_ranks_evaluate_the_whole_test_split_once(distributed):
    result, out, proc = distributed
    assert result["world_size"] == 2 and result["pairs"] == 100 and len(result["rows"]) == 100
    assert "world 2 on cpu" in proc.stdout
    assert proc.stdout.count("wrote ") == 1  # rank 0 writes, once


def test_tuned_beats_base(distributed):
    result, _, _ = distributed
    base, tuned = result["base"], result["tuned"]
    assert tuned["logp_margin"] > base["logp_margin"] + 5
    assert tuned["preference_accuracy"] >= base["preference_accuracy"]
    assert tuned["per_token_accuracy"] > base["per_token_accuracy"] + 0.3
    assert tuned["reward_accuracy"] > 0.9 and tuned["reward_margin"] > 0.5
    # The implicit reward margin is beta times how far the tuned logp margin moved from the base's.
    moved = result["beta"] * (tuned["logp_margin"] - base["logp_margin"])
    assert tuned["reward_margin"] == pytest.approx(moved, rel=1e-3)


def test_agrees_with_trls_own_eval_at_the_last_step(distributed, run):
    result, _, _ = distributed
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    last = [h for h in history if "eval_rewards/margins" in h][-1]
    # trl averages per-batch means (the last batch is smaller), so agreement is close, not exact.
    assert result["tuned"]["reward_margin"] == pytest.approx(last["eval_rewards/margins"], rel=0.1)
    assert result["tuned"]["reward_accuracy"] == pytest.approx(last["eval_rewards/accuracies"], abs=0.03)
    assert result["tuned"]["logps_chosen"] == pytest.approx(last["eval_logps/chosen"], rel=0.05)


def test_markdown_is_explicit_about_which_metric_is_which(distributed):
    result, out, _ = distributed
    md = (out / "eval.md").read_text(encoding="utf-8")
    assert "## The model's own preference (both models)" in md and "## DPO implicit reward (tuned only)" in md
    assert "for the base every reward is 0" in md
    assert md.count("- **base:**") == 2 and md.count("- **tuned:**") == 2
    gens = result["generations"]
    assert len(gens) == 2 and all(g["prompt"] and "tuned" in g and "base" in g for g in gens)


def test_single_process_gives_the_same_rows(distributed, run, tmp_path, capsys):
    result, _, _ = distributed
    assert cli("eval", run, "--out", tmp_path, "--max_samples", 20, "--generations", 0, "--batch_size", 3) == 0
    single = json.loads((tmp_path / "eval.json").read_text())
    assert single["world_size"] == 1 and single["pairs"] == 20 and single["generations"] == []
    for a, b in zip(single["rows"], result["rows"][:20]):
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-2), key
    assert "preference accuracy base" in capsys.readouterr().out


def test_eval_bad_inputs_are_one_line_exit_2(run, tmp_path, capsys):
    from test_chat import make_base

    other = make_base(tmp_path / "other-model")
    bare = tmp_path / "bare_adapter"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(run / name, bare)
    no_adapter = tmp_path / "no_adapter"
    no_adapter.mkdir()
    shutil.copy2(run / "resolved_config.yaml", no_adapter)
    cases = [
        ((tmp_path / "missing",), "does not exist"),
        ((no_adapter,), "holds no adapter"),
        ((bare,), "pass --dataset"),
        ((run, "--max_samples", "0"), "--max_samples must be >= 1"),
        ((run, "--dataset", tmp_path / "nope.jsonl"), "does not exist"),
        ((run, "--base", other, "--out", tmp_path / "o"), "was trained on"),
        ((run, "--split", "dev"), "invalid choice"),
    ]
    for args, message in cases:
        assert cli("eval", *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("dist-dpo: error:"), (args, err)
    assert not (tmp_path / "o").exists()


def test_a_qlora_run_is_evaluated_unquantized_on_cpu(run, tmp_path, capsys):
    from test_merge import qlora_copy

    assert cli("eval", qlora_copy(run, tmp_path), "--max_samples", 4, "--generations", 0, "--out", tmp_path) == 0
    assert "evaluated unquantized" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["pairs"] == 4
