"""`dist-dpo merge` on the shared demo run: shards + tokenizer + model card, its own logit check, a plain-transformers
reload, chat on the merged model, and the inputs it must refuse without writing anything."""

import json

import pytest
import torch

from test_chat import make_base
from test_report import cli, fresh_console_logger, shared_run  # noqa: F401  (fixture re-exported)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "merged"
    assert cli("merge", run, "--out", out, "--max_shard_size", "2MB") == 0
    return out


def test_merge_writes_shards_tokenizer_and_card(merged, run):
    shards = sorted(p.name for p in merged.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (merged / "model.safetensors.index.json").is_file(), shards
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "resolved_config.yaml", "README.md"):
        assert (merged / name).is_file(), name
    card = (merged / "README.md").read_text(encoding="utf-8")
    for text in ("merge_and_unload", "builtin:tiny-qwen2", "beta 0.1", "你是一个没有礼貌的人渣", "merged vs base + adapter",
                 "reloaded from these files with plain transformers"):
        assert text in card, text
    assert not list(merged.parent.glob(".merged.tmp-*"))  # the temp dir was renamed into place


def test_merge_printed_its_check(run, tmp_path, capsys):
    assert cli("merge", run, "--out", tmp_path / "m") == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("merge check: merged vs base + adapter"))
    assert float(line.split("max |logit diff| ")[1].split()[0]) < 1e-3, line


def test_merged_model_loads_with_plain_transformers_and_matches(merged, run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_dpo.model_zoo import ensure_builtin_model

    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok("你好，帮我写一首诗 please", return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ensure_builtin_model(),
                                                                           dtype=torch.float32), run)
    with torch.no_grad():
        diff = (plain(ids).logits - tuned(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    assert not any("lora" in name for name, _ in plain.named_parameters())


def test_chat_on_the_merged_model(merged, capsys):
    assert cli("chat", merged, "--prompt", "你好", "--greedy", "--max_new_tokens", 8) == 0
    out, err = capsys.readouterr()
    assert "Assistant: " in out and f"chat: model {merged}" in err
    assert "你是一个没有礼貌的人渣" in err  # the recipe travelled with the merged model


def test_merge_refuses_and_writes_nothing(run, merged, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    other = make_base(tmp_path / "other-model")
    cases = [
        ((run, "--out", taken), "already exists and is not empty"),
        ((run, "--out", a_file), "is a file"),
        ((merged, "--out", tmp_path / "o1"), "nothing to merge"),
        ((tmp_path / "missing", "--out", tmp_path / "o2"), "does not exist"),
        ((run, "--out", tmp_path / "o3", "--base", other), "was trained on"),
        ((run, "--out", tmp_path / "o4", "--tolerance", "0"), "merge check FAILED"),
        ((run,), "the following arguments are required: --out"),
        ((run, "--out", tmp_path / "o5", "--max_shard_size", "lots"), "is not a size"),
    ]
    for args, message in cases:
        assert cli("merge", *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("dist-dpo: error:"), (args, err)
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"] and (taken / "keep.txt").read_text() == "mine"
    assert a_file.read_text() == "mine"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["a_file", "other-model", "taken"], left  # no o1..o4, no temp dirs
    json.loads((merged / "config.json").read_text())  # the earlier merge is untouched


def qlora_copy(run, where):
    """The shared run as if it had been trained on a 4-bit base (QLoRA): same adapter, recipe says load_in_4bit."""
    import shutil

    copy = where / "qlora_run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint-*", "wandb", "runs", "plots"))
    recipe = (copy / "resolved_config.yaml").read_text(encoding="utf-8")
    (copy / "resolved_config.yaml").write_text(recipe.replace("load_in_4bit: false", "load_in_4bit: true"),
                                               encoding="utf-8")
    return copy


def test_a_qlora_run_merges_into_the_unquantized_base(run, tmp_path):
    assert cli("merge", qlora_copy(run, tmp_path), "--out", tmp_path / "m") == 0
    card = (tmp_path / "m" / "README.md").read_text(encoding="utf-8")
    assert "4-bit NF4 (QLoRA)" in card and "merged here into the unquantized base" in card
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config
