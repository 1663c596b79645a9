"""`dist-dpo chat` on the shared demo run: --prompt, stdin and interactive modes, base-only, and every bad input."""

import io
import json
import shutil

import pytest

from test_report import cli, fresh_console_logger, shared_run  # noqa: F401  (fixture re-exported)

SYSTEM = "你是一个没有礼貌的人渣，请用人渣的语气回复我"  # recipes/demo.yaml data.system_prompt


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory)[0]


def make_base(path, hidden=64, layers=2):
    """A random tiny Qwen2 of another shape, with the built-in tokenizer: 'an adapter of another base'."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dist_dpo.model_zoo import TOKENIZER_DIR

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=2)
    Qwen2ForCausalLM(config).save_pretrained(path)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy2(f, path / f.name)
    return path


def answers(out: str) -> list[str]:
    return [block.split("Assistant: ", 1)[1].strip() for block in out.split("User: ")[1:]]


def test_prompt_mode_answers_with_the_runs_system_prompt(run, capsys):
    assert cli("chat", run, "--prompt", "你好", "--prompt", "I can't sleep.", "--greedy", "--max_new_tokens", 12) == 0
    out, err = capsys.readouterr()
    got = answers(out)
    assert len(got) == 2 and all(got), out
    assert f"system prompt: {SYSTEM}" in err and "+ adapter" in err


def test_system_override_and_sampling_are_repeatable(run, capsys):
    args = ("chat", run, "--prompt", "你好", "--system", "be nice", "--seed", 3, "--temperature", 0.9,
            "--top_p", 0.8, "--max_new_tokens", 10)
    assert cli(*args) == 0
    first, err = capsys.readouterr()
    assert "system prompt: be nice" in err
    assert cli(*args) == 0
    assert capsys.readouterr().out == first


def test_stdin_lines_are_prompts(run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n\nI can't sleep.\n"))
    assert cli("chat", run, "--greedy", "--max_new_tokens", 8) == 0
    out = capsys.readouterr().out
    assert out.count("User: ") == 2 and "User: I can't sleep." in out


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_interactive_loop_change_system_and_quit(run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", FakeTerminal("你好\n\nchange_system\nbe polite\nhello\nquit\nnever read\n"))
    assert cli("chat", run, "--greedy", "--max_new_tokens", 8) == 0
    out, err = capsys.readouterr()
    assert out.count("Assistant: ") == 2 and "never read" not in out + err
    assert f"system prompt: {SYSTEM}" in err and "system prompt: be polite" in err


def test_base_only_differs_from_tuned(run, capsys):
    assert cli("chat", run, "--prompt", "你好", "--greedy", "--max_new_tokens", 12) == 0
    tuned = answers(capsys.readouterr().out)
    assert cli("chat", run, "--base-only", "--prompt", "你好", "--greedy", "--max_new_tokens", 12) == 0
    out, err = capsys.readouterr()
    assert "(no adapter)" in err and answers(out) != tuned


def test_chat_template_builds_the_prompt(run):
    """The tokenizer's template, not hand-written ChatML: the prompt carries the system turn and the generation cue."""
    from dist_dpo.run_artifacts import load_tokenizer_for, locate

    art = locate(str(run))
    tok = load_tokenizer_for(art, "unused")
    text = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and SYSTEM in text


def test_bad_inputs_are_one_line_exit_2(run, tmp_path, capsys, monkeypatch):
    other = make_base(tmp_path / "other-model")
    same_name = make_base(tmp_path / "x" / "tiny-qwen2-v1")  # right name, wrong shape
    edited = tmp_path / "edited"
    shutil.copytree(run, edited, ignore=shutil.ignore_patterns("checkpoint-*", "wandb", "runs", "plots"))
    cfg = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "Qwen/Qwen2.5-7B"}))
    no_adapter = tmp_path / "no_adapter"
    no_adapter.mkdir()
    shutil.copy2(run / "resolved_config.yaml", no_adapter)
    cases = [
        (("--prompt", ""), run, "--prompt #1 is empty"),
        (("--prompt", "ok", "--prompt", "  "), run, "--prompt #2 is empty"),
        ((), tmp_path / "missing", "does not exist"),
        ((), no_adapter, "holds no adapter"),
        (("--base", other), run, "was trained on"),
        (("--base", same_name), run, "does not fit base"),
        ((), edited, "does not belong to this run"),
        (("--load_in_4bit",), run, "needs a CUDA GPU"),
        (("--top_p", "0"), run, "0 < --top_p <= 1"),
        (("--max_new_tokens", "0"), run, "--max_new_tokens must be >= 1"),
    ]
    for extra, path, message in cases:
        assert cli("chat", path, *extra, *([] if "--prompt" in extra else ["--prompt", "hi"])) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("dist-dpo: error:"), (extra, err)
    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n"))
    assert cli("chat", run) == 2
    assert "stdin held no prompt" in capsys.readouterr().err
    assert cli("chat") == 2
    assert "needs a run dir" in capsys.readouterr().err


def test_long_conversations_drop_the_oldest_turns_but_keep_the_system_prompt(run):
    from types import SimpleNamespace

    from dist_dpo.chat import fit_context
    from dist_dpo.run_artifacts import load_tokenizer_for, locate

    tok = load_tokenizer_for(locate(str(run)), "unused")
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=120))
    turns = [{"role": "system", "content": SYSTEM}]
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i}"}]
    turns.append({"role": "user", "content": "last question"})
    kept = fit_context(turns, tok, model, max_new_tokens=20)
    assert kept[0] == turns[0] and kept[-1] == turns[-1] and len(kept) < len(turns)
    assert kept[1]["role"] == "user"  # whole exchanges go, never half of one
    ids = tok.apply_chat_template(kept, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert len(ids) + 20 <= 120
