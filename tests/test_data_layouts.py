"""Local datasets in the layouts people download: a hub snapshot (data/<split>-00000-of-00001.parquet or .jsonl),
UltraFeedback's named splits with extra columns, `data_files` globs, a `save_to_disk` directory, one file, the
built-in set. Each is read (content checked) and trained on (CPU, the built-in model, 2 steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT
from dist_dpo.config import DataArgs
from dist_dpo.data import ASSETS, load_preference_data

ROWS = [json.loads(line) for line in (ASSETS / "bad_boy" / "train.jsonl").read_text().splitlines()[:24]]


def _ultrafeedback(row: dict, i: int) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized's columns: the conversations repeat the plain-text prompt."""
    user = {"role": "user", "content": row["prompt"]}
    chosen = [user, {"role": "assistant", "content": row["chosen"]}]
    return {"prompt": row["prompt"], "prompt_id": f"id{i}", "chosen": chosen,
            "rejected": [user, {"role": "assistant", "content": row["rejected"]}], "messages": chosen,
            "score_chosen": 8.0, "score_rejected": 3.5}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """name -> (dataset_name, the recipe keys it needs)."""
    import datasets

    root = tmp_path_factory.mktemp("layouts")
    train, test = datasets.Dataset.from_list(ROWS[:20]), datasets.Dataset.from_list(ROWS[20:])
    out: dict[str, tuple[Path, list[str]]] = {}

    snap = root / "snapshot_parquet"  # what `huggingface-cli download --repo-type dataset` leaves
    (snap / "data").mkdir(parents=True)
    (snap / "README.md").write_text("---\nlicense: mit\n---\n# a preference set\n")
    train.to_parquet(str(snap / "data" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(snap / "data" / "test-00000-of-00001.parquet"))
    out["snapshot_parquet"] = (snap, [])

    snap = root / "snapshot_jsonl"
    (snap / "data").mkdir(parents=True)
    train.to_json(str(snap / "data" / "train-00000-of-00001.jsonl"), force_ascii=False)
    test.to_json(str(snap / "data" / "test-00000-of-00001.jsonl"), force_ascii=False)
    out["snapshot_jsonl"] = (snap, [])

    uf = root / "ultrafeedback"
    (uf / "data").mkdir(parents=True)
    for split, rows in (("train_prefs", ROWS[:20]), ("test_prefs", ROWS[20:])):
        datasets.Dataset.from_list([_ultrafeedback(r, i) for i, r in enumerate(rows)]).to_parquet(
            str(uf / "data" / f"{split}-00000-of-00001.parquet"))
    out["ultrafeedback"] = (uf, ["--train_split", "train_prefs", "--test_split", "test_prefs"])

    globbed = root / "globbed"  # names datasets cannot map to splits by itself
    (globbed / "prefs").mkdir(parents=True)
    train.to_parquet(str(globbed / "prefs" / "mine-a.parquet"))
    test.to_parquet(str(globbed / "prefs" / "held-out.parquet"))
    out["data_files"] = (globbed, ["--data_files", "{train: prefs/mine-*.parquet, test: prefs/held-*.parquet}"])

    saved = root / "saved"
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(saved))
    out["save_to_disk"] = (saved, [])

    single = root / "pairs.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(single))
    out["single_file"] = (single, [])
    out["builtin"] = (Path("builtin:bad-boy"), [])
    return out


def _data_args(path: Path, keys: list[str]) -> DataArgs:
    extra = dict(zip(keys[::2], keys[1::2]))
    if "--data_files" in extra:
        import yaml

        extra["--data_files"] = yaml.safe_load(extra["--data_files"])
    return DataArgs(dataset_name=str(path), **{k.lstrip("-"): v for k, v in extra.items()})


@pytest.fixture(scope="module")
def tokenizer():
    from dist_dpo.config import ModelArgs
    from dist_dpo.model_zoo import builtin_model_dir
    from dist_dpo.modeling import load_tokenizer

    path = str(builtin_model_dir())
    return load_tokenizer(ModelArgs(model_name_or_path=path), path)


@pytest.mark.parametrize("name", ["snapshot_parquet", "snapshot_jsonl", "ultrafeedback", "data_files", "save_to_disk"])
def test_layout_reads_its_splits_as_chat_pairs(layouts, tokenizer, name):
    train, test = load_preference_data(_data_args(*layouts[name]), tokenizer, max_length=256, seed=0)
    assert (len(train), len(test)) == (20, 4)  # its own test split, not one held out of train
    assert train.column_names == ["prompt", "chosen", "rejected"]  # scores, ids, message copies dropped
    row = train[0]
    assert row["prompt"][-1] == {"role": "user", "content": ROWS[0]["prompt"]}
    assert row["chosen"] == [{"role": "assistant", "content": ROWS[0]["chosen"]}]
    assert row["rejected"] == [{"role": "assistant", "content": ROWS[0]["rejected"]}]


def test_named_splits_must_be_named(layouts, tokenizer):
    from dist_dpo.errors import UserError

    with pytest.raises(UserError, match=r"has no split 'train'; it has \['test_prefs', 'train_prefs'\]"):
        load_preference_data(DataArgs(dataset_name=str(layouts["ultrafeedback"][0])), tokenizer, 256, 0)


def test_a_broken_file_in_a_snapshot_is_named_with_its_line(tmp_path, tokenizer):
    from dist_dpo.errors import UserError

    (tmp_path / "data").mkdir()
    good = json.dumps(ROWS[0], ensure_ascii=False)
    (tmp_path / "data" / "train-00000-of-00001.jsonl").write_text(f"{good}\n{good[:-5]}\n{good}\n")
    with pytest.raises(UserError, match=r"train-00000-of-00001.jsonl:2: invalid JSON"):
        load_preference_data(DataArgs(dataset_name=str(tmp_path)), tokenizer, 256, 0)
    (tmp_path / "data" / "train-00000-of-00001.jsonl").unlink()
    with pytest.raises(UserError, match="no data files datasets can read"):
        load_preference_data(DataArgs(dataset_name=str(tmp_path)), tokenizer, 256, 0)


TRAIN_EACH = textwrap.dedent("""
    import json, sys
    from dist_dpo.cli import main
    for name, (data, keys, out) in json.loads(sys.argv[1]).items():
        code = main(["train", "--config", "demo", "--dataset_name", data, *keys, "--output_dir", out, "--max_steps",
                     "2", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--report_to", "none",
                     "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4"])
        print("RESULT", name, code, flush=True)
""")


@pytest.mark.slow
def test_every_layout_trains(layouts, tmp_path):
    """The real entrypoint, each layout in turn in one process (one Python start-up instead of seven)."""
    jobs = {name: (str(path), keys, str(tmp_path / name)) for name, (path, keys) in layouts.items()}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", TRAIN_EACH, json.dumps(jobs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    results = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    assert results == {name: "0" for name in layouts}, proc.stderr[-3000:]
    for name in layouts:
        marker = json.loads((tmp_path / name / "dist_dpo_run.json").read_text())
        assert marker["status"] == "complete" and marker["global_step"] == 2, name
        assert (tmp_path / name / "adapter_model.safetensors").is_file(), name
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        assert any("eval_loss" in h for h in state["log_history"]), name  # its test split was evaluated
