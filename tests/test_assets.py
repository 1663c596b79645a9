"""The offline built-ins: bundled preference data, the ChatML tokenizer, the random-weight model zoo, and one tiny
trl DPO run over all three. CPU only, no network."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: prove nothing needs the hub

import pytest

from dist_dpo import model_zoo
from dist_dpo.errors import UserError

ASSETS = Path(model_zoo.__file__).resolve().parent / "assets"
DATA = ASSETS / "data"
CJK = re.compile(r"[\u4e00-\u9fff]")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        h.update((model_dir / name).read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


@pytest.fixture(scope="module")
def builtin_model(tmp_path_factory) -> Path:
    return model_zoo.ensure_builtin_model(tmp_path_factory.mktemp("cache"))


# ---------------------------------------------------------------- data
def test_bad_boy_data():
    train, test = _rows(DATA / "bad_boy" / "train.jsonl"), _rows(DATA / "bad_boy" / "test.jsonl")
    assert len(train) >= 300 and len(test) >= 80
    for row in train + test:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(row[k], str) and row[k].strip() for k in row), row
        assert row["chosen"] != row["rejected"], row
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}, "prompt shared by train and test"
    assert len({r["prompt"] for r in train}) == len(train)
    zh = sum(bool(CJK.search(r["prompt"])) for r in train + test) / len(train + test)
    assert 0.5 <= zh <= 0.7, f"{zh:.0%} Chinese"  # ~60% Chinese, the rest English


def test_conversational_examples():
    rows = _rows(DATA / "examples" / "conversational.jsonl")
    assert len(rows) >= 10
    for row in rows:
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
        assert all(m["content"] for k in row for m in row[k])


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_chatml(tokenizer):
    assert len(tokenizer) == 4096
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "你好"}]
    assert tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )
    # Unlike Qwen2.5's template, no default system prompt is inserted.
    done = tokenizer.apply_chat_template(msgs[1:] + [{"role": "assistant", "content": "滚。"}], tokenize=False)
    assert done == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n滚。<|im_end|>\n"
    for text in ["我今年三十岁了，现在开始学钢琴还来得及吗？", "Mixed 中文 and English, naïve café 🦆\n\ttabs"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # Special tokens are single ids, never split.
    assert tokenizer("<|im_start|>user<|im_end|>")["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_chat_template_prefix_property(tokenizer):
    # trl's DPOTrainer tokenizes prompt (with generation prompt) and prompt+answer separately and takes the answer
    # from where they diverge: the first must be a token prefix of the second, or prompt tokens are lost.
    for row in _rows(DATA / "bad_boy" / "test.jsonl"):
        prompt = [{"role": "user", "content": row["prompt"]}]
        p = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        for key in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": row[key]}],
                                                 return_dict=False)
            assert full[: len(p)] == p, row["prompt"]


# ---------------------------------------------------------------- model zoo
def test_builtin_model_loads_and_is_reproducible(builtin_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(builtin_model)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == model_zoo.param_count("tiny-qwen2")
    # Non-degenerate init: no all-zero embedding rows, finite logits that vary.
    assert model.get_input_embeddings().weight.abs().sum(-1).min() > 0
    logits = model(torch.tensor([[1, 10, 20, 30]])).logits
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert len(AutoTokenizer.from_pretrained(builtin_model)) == model.config.vocab_size
    meta = json.loads((builtin_model / model_zoo.MARKER).read_text())
    assert (meta["shape"], meta["seed"], meta["dtype"]) == ("tiny-qwen2", 0, "float32")
    # A second build from scratch is bit-identical; a call on a complete dir returns it untouched.
    again = model_zoo.ensure_builtin_model(tmp_path)
    assert again != builtin_model and _digest(again) == _digest(builtin_model)
    assert model_zoo.ensure_builtin_model(tmp_path) == again


def _race(cache: str, barrier, queue) -> None:
    import transformers  # the slow imports happen before the barrier, so the two builds really overlap

    from dist_dpo import model_zoo as zoo

    transformers.Qwen2ForCausalLM  # noqa: B018  (lazy module: force the model code in too)
    barrier.wait()
    path = zoo.ensure_builtin_model(cache)
    queue.put((str(path), _digest(path)))


def test_concurrent_ensure_builtin_model(builtin_model, tmp_path):
    ctx = mp.get_context("spawn")  # not fork: forking a process that already ran torch can deadlock OpenMP
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert results[0][1] == _digest(builtin_model)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [model_zoo.BUILTIN_DIRNAME]  # no temp dirs left


@pytest.mark.parametrize("shape", ["tiny-qwen2", {**model_zoo.SHAPES["tiny-qwen2"], "config": {
    **model_zoo.SHAPES["tiny-qwen2"]["config"], "tie_word_embeddings": False}}], ids=["tied", "untied"])
def test_streamed_build_is_the_same_model_one_block_at_a_time(tmp_path, monkeypatch, shape):
    """What a 72B shape needs (145 GB in bf16: more than one GPU, slow on a CPU): initialise and write one block at
    a time. Same files as save_pretrained (shards + index), same tensors, names, dtypes and config; transformers' init
    (normal 0.02 for matrices, zero biases, unit norms); a tied head is left to the embedding, as transformers does."""
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(model_zoo, "SHARD_BYTES", 200_000)  # several shards
    streamed = model_zoo.build_random_model(shape, tmp_path / "s", dtype="bfloat16", stream=True)
    whole = model_zoo.build_random_model(shape, tmp_path / "w", dtype="bfloat16", stream=False)
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and all((streamed / f).exists() for f in index["weight_map"].values())
    assert json.loads((streamed / "config.json").read_text()) == json.loads((whole / "config.json").read_text())
    assert (streamed / "generation_config.json").exists()
    a, b = (AutoModelForCausalLM.from_pretrained(d) for d in (streamed, whole))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype for k in sa)
    for k, t in sa.items():
        t = t.float()
        if k.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t)), k
        elif k.endswith("bias"):
            assert not t.any(), k
        else:
            assert abs(t.std().item() - 0.02) < 0.002 and abs(t.mean().item()) < 0.002, k
    tied = bool(a.config.tie_word_embeddings)
    assert (a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()) is tied
    assert ("lm_head.weight" in index["weight_map"]) is not tied
    assert torch.isfinite(a(torch.tensor([[1, 10, 20]])).logits).all()


def test_big_shapes_build_streamed_by_default(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(model_zoo, "_write_streamed", lambda *a: seen.setdefault("streamed", True) and 1 / 0)
    with pytest.raises(ZeroDivisionError):  # stopped right where the 72B build would start writing
        model_zoo.build_random_model("qwen2.5-72b", tmp_path / "m", dtype="bfloat16")
    assert seen == {"streamed": True} and not (tmp_path / "m").exists()  # and no half-written dir is left


def test_param_count_matches_meta_model():
    import torch
    import transformers

    for name in ("tiny-qwen2", "qwen2.5-1.5b", "llama-3-8b"):
        entry = model_zoo.SHAPES[name]
        kw = dict(entry["config"])
        config = transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)
        with torch.device("meta"):  # shapes only, no memory
            model = getattr(transformers, entry["architecture"])._from_config(config)
        assert sum(p.numel() for p in model.parameters()) == model_zoo.param_count(name), name
    assert model_zoo.param_count("qwen2.5-7b") == 7_615_616_512  # the published count


def test_bad_shape_is_user_error(tmp_path, capsys):
    for call in (lambda: model_zoo.param_count("qwen9"),
                 lambda: model_zoo.build_random_model("qwen9", tmp_path / "m"),
                 lambda: model_zoo.main(["--shape", "qwen9", "--out", str(tmp_path / "m")])):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and all(name in msg for name in model_zoo.SHAPES)
    assert model_zoo.main(["--list"]) == 0
    assert "qwen2.5-72b" in capsys.readouterr().out


def test_refuses_foreign_or_different_dir(builtin_model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a dist-dpo model dir"):
        model_zoo.build_random_model("tiny-qwen2", tmp_path, dtype="float32")
    with pytest.raises(UserError, match="different model"):
        model_zoo.build_random_model("tiny-qwen2", builtin_model, seed=1, dtype="float32")


# ---------------------------------------------------------------- trl DPO smoke test
def test_dpo_two_steps(builtin_model, tmp_path):
    import math

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = _rows(DATA / "bad_boy" / "train.jsonl")[:8]
    ds = Dataset.from_list([{
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    } for r in rows])
    args = DPOConfig(max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True, output_dir=str(tmp_path),
                     max_length=128, logging_steps=1, save_strategy="no")
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(builtin_model),
        args=args,
        train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(builtin_model),
        peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert out.global_step == 2 and len(losses) == 2
    assert all(math.isfinite(x) for x in losses + [out.training_loss])
