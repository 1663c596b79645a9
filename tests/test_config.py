"""Recipe parsing: YAML + CLI overrides, types, and one-line errors that name the key and suggest a fix."""

import pytest
import yaml

from dist_dpo.config import KEYS, SECTIONS, build_parser, parse_recipe
from dist_dpo.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def test_shipped_recipes_parse():
    for name in ("demo", "seed_lora", "seed_qlora"):
        r = parse_recipe(["--config", f"recipes/{name}.yaml"])
        assert r.source.endswith(f"{name}.yaml")
    q = parse_recipe(["--config", "recipes/seed_qlora.yaml"])
    assert q.model.load_in_4bit and q.train.optim == "paged_adamw_8bit"
    assert q.lora.lora_r == 8 and q.lora.lora_alpha == 32 and q.lora.lora_target_modules == ["q_proj", "v_proj"]


def test_cli_overrides_yaml_and_types(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 1.0e-5\n  max_steps: 3\n")
    r = parse_recipe(["--config", path, "--learning_rate", "2e-4", "--load_in_4bit",
                      "--lora_target_modules", "q_proj,k_proj", "--gradient_checkpointing", "false"])
    assert r.train.learning_rate == 2e-4 and r.train.max_steps == 3
    assert r.model.load_in_4bit is True and r.train.gradient_checkpointing is False
    assert r.lora.lora_target_modules == ["q_proj", "k_proj"]
    assert r.model.tokenizer_name_or_path is None


def test_flat_yaml_is_accepted(tmp_path):
    r = parse_recipe(["--config", write(tmp_path, "lora_r: 16\nbeta: 0.2\n")])
    assert r.lora.lora_r == 16 and r.train.beta == 0.2


@pytest.mark.parametrize(
    "text, argv, needle",
    [
        ("train:\n  lerning_rate: 1\n", [], "unknown key 'lerning_rate' in section 'train'; did you mean 'learning_rate'"),
        ("trian:\n  max_steps: 1\n", [], "unknown section or key 'trian'; did you mean 'train'"),
        ("model:\n  beta: 0.1\n", [], "key 'beta' belongs in section 'train'"),
        ("train:\n  max_steps: ten\n", [], "'max_steps' must be an integer, got 'ten'"),
        ("train:\n  learning_rate: -1\n", [], "'learning_rate' must be >= 0.0"),
        ("lora:\n  lora_r: 0\n", [], "'lora_r' must be >= 1"),
        ("model:\n  dtype: fp8\n", [], "'dtype' must be one of auto, bfloat16, float16, float32"),
        ("model:\n  trust_remote_code: maybe\n", [], "must be true or false"),
        ("[1, 2]\n", [], "must be a mapping of sections"),
        ("train: [\n", [], "is not valid YAML"),
        ("", ["--max_stepz", "3"], "unknown option '--max_stepz'; did you mean 'max_steps'"),
        ("", ["--load_in_4bit", "--load_in_8bit"], "load_in_4bit and load_in_8bit are both true"),
        ("", ["--load_in_4bit", "--use_peft", "false"], "keep use_peft true"),
        ("", ["--report_to", "wandb,none"], "mixes 'none'"),
        ("", ["--dpo_extra", "{precompute_ref_logprobs: true}"], "did you mean 'precompute_ref_log_probs'"),
        ("", ["--dpo_extra", "{beta: 0.3}"], "is a dist-dpo key"),
        ("", ["--dpo_extra", "{dataset_num_proc: x}"], "'dataset_num_proc' must be a whole number >= 1"),
        ("", ["--dpo_extra", "{dataset_num_proc: 0}"], "got 0"),
        ("", ["--resume", "/no/such/ckpt"], "is not a checkpoint directory"),
    ],
)
def test_bad_recipes_fail_with_one_clear_line(tmp_path, text, argv, needle):
    with pytest.raises(UserError) as e:
        parse_recipe(["--config", write(tmp_path, text), *argv])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_recipe_lists_shipped_ones():
    with pytest.raises(UserError, match="packaged recipes: demo, seed_lora, seed_qlora"):
        parse_recipe(["--config", "recipes/nope.yaml"])


def test_help_documents_every_option():
    text = build_parser().format_help()
    for key, (_, field, _) in KEYS.items():
        assert f"--{key}" in text, key
        assert field.metadata["help"].split()[0] in text
    assert len(KEYS) == sum(len(cls.__dataclass_fields__) for cls in SECTIONS.values())


def test_resolved_config_round_trips(tmp_path):
    r = parse_recipe(["--config", "recipes/seed_qlora.yaml", "--max_steps", "7"])
    out = tmp_path / "resolved.yaml"
    r.write(out)
    data = yaml.safe_load(out.read_text())
    assert set(data) == set(SECTIONS)
    again = parse_recipe(["--config", str(out)])
    assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_bad_stack_dump_interval_is_one_line_from_rank0(rank, printed):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIST_DPO_STACKS_AFTER_S": "soon", "RANK": rank}
    proc = subprocess.run([sys.executable, "-m", "dist_dpo", "train", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == (["dist-dpo: error: DIST_DPO_STACKS_AFTER_S='soon' must be a number of seconds > 0"] if printed
                     else [])
