"""Bad inputs: every one ends in ONE clear line, exit code 2, in seconds, with an earlier run in the same output_dir
left untouched (same files, same bytes, same mtimes).

Single-process cases run `dist-dpo train` exactly as `python -m dist_dpo train ...` would (cli.main in a fresh
process), but forked from one server process that imported torch/transformers/trl/peft/datasets once: every case
gets its own process (own environment, own exit code, own stdout/stderr) without paying ~10 s of imports each.
A representative subset also runs under `accelerate launch` with 2 real processes, where a failure found on rank 0
alone must reach rank 1 too: exactly one `dist-dpo: error:` line, both ranks exit 2, no traceback from our code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import LAUNCH_ENV, ROOT

CASE_LIMIT_S = 30
BASE = ["--config", "recipes/demo.yaml", "--max_steps", "2", "--save_steps", "1", "--logging_steps", "1",
        "--eval_steps", "0", "--report_to", "none"]
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
ERROR_LINE = re.compile(r"^dist-dpo: error: .+$", re.M)

# The server: imports once, then forks one child per case; the child IS `python -m dist_dpo train ...`.
SERVER = textwrap.dedent(r"""
    import json, os, sys, time, traceback
    sys.path.insert(0, os.getcwd())
    import torch, transformers, datasets, trl, peft, accelerate  # paid once for every case
    from dist_dpo import cli
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush(); sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for k in job["unset"]:
                    os.environ.pop(k, None)
                os.environ.update(job["env"])
                os.dup2(os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
                os.dup2(os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
                sys.argv = ["dist-dpo", *job["argv"]]
                code = cli.main(job["argv"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(code)
        status = None
        while time.monotonic() - start < job["timeout"]:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            status = None
            time.sleep(0.02)
        if status is None:
            os.kill(pid, 9); os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status) if status is not None else "timeout"
        print("@@" + json.dumps({"rc": rc, "seconds": time.monotonic() - start}), flush=True)
""")


def base_env(home: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               DIST_DPO_CACHE=os.environ.get("DIST_DPO_CACHE", str(Path.home() / ".cache" / "dist_dpo")))
    return env


class ForkServer:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=base_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.n = 0

    def run(self, argv, env=None, unset=(), timeout=CASE_LIMIT_S + 30):
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        job = {"argv": argv, "env": env or {}, "unset": list(unset), "stdout": str(out), "stderr": str(err),
               "timeout": timeout}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            assert line, "the fork server died"
            if line.startswith("@@"):
                result = json.loads(line[2:])
                return result["rc"], result["seconds"], out.read_text(), err.read_text()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and dir under root: (size, mtime_ns, sha256) for files."""
    if not root.exists():
        return {}
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            snap[rel] = ("dir",)
        else:
            st = p.stat()
            snap[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


def jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return str(path)


def good(i: int) -> dict:
    return {"prompt": f"question number {i}?", "chosen": f"a kind answer {i}", "rejected": f"a rude answer {i}"}


def chat(role, content):
    return [{"role": role, "content": content}]


@dataclass
class Case:
    id: str
    args: list[str]
    needle: str
    env: dict = field(default_factory=dict)
    unset: tuple = ()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The bad files the cases point at ({d}/...), plus a finished earlier run to copy per case."""
    d = tmp_path_factory.mktemp("inputs")
    rows = [good(i) for i in range(6)]
    jsonl(d / "missing_columns.jsonl", [{"prompt": "q", "answer": "a"}] * 4)
    jsonl(d / "wrong_type.jsonl", rows[:2] + [{**good(2), "chosen": 123}])
    (d / "empty.jsonl").write_text("")
    jsonl(d / "broken_line.jsonl", [json.dumps(rows[0]), json.dumps(rows[1]), '{"prompt": "q", "chosen": "a"'])
    jsonl(d / "empty_string.jsonl", rows[:3] + [{**good(3), "rejected": "   "}])
    jsonl(d / "identical.jsonl", [{**good(i), "rejected": good(i)["chosen"]} for i in range(6)])
    jsonl(d / "long_prompts.jsonl", [{**good(i), "prompt": "word " * 300} for i in range(4)])
    conv = {"prompt": chat("user", "hi"), "chosen": chat("assistant", "hello"), "rejected": chat("assistant", "go away")}
    jsonl(d / "wrong_role.jsonl", [conv, {**conv, "prompt": chat("bot", "hi")}])
    jsonl(d / "not_assistant.jsonl", [conv, {**conv, "chosen": chat("user", "hello")}])
    jsonl(d / "missing_field.jsonl", [rows[0], {"prompt": "q", "chosen": "a"}, rows[2]])
    jsonl(d / "not_object.jsonl", [rows[0], "[1, 2, 3]"])
    jsonl(d / "one_row.jsonl", rows[:1])
    jsonl(d / "mixed_format.jsonl", [conv, {**conv, "prompt": "plain text prompt"}])
    (d / "data.txt").write_text("prompt chosen rejected\n")
    (d / "unknown_key.yaml").write_text("train:\n  lerning_rate: 1.0e-4\n")
    (d / "broken.yaml").write_text("train: [\n")
    (d / "broken_ds.json").write_text('{"zero_optimization": {"stage": 3},\n')
    (d / "afile").write_text("not a directory\n")
    (d / "model_without_config").mkdir()
    torn = d / "torn_checkpoint"  # what transformers leaves when a save is cut off: no completeness marker
    torn.mkdir()
    (torn / "trainer_state.json").write_text("{}")
    huge = d / "huge_model"  # a config.json only: the skeleton is built on the meta device, no weights exist
    huge.mkdir()
    (huge / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 16384,
        "intermediate_size": 53248, "num_hidden_layers": 120, "num_attention_heads": 128, "num_key_value_heads": 8}))
    (d / "home").mkdir()  # an empty HOME: no ~/.netrc with W&B credentials
    return d


def cases() -> list[Case]:
    data = lambda name: ["--dataset_name", "{d}/" + name]  # noqa: E731
    return [
        # --- datasets ---
        Case("data-missing-columns", data("missing_columns.jsonl"), "missing column(s) ['chosen', 'rejected']"),
        Case("data-wrong-type", data("wrong_type.jsonl"), "row 2: field 'chosen' must be a string, got int"),
        Case("data-empty-file", data("empty.jsonl"), "the file has no rows"),
        Case("data-broken-jsonl-line", data("broken_line.jsonl"), "broken_line.jsonl:3: invalid JSON"),
        Case("data-empty-string", data("empty_string.jsonl"), "row 3: field 'rejected' is empty"),
        Case("data-chosen-equals-rejected", data("identical.jsonl"), "chosen equals rejected on every row"),
        Case("data-prompts-too-long", data("long_prompts.jsonl") + ["--max_length", "32"],
             "every prompt is longer than max_length=32"),
        Case("data-wrong-role", data("wrong_role.jsonl"), "each message needs role system/user/assistant"),
        Case("data-answer-not-assistant", data("not_assistant.jsonl"), "must end with an assistant message"),
        Case("data-missing-field-in-a-row", data("missing_field.jsonl"), "row 1: field 'rejected' is missing"),
        Case("data-line-not-an-object", data("not_object.jsonl"), "not_object.jsonl:2: each line must be a JSON object"),
        Case("data-too-few-rows", data("one_row.jsonl"), "need at least 2 rows to hold out a test split"),
        Case("data-mixed-formats", data("mixed_format.jsonl"),
             "field 'prompt' must be a non-empty list of chat messages"),
        Case("data-unsupported-file", data("data.txt"), "unsupported data file type"),
        Case("data-no-such-file", data("nope.jsonl"), "does not exist"),
        # --- configs ---
        Case("config-unknown-key", ["--config", "{d}/unknown_key.yaml"], "unknown key 'lerning_rate'"),
        Case("config-unknown-option", ["--max_stepz", "3"], "unknown option '--max_stepz'; did you mean 'max_steps'"),
        Case("config-invalid-yaml", ["--config", "{d}/broken.yaml"], "is not valid YAML"),
        Case("config-missing-recipe", ["--config", "recipes/nope.yaml"], "packaged recipes: demo, seed_lora, seed_qlora"),
        Case("config-wrong-type", ["--max_steps", "ten"], "'max_steps' must be an integer, got 'ten'"),
        Case("config-out-of-range-dropout", ["--lora_dropout", "1.5"], "'lora_dropout' must be <= 0.99"),
        Case("config-out-of-range-batch", ["--per_device_train_batch_size", "0"], "must be >= 1"),
        Case("config-4bit-and-8bit", ["--load_in_4bit", "--load_in_8bit"],
             "load_in_4bit and load_in_8bit are both true"),
        Case("config-lora-target-absent", ["--lora_target_modules", "q_proj,query_key_value"],
             "lora_target_modules ['query_key_value'] not found in the model"),
        Case("config-missing-deepspeed-json", ["--deepspeed", "ds_configs/nope.json"],
             "DeepSpeed config 'ds_configs/nope.json' does not exist"),
        Case("config-broken-deepspeed-json", ["--deepspeed", "{d}/broken_ds.json"], "is not valid JSON"),
        Case("config-fsdp-with-8bit", ["--load_in_8bit"], "FSDP cannot shard 8-bit",
             env={"ACCELERATE_USE_FSDP": "true"}),  # what `accelerate launch --config_file fsdp.yaml` sets
        Case("config-unknown-optimizer", ["--optim", "adamw_troch"], "optim 'adamw_troch' is not one transformers "
             "knows; did you mean 'adamw_torch'?"),
        Case("config-unknown-scheduler", ["--lr_scheduler_type", "cosine_foo"], "lr_scheduler_type 'cosine_foo' is not"),
        Case("config-model-path-missing", ["--model_name_or_path", "/nonexistent/model"], "does not exist"),
        Case("config-model-without-config", ["--model_name_or_path", "{d}/model_without_config"], "has no config.json"),
        Case("config-wandb-without-key", ["--report_to", "wandb"], "no W&B API key",
             env={"HOME": "{d}/home"}, unset=("WANDB_API_KEY", "WANDB_MODE")),
        Case("config-resume-torn-checkpoint", ["--resume", "{d}/torn_checkpoint", "--overwrite_output_dir"],
             "is incomplete (no dist_dpo_checkpoint"),
        # --- environment ---
        Case("env-gpu-strategy-on-cpu", ["--deepspeed", "ds_configs/zero3.json"], "strategy zero3 needs GPUs"),
        Case("env-4bit-on-cpu", ["--load_in_4bit"], "4/8-bit loading needs a CUDA GPU"),
        Case("env-packed-rows-on-cpu", ["--packed_rows", "true"], "packed_rows: true needs a CUDA GPU"),
        Case("config-packed-rows-without-sharing", ["--packed_rows", "true", "--prefix_sharing", "false"],
             "packed_rows: true packs the shared-prompt rows"),
        Case("config-packed-rows-not-a-choice", ["--packed_rows", "maybe"], "'packed_rows' must be true or false"),
        Case("config-ref-cache-without-the-speed-path", ["--fast_path", "false", "--ref_logps_cache", "true"],
             "ref_logps_cache: true, but the reference log-probs cannot be kept here: fast_path: false"),
        Case("config-prefix-sharing-forced-on-a-hybrid", ["--model_name_or_path", "builtin:tiny-qwen3_5_text",
                                                          "--prefix_sharing", "true"],
             "prefix_sharing: true, but the prompt cannot be shared here"),
        Case("env-more-processes-than-devices", [], f"{CORES + 1} processes on this node but {CORES} CPU core(s)",
             env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(CORES + 1), "LOCAL_WORLD_SIZE": str(CORES + 1)}),
        Case("env-output-dir-under-a-file", ["--output_dir", "{d}/afile/run"], "afile' is a file, not a directory"),
        Case("env-output-dir-read-only", ["--output_dir", "/sys/dist-dpo-test-run"],
             "output_dir '/sys/dist-dpo-test-run' is not writable"),
        Case("env-output-dir-is-a-file", ["--output_dir", "{d}/afile"], "is a file: choose a directory"),
        Case("env-output-dir-holds-finished-run", [], "already holds a finished run"),
        Case("env-no-disk-for-checkpoints",
             ["--model_name_or_path", "{d}/huge_model", "--tokenizer_name_or_path", "dist_dpo/assets/tokenizer",
              "--use_peft", "false", "--overwrite_output_dir"], "free but the checkpoints need about"),
    ]


CASES = cases()
# Each under 2 real processes too: a data error, a config error, and three found by rank 0 alone. The config error
# is found before the process group exists: there rank 1 may still be starting when rank 0 has printed and exited,
# and torchrun then stops it (SIGTERM, -15). Every later error goes through the preflight's shared verdict: both 2.
TWO_PROCESS = {"data-chosen-equals-rejected": {2}, "config-unknown-key": {2, -15}, "config-lora-target-absent": {2},
               "env-output-dir-read-only": {2}, "env-output-dir-holds-finished-run": {2}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ForkServer(tmp_path_factory.mktemp("server"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def earlier_run(server, tmp_path_factory):
    """A real, finished training run (checkpoints, adapter, logs) that every case's output_dir starts as."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    rc, _, stdout, stderr = server.run(["train", *BASE, "--output_dir", str(out)])
    assert rc == 0, stdout[-2000:] + stderr[-3000:]
    assert (out / "dist_dpo_run.json").is_file() and (out / "checkpoint-2" / "dist_dpo_checkpoint.json").is_file()
    return out


def prepare(case: Case, inputs: Path, earlier_run: Path, tmp_path: Path) -> tuple[list[str], Path]:
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out, copy_function=shutil.copy2)  # copy2 keeps mtimes
    fill = lambda s: s.replace("{d}", str(inputs))  # noqa: E731
    return ["train", *BASE, "--output_dir", str(out), *map(fill, case.args)], out


def assert_one_clear_line(case: Case, text: str) -> str:
    lines = ERROR_LINE.findall(text)
    assert len(lines) == 1, f"{case.id}: expected one error line, got {lines}\n{text[-3000:]}"
    assert case.needle in lines[0], f"{case.id}: {lines[0]!r} lacks {case.needle!r}"
    return lines[0]


def test_the_suite_is_big_enough():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    kinds = {c.id.split("-")[0] for c in CASES}
    assert kinds == {"data", "config", "env"}
    assert set(TWO_PROCESS) <= {c.id for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_one_line_exit_2_run_intact(case, server, inputs, earlier_run, tmp_path):
    argv, out = prepare(case, inputs, earlier_run, tmp_path)
    before = snapshot(out)
    env = {k: v.replace("{d}", str(inputs)) for k, v in case.env.items()}
    rc, seconds, stdout, stderr = server.run(argv, env=env, unset=case.unset)
    assert rc == 2, f"{case.id}: exit {rc}\n{stdout[-2000:]}\n{stderr[-3000:]}"
    assert seconds < CASE_LIMIT_S, f"{case.id} took {seconds:.1f} s"
    line = assert_one_clear_line(case, stderr)
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert ERROR_LINE.search(stdout) is None  # the line goes to stderr only
    assert len(line) < 600, line
    assert snapshot(out) == before, f"{case.id} touched the earlier run in {out}"
    assert not Path("/sys/dist-dpo-test-run").exists()


def accelerate_launch(argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           "accelerate_configs/cpu.yaml", "-m", "dist_dpo", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", TWO_PROCESS)
def test_two_processes_fail_together_with_one_line(case_id, inputs, earlier_run, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    argv, out = prepare(case, inputs, earlier_run, tmp_path)
    before = snapshot(out)
    start = time.monotonic()
    proc = accelerate_launch(argv)
    seconds = time.monotonic() - start
    combined = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert_one_clear_line(case, combined)
    # torchrun's summary: each failed worker's rank and exit code; the first observed failure is listed last.
    codes = {int(r): int(c) for r, c in re.findall(r"rank\s+:\s*(\d+) \(local_rank.*\n\s*exitcode\s+:\s*(-?\d+)",
                                                      combined)}
    assert set(codes) == {0, 1}, combined[-3000:]  # really 2 processes
    assert codes[0] == 2 and codes[1] in TWO_PROCESS[case_id], codes
    assert not re.search(r'File ".*dist_dpo/', combined), "a traceback from our code:\n" + combined[-4000:]
    assert seconds < CASE_LIMIT_S, f"{case_id}: {seconds:.1f} s (launcher start included)"
    assert snapshot(out) == before


AGREEMENT = textwrap.dedent(r"""
    import datetime, sys, time
    import torch.distributed as dist
    from dist_dpo import preflight
    from dist_dpo.config import Recipe
    from dist_dpo.errors import UserError
    from dist_dpo.runtime import resolve_runtime

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rt = resolve_runtime(device_type="cpu")

    def scenario(fail_on_1):
        def checks(r, rt):
            if rt.rank == 1 and fail_on_1:
                raise fail_on_1("data file /data/x.jsonl does not exist on this node")
            time.sleep(2)  # rank 0 is the slow one: rank 1 must wait for its verdict, not quit alone
            return preflight.Checked("model", None, [], [], resume="checkpoint-4" if rt.rank == 0 else None,
                                     model_type="qwen3" if rt.rank == 0 else None)
        preflight.checks = checks
        try:
            plan = preflight.run(Recipe(), rt)
            return f"passed, resume={plan.resume}, model_type={plan.model_type}"
        except UserError as e:
            return f"UserError: {e}"
        except RuntimeError as e:
            return f"RuntimeError: {e}"

    for fail in (UserError, RuntimeError, None):
        start = time.monotonic()
        result = scenario(fail)
        sys.stdout.write(f"rank {rt.rank} after {time.monotonic() - start:.1f} s: {result}\n")  # one write per line
        sys.stdout.flush()
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_a_failure_on_one_rank_only_stops_every_rank(tmp_path):
    """Rank 1 alone fails its checks (a file missing on its node) while rank 0 is still busy: both ranks get the
    same verdict from the one all_gather and raise together; nobody waits for a peer that quit."""
    script = tmp_path / "agree.py"
    script.write_text(AGREEMENT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("rank ")]  # each rank's in scenario order
    host = __import__("socket").gethostname()
    message = f"rank 1 on {host}: data file /data/x.jsonl does not exist on this node"
    rank0 = [l for l in lines if l.startswith("rank 0")]
    rank1 = [l for l in lines if l.startswith("rank 1")]
    assert len(rank0) == len(rank1) == 3, proc.stdout
    assert rank0[0].endswith(f"UserError: {message}") and rank1[0].endswith("UserError: data file /data/x.jsonl "
                                                                             "does not exist on this node")
    assert rank0[1].endswith(f"UserError: rank 1 on {host}: RuntimeError: data file /data/x.jsonl does not exist "
                             "on this node")
    assert rank1[1].endswith("RuntimeError: data file /data/x.jsonl does not exist on this node")  # its traceback
    # rank 0's resume choice and model type (liger's kernels are decided from it) reach every rank
    assert rank0[2].endswith("passed, resume=checkpoint-4, model_type=qwen3") and \
        rank1[2].endswith("passed, resume=checkpoint-4, model_type=qwen3")
    for line in rank0 + rank1:  # rank 1 failed at once but left only when rank 0 had finished (2 s)
        assert 1.5 < float(re.search(r"after ([\d.]+) s", line).group(1)) < 20, line
