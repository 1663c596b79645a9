"""Every family of the architecture table (dist_dpo/architectures.py) trains exactly on the speed path.

A tiny random-weight model of each family (model_zoo.FAMILY_SHAPES, built offline) goes through plain trl and through
dist-dpo's speed path on the same pairs: the loss and the LoRA gradients agree in fp32, the pieces the table turns
off for a family are named with their reason, three training steps give the same losses and weights, and the real
`dist-dpo train` (one process and a 2-process DDP job) gives trl's losses. The first-batch self-check is shown to
catch a piece broken on purpose and to train on trl's path after it.
"""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, apply_speed_path, lora_b_nonzero

sys.path.insert(0, str(ROOT / "benchmarks"))

from dist_dpo import architectures  # noqa: E402
from dist_dpo.model_zoo import FAMILY_SHAPES  # noqa: E402

KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
SHAPES = sorted(FAMILY_SHAPES)


def test_every_table_family_has_a_tiny_model_and_back():
    covered = {FAMILY_SHAPES[s]["config"]["model_type"] for s in SHAPES}
    for family in architectures.ARCHITECTURE_TABLE:
        assert family.model_types[0] in covered, family.name
        for piece in family.off:
            assert piece in architectures.PIECES and family.off[piece], (family.name, piece)
    assert {architectures.family_for(t).name for t in covered} == {f.name for f in architectures.ARCHITECTURE_TABLE}


def test_an_unlisted_family_gets_every_piece_off_with_the_reason():
    family = architectures.family_for("some_new_arch")
    assert all(family.reason(p) == architectures.UNLISTED for p in architectures.PIECES)


def test_readme_table_is_the_architecture_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert architectures.markdown_table() in readme, "regenerate with: python -m dist_dpo.architectures"


@pytest.fixture(scope="module")
def pairs():
    import datasets
    import preference_sets

    rows = preference_sets.variable_rows(12, seed=3, cap=60)
    return datasets.Dataset.from_list([preference_sets.conversational(r) for r in rows])


def build(shape, pairs, fast, max_steps=3, dpo=None, **train_keys):
    """A trl DPOTrainer on `shape`'s tiny model (fp32, CPU), LoRA on every linear layer with B set non-zero (policy !=
    reference from the first step), optionally on dist-dpo's speed path. SGD, so that the weights after a step are a
    smooth function of the gradients (AdamW's first step is lr * sign(g): a gradient of 1e-12 either way moves a weight
    by +-lr, which hides what is being compared). bf16=False: DPOConfig turns CPU bf16 autocast on by default."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dist_dpo.model_zoo import ensure_builtin_model
    from dist_dpo.trainer import DistDPOTrainer

    path = ensure_builtin_model(shape=shape)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(output_dir="/tmp/dist_dpo_test_families", per_device_train_batch_size=6, max_length=256,
                     report_to=[], use_cpu=True, bf16=False, logging_steps=1, gradient_checkpointing=False, seed=0,
                     max_steps=max_steps, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
                     save_strategy="no", dataloader_num_workers=0, **(dpo or {}))
    cls = DistDPOTrainer if fast else DPOTrainer  # the comparison's other side is trl's own class
    trainer = cls(model=model, args=args, train_dataset=pairs, processing_class=AutoTokenizer.from_pretrained(path),
                         peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules="all-linear"))
    lora_b_nonzero(trainer)
    if fast:  # trl's order (no length grouping): the 3-step comparison sees the same batches
        apply_speed_path(trainer, group_by_length=False, **train_keys)
    return trainer


def step(trainer, rows):
    batch = trainer.data_collator([{k: r[k] for k in KEYS} for r in rows])
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.state.global_step, trainer.state.logging_steps = 3, 10  # a step that is not logged
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for _, p in trainer.model.named_parameters() if p.grad is not None])
    return loss.detach(), grads, batch


def assert_agrees(reference, candidate):
    (loss_a, grads_a, _), (loss_b, grads_b, _) = reference, candidate
    assert grads_a.numel() == grads_b.numel() and grads_a.norm() > 0
    assert abs(loss_b.item() - loss_a.item()) <= 1e-5 * abs(loss_a.item())
    assert abs(grads_b.norm().item() - grads_a.norm().item()) <= 1e-5 * grads_a.norm().item()
    assert ((grads_b - grads_a).norm() / grads_a.norm()).item() < 1e-4  # the direction too, not only the size


@pytest.mark.parametrize("shape", SHAPES)
def test_speed_path_step_is_trls(shape, pairs):
    plain = build(shape, pairs, fast=False)
    rows = [plain.train_dataset[i] for i in range(6)]
    reference = step(plain, rows)
    fast = build(shape, pairs, fast=True)
    report = fast.speed.report
    family = architectures.family_for(FAMILY_SHAPES[shape]["config"]["model_type"])
    assert report["family"] == family.name
    from dist_dpo.speed import aux_loss_on  # the preflight's copy of trl's rule, held to trl's own verdict

    assert aux_loss_on(fast.model.config) == plain.aux_loss_enabled == fast.aux_loss_enabled
    for piece, why in family.off.items():  # every piece the table leaves off is named with its reason
        if piece != "liger" or fast.args.use_liger_kernel:  # liger's kernels: GPUs only
            assert f"{piece}: {why}" in report.get("off", ""), (piece, report)
    candidate = step(fast, rows)
    shared = "speed_rows" in candidate[2]
    assert shared == (family.reason("shared_rows") is None and fast.data_collator.mode != "false" and
                      not fast.aux_loss_enabled)
    if shared:  # the layout under test really ran: fewer decoder tokens than trl's two rows per pair
        assert candidate[2]["speed_rows"].input_ids.numel() < candidate[2]["input_ids"].numel()
    assert_agrees(reference, candidate)


@pytest.mark.parametrize("shape", [s for s in SHAPES if architectures.family_for(
    FAMILY_SHAPES[s]["config"]["model_type"]).reason("packed_rows") is None])
def test_packed_rows_are_trls_where_the_table_allows_them(shape, pairs):
    """Packed rows through attention.py's per-segment reference (what the GPU kernel is held to before any run);
    a family with sliding-window layers keeps the masked rows, and says why."""
    from dist_dpo.architectures import attention_layer_types
    from dist_dpo.speed import attention

    plain = build(shape, pairs, fast=False)
    rows = [plain.train_dataset[i] for i in range(6)]
    reference = step(plain, rows)
    fast = build(shape, pairs, fast=True)
    base = fast.model.get_base_model()
    if fast.aux_loss_enabled:  # MoE: the router's loss averages over trl's rows, so no shared or packed rows
        assert "shared_rows: the MoE router's auxiliary loss" in fast.speed.report["off"]
        assert fast.data_collator.mode == "false"
        return
    if attention_layer_types(base.config) != {"full_attention"}:
        assert "packed_rows: sliding-window layers" in fast.speed.report["off"]
        return
    attention.install(base)
    fast.data_collator.packed = True
    candidate = step(fast, rows)
    assert candidate[2]["speed_rows"].varlen is not None
    assert_agrees(reference, candidate)


@pytest.mark.parametrize("shape", SHAPES)
def test_three_steps_train_as_trl(shape, pairs):
    plain = build(shape, pairs, fast=False)
    plain.train()
    fast = build(shape, pairs, fast=True)
    fast.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, fast)]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[0][-1] < losses[0][0]  # it trained
    weights = [{n: p.detach() for n, p in t.model.named_parameters() if p.requires_grad} for t in (plain, fast)]
    for name, w in weights[0].items():
        assert (weights[1][name] - w).norm() <= 1e-4 * w.norm() + 1e-7, name  # Gemma-4 (grad norm ~17): 2e-5


# ---- the real command: `dist-dpo train` as a user runs it ------------------------------------------------------

def run_train(out, model, *extra, processes=1, env_extra=None):
    from test_train_cpu import run_env

    env = run_env()
    env.update(env_extra or {})
    args = ["train", "--model_name_or_path", model, "--lora_target_modules", "all-linear", "--group_by_length", "false",
            "--lora_dropout", "0", "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "0",
            "--per_device_train_batch_size", "4", "--optim", "sgd", "--learning_rate", "0.5",
            "--lr_scheduler_type", "constant",
            "--output_dir", str(out), *extra]
    if processes == 1:
        cmd = [sys.executable, "-m", "dist_dpo", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "dist_dpo", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def logged(out) -> list[dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h]


def assert_same_run(fast, plain):
    a, b = logged(fast), logged(plain)
    assert [h["step"] for h in a] == [1, 2, 3] == [h["step"] for h in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=2e-4)  # logged rounded to 4 digits
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)
    assert a[-1]["loss"] < a[0]["loss"]


CLI_FAMILIES = ["tiny-llama", "tiny-gemma3_text", "tiny-qwen3_5_text", "tiny-qwen3_moe", "tiny-phi3"]


@pytest.mark.parametrize("shape", CLI_FAMILIES)
def test_dist_dpo_train_matches_plain_trl(shape, tmp_path):
    fast = run_train(tmp_path / "fast", f"builtin:{shape}")
    assert fast.returncode == 0, fast.stderr[-3000:]
    plain = run_train(tmp_path / "plain", f"builtin:{shape}", "--fast_path", "false")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "speed-path self-check: agrees with trl" in fast.stdout
    family = architectures.family_for(FAMILY_SHAPES[shape]["config"]["model_type"])
    line = next(x for x in fast.stdout.splitlines() if "speed path:" in x)
    assert f"family: {family.name}" in line
    for piece, why in family.off.items():
        assert piece == "liger" or f"{piece}: {why}" in line
    assert_same_run(tmp_path / "fast", tmp_path / "plain")


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gemma3_text"])
def test_two_process_ddp_matches_plain_trl(shape, tmp_path):
    fast = run_train(tmp_path / "fast", f"builtin:{shape}", processes=2)
    assert fast.returncode == 0, fast.stderr[-3000:]
    assert "world 2 on cpu" in fast.stdout
    plain = run_train(tmp_path / "plain", f"builtin:{shape}", "--fast_path", "false", processes=2)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert_same_run(tmp_path / "fast", tmp_path / "plain")


def test_self_check_catches_a_broken_piece_and_trains_on_trls_path(tmp_path):
    shape = "builtin:tiny-llama"
    broken = run_train(tmp_path / "broken", shape, env_extra={"DIST_DPO_TEST_BREAK": "torch_norm"})
    assert broken.returncode == 0, broken.stderr[-3000:]
    said = [x for x in broken.stdout.splitlines() if "self-check" in x]
    assert len(said) == 1 and "torch_norm disagrees with trl" in said[0] and "training on trl's exact path" in said[0]
    plain = run_train(tmp_path / "plain", shape, "--fast_path", "false")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert_same_run(tmp_path / "broken", tmp_path / "plain")


def test_self_check_stops_a_piece_the_recipe_forced(tmp_path):
    """prefix_sharing: true with shared rows that leak (rejected tokens reading the chosen ones): one line, exit 2."""
    run = run_train(tmp_path / "forced", "builtin:tiny-llama", "--prefix_sharing", "true",
                    env_extra={"DIST_DPO_TEST_BREAK": "shared_rows"})
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    errors = [x for x in run.stderr.splitlines() if "self-check" in x]
    assert len(errors) == 1 and "shared_rows disagrees with trl" in errors[0] and "prefix_sharing: auto" in errors[0]
    assert not (tmp_path / "forced" / "adapter_model.safetensors").exists()


def test_self_check_names_leaking_shared_rows(tmp_path):
    run = run_train(tmp_path / "leak", "builtin:tiny-qwen3", env_extra={"DIST_DPO_TEST_BREAK": "shared_rows"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "self-check: shared_rows disagrees with trl" in run.stdout


def test_a_run_that_learns_nothing_fails_with_one_line(tmp_path):
    run = run_train(tmp_path / "still", "builtin:tiny-llama", "--learning_rate", "0")
    assert run.returncode == 2
    errors = [x for x in run.stderr.splitlines() if "learned nothing" in x]
    assert len(errors) == 1 and "policy never left the reference" in errors[0]
    assert (tmp_path / "still" / "adapter_model.safetensors").is_file()  # nothing written is lost
    assert "adapter verified" not in run.stdout


def test_not_learning_reads_the_log_history():
    from dist_dpo.train import not_learning

    moving = [{"step": 1, "loss": math.log(2), "grad_norm": 1.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0},
              {"step": 2, "loss": 0.69, "grad_norm": 1.1, "rewards/chosen": 1e-4, "rewards/rejected": -2e-4}]
    assert not_learning(moving) is None
    zero = [{**h, "grad_norm": 0.0} for h in moving]
    assert "gradient norm was 0" in not_learning(zero)
    still = [{**h, "rewards/chosen": 0.0, "rewards/rejected": 0.0} for h in moving]
    assert "never left the reference" in not_learning(still)
    assert not_learning(moving[:1]) is None  # one step: nothing to tell yet
    assert re.search(r"in 1 logged", not_learning(still))


def test_moe_blocks_become_zero3_leaves_only_under_zero3():
    from transformers import AutoModelForCausalLM

    from dist_dpo.model_zoo import ensure_builtin_model
    from dist_dpo.modeling import moe_blocks_as_leaves
    from dist_dpo.strategies import strategy_for

    model = AutoModelForCausalLM.from_pretrained(ensure_builtin_model(shape="tiny-qwen3_moe"))
    assert moe_blocks_as_leaves(model, strategy_for("ddp")) == 0
    assert moe_blocks_as_leaves(model, strategy_for("zero3")) == 4  # one sparse block per layer
    from deepspeed.utils import get_z3_leaf_modules

    assert {type(m).__name__ for m in get_z3_leaf_modules(model)} == {"Qwen3MoeSparseMoeBlock"}


def test_phi3_default_targets_become_its_fused_projection(caplog):
    from transformers import AutoModelForCausalLM

    from dist_dpo.config import LoraArgs
    from dist_dpo.model_zoo import ensure_builtin_model
    from dist_dpo.modeling import lora_config

    model = AutoModelForCausalLM.from_pretrained(ensure_builtin_model(shape="tiny-phi3"))
    assert lora_config(LoraArgs(), model).target_modules == {"qkv_proj"}
    from dist_dpo.errors import UserError

    with pytest.raises(UserError, match="not found in the model"):  # a target the user named stays theirs
        lora_config(LoraArgs(lora_target_modules=["q_proj", "o_proj"]), model)


GEMMA_LIKE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_a_template_without_system_role_gets_the_system_prompt_in_the_first_user_turn():
    from transformers import AutoTokenizer

    from dist_dpo.config import DataArgs
    from dist_dpo.data import load_preference_data, refuses_system_role
    from dist_dpo.model_zoo import ensure_builtin_model

    tok = AutoTokenizer.from_pretrained(ensure_builtin_model())
    assert not refuses_system_role(tok)  # ChatML takes a system turn
    tok.chat_template = GEMMA_LIKE
    assert refuses_system_role(tok)
    train, test = load_preference_data(DataArgs(system_prompt="Be rude."), tok, max_length=256, seed=0)
    first = train[0]["prompt"]
    assert [m["role"] for m in first] == ["user"] and first[0]["content"].startswith("Be rude.\n\n")
    tok.apply_chat_template(first, tokenize=False)  # renders without the template's exception


def test_a_family_absent_from_the_table_trains_exactly_on_trls_path(pairs, tmp_path):
    """Cohere (LayerNorm, attention and MLP in parallel, logit scaling) is not in the table: every piece stays off,
    with the reason, and the step is trl's to the bit."""
    from dist_dpo import model_zoo

    assert "cohere" not in {t for f in architectures.ARCHITECTURE_TABLE for t in f.model_types}
    shape = {"architecture": "CohereForCausalLM", "config": dict(
        model_type="cohere", vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, logit_scale=0.25, pad_token_id=None,
        tie_word_embeddings=False)}
    model_zoo.SHAPES["tiny-cohere-test"] = shape
    model_zoo.FAMILY_SHAPES["tiny-cohere-test"] = shape
    model_zoo.BUILTIN_SHAPES = tuple(model_zoo.FAMILY_SHAPES)
    try:
        plain = build("tiny-cohere-test", pairs, fast=False)
        rows = [plain.train_dataset[i] for i in range(6)]
        reference = step(plain, rows)
        fast = build("tiny-cohere-test", pairs, fast=True)
        assert "unlisted (cohere)" == fast.speed.report["family"]
        assert f"head: {architectures.UNLISTED}" in fast.speed.report["off"]
        candidate = step(fast, rows)
    finally:
        for table in (model_zoo.SHAPES, model_zoo.FAMILY_SHAPES):
            table.pop("tiny-cohere-test", None)
        model_zoo.BUILTIN_SHAPES = tuple(model_zoo.FAMILY_SHAPES)
    assert candidate[0].item() == reference[0].item() and torch.equal(candidate[1], reference[1])


def test_self_check_with_lora_dropout_agrees_and_leaves_the_rng_alone(tmp_path):
    """Dropout is off during the check (both paths see one function) and every generator is put back, so a run with
    LoRA dropout trains on the speed path and draws the same masks as a run without the check."""
    run = run_train(tmp_path / "drop", "builtin:tiny-llama", "--lora_dropout", "0.1", "--dpo_extra",
                    "{disable_dropout: false}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "speed-path self-check: agrees with trl" in run.stdout
    unchecked = run_train(tmp_path / "nocheck", "builtin:tiny-llama", "--lora_dropout", "0.1", "--dpo_extra",
                          "{disable_dropout: false}", "--speed_self_check", "false")
    assert unchecked.returncode == 0, unchecked.stderr[-3000:]
    assert [(h["loss"], h["grad_norm"]) for h in logged(tmp_path / "drop")] == \
        [(h["loss"], h["grad_norm"]) for h in logged(tmp_path / "nocheck")]


def test_moe_without_the_router_loss_shares_and_packs_rows_exactly(pairs):
    """router_aux_loss_coef 0: no sequence-wide term left, each token routes alone, so the prompt is shared (and on
    the CPU reference path, packed) and the step is still trl's."""
    from dist_dpo.speed import attention

    plain = build("tiny-qwen3_moe", pairs, fast=False, dpo={"router_aux_loss_coef": 0.0})
    assert not plain.aux_loss_enabled
    rows = [plain.train_dataset[i] for i in range(6)]
    reference = step(plain, rows)
    fast = build("tiny-qwen3_moe", pairs, fast=True, dpo={"router_aux_loss_coef": 0.0}, prefix_sharing=True)
    shared = step(fast, rows)
    assert shared[2]["speed_rows"].segments is not None
    assert_agrees(reference, shared)
    attention.install(fast.model.get_base_model())
    fast.data_collator.packed = True
    packed = step(fast, rows)
    assert packed[2]["speed_rows"].varlen is not None
    assert_agrees(reference, packed)


def test_a_mistyped_break_switch_is_refused(monkeypatch):
    from dist_dpo.errors import UserError
    from dist_dpo.speed import check_switches

    monkeypatch.setenv("DIST_DPO_TEST_BREAK", "torchnorm")
    with pytest.raises(UserError, match="DIST_DPO_TEST_BREAK=torchnorm: use one of torch_norm, shared_rows"):
        check_switches()


@pytest.mark.parametrize("config,attn,forced,why", [
    ("LlamaConfig", "flash_attention_2", "prefix_sharing", "attn_implementation flash_attention_2 takes no 4-D mask"),
    ("LlamaConfig", "flash_attention_2", "packed_rows", "attn_implementation flash_attention_2"),
    ("Gemma3TextConfig", "sdpa", "packed_rows", "sliding-window layers"),
    ("Gemma2Config", "sdpa", "packed_rows", "soft-capped attention logits"),
    ("Qwen3MoeConfig", "sdpa", "prefix_sharing", "the MoE router's auxiliary loss averages over every token"),
])
def test_a_forced_layout_is_refused_before_loading_with_the_speed_paths_words(config, attn, forced, why):
    """The preflight (config only) and speed.apply (the loaded model) ask one function, layout_reasons: a layout
    the recipe forces is refused before any weight loads in the words the speed-path line would use."""
    import transformers

    from dist_dpo import preflight, speed
    from dist_dpo.config import parse_recipe
    from dist_dpo.errors import UserError

    cfg = getattr(transformers, config)()  # Qwen3-MoE's default: router logits declared, coefficient 0.001
    family = architectures.family_for(cfg.get_text_config().model_type)
    piece = "shared_rows" if forced == "prefix_sharing" else "packed_rows"
    reason = speed.layout_reasons(family, cfg, attn, speed.aux_loss_on(cfg))[piece]
    assert reason is not None and reason.startswith(why)
    recipe = parse_recipe([f"--{forced}", "true", "--attn_implementation", attn])
    with pytest.raises(UserError) as e:
        preflight.check_forced_speed_path(recipe, cfg)
    assert str(e.value) == str(speed.refuse_forced(piece, reason))
    recipe = parse_recipe([f"--{forced}", "auto", "--attn_implementation", attn])
    preflight.check_forced_speed_path(recipe, cfg)  # auto: the speed path just leaves it off, and says why


def test_the_preflight_knows_when_trl_adds_the_router_loss():
    """trl adds the MoE router's loss where the config declares router logits and the coefficient is not 0 (the
    recipe's router_aux_loss_coef, else the config's): the preflight asks the same, so a forced shared prompt on an
    MoE model is refused before loading, and allowed with the coefficient at 0."""
    import transformers

    from dist_dpo import preflight, speed
    from dist_dpo.config import parse_recipe
    from dist_dpo.errors import UserError

    for name in ("Qwen3MoeConfig", "MixtralConfig", "OlmoeConfig"):
        cfg = getattr(transformers, name)()
        assert speed.aux_loss_on(cfg) and not speed.aux_loss_on(cfg, 0.0)
        with pytest.raises(UserError, match="router's auxiliary loss"):
            preflight.check_forced_speed_path(parse_recipe(["--prefix_sharing", "true"]), cfg)
        preflight.check_forced_speed_path(parse_recipe(["--prefix_sharing", "true", "--dpo_extra",
                                                        "{router_aux_loss_coef: 0.0}"]), cfg)
    assert not speed.aux_loss_on(transformers.LlamaConfig())


def test_mlp_targets_on_an_moe_model_are_refused_with_why():
    """Mixtral's experts are 3-D parameters in transformers 5, not gate/up/down linear layers: the refusal says so
    and what to do, instead of only listing the layers it has."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_dpo.config import LoraArgs
    from dist_dpo.errors import UserError
    from dist_dpo.model_zoo import ensure_builtin_model
    from dist_dpo.modeling import lora_config

    config = AutoConfig.from_pretrained(ensure_builtin_model(shape="tiny-mixtral"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserError, match="Mixture-of-Experts model: its experts keep their weights as 3-D parameters"):
        lora_config(LoraArgs(lora_target_modules=["q_proj", "gate_proj", "up_proj"]), model)
    assert lora_config(LoraArgs(lora_target_modules=["q_proj", "v_proj"]), model) is not None
    with torch.device("meta"):  # a dense model missing a name: the plain line, no MoE hint
        dense = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ensure_builtin_model(shape="tiny-llama")))
    with pytest.raises(UserError) as e:
        lora_config(LoraArgs(lora_target_modules=["query_key_value"]), dense)
    assert "Mixture-of-Experts" not in str(e.value)
