"""The launch layer: accelerate_configs/, ds_configs/, launch/*.sh and the Makefile.

Each config is checked by the library that will read it (accelerate's own launcher code, transformers' DeepSpeed
"auto" filler, DeepSpeed's config parser, dist_dpo.runtime), not against a copy of their rules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dist_dpo"  # where the launcher finds the files: the top-level folders link here
ACC_DIR = ROOT / "accelerate_configs"
DS_DIR = ROOT / "ds_configs"
LAUNCH_DIR = ROOT / "launch"
YAMLS = sorted(p.name for p in ACC_DIR.glob("*.yaml"))
ZERO_YAMLS = ["zero2.yaml", "zero3.yaml", "zero3_offload.yaml"]
ZERO_JSONS = ["zero2.json", "zero3.json", "zero3_offload.json"]
SCRIPTS = sorted(p.name for p in LAUNCH_DIR.glob("*.sh"))
TRAIN_TARGETS = ["train-ddp", "train-fsdp", "train-zero2", "train-zero3", "train-zero3-offload",
                 "train-deepspeed", "train-torchrun"]
# accelerate 1.15 refuses these accelerate-yaml keys when deepspeed_config_file is set (DeepSpeedPlugin
# ._deepspeed_config_checks); they must come from the JSON.
REFUSED_WITH_DS_FILE = {"gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                        "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
                        "zero3_save_16bit_model", "mixed_precision"}


def test_expected_files_exist():
    assert set(YAMLS) == {"cpu.yaml", "ddp.yaml", "fsdp.yaml", *ZERO_YAMLS}
    assert {p.name for p in DS_DIR.glob("*.json")} == set(ZERO_JSONS)
    assert (DS_DIR / "README.md").is_file()
    assert set(SCRIPTS) == {"accelerate.sh", "deepspeed.sh", "torchrun.sh", "env.sh", "demo_cpu.sh"}


# --- accelerate configs: run accelerate's own launch-time validation and plugin construction ------------------


def _launch_env(yaml_path: Path, num_processes: int = 2) -> tuple[object, dict]:
    """What `accelerate launch --config_file yaml --num_processes N -m dist_dpo train` hands its workers."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(yaml_path), "--num_processes", str(num_processes), "-m", "dist_dpo", "train"]
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:  # as accelerate.commands.launch.launch_command does
        fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


def _build_plugin(args, env: dict):
    """Construct the plugin a worker's Accelerator builds from that environment; it raises on a bad config."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    with mock.patch.dict(os.environ, env, clear=True):
        if args.use_deepspeed:
            return DeepSpeedPlugin()
        if args.use_fsdp:
            return FullyShardedDataParallelPlugin()
        return None


@pytest.mark.parametrize("name", YAMLS)
def test_accelerate_yaml_loads(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACC_DIR / name))
    assert cfg.num_machines == 1 and cfg.machine_rank == 0 and cfg.main_process_port is not None
    assert cfg.num_processes >= 2, "placeholder default; the launch scripts pass --num_processes $NGPUS"


@pytest.mark.parametrize("name", YAMLS)
def test_accelerate_launch_accepts_yaml(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # the yamls name ds_configs/*.json from the repo root, as the launch scripts run
    args, env = _launch_env(ACC_DIR / name)
    assert args.nproc_per_node == "2"
    plugin = _build_plugin(args, env)
    if name.startswith("zero"):
        assert plugin.zero_stage == (2 if name == "zero2.yaml" else 3)
        assert plugin.zero3_init_flag is (name != "zero2.yaml")
        assert plugin.zero3_save_16bit_model is (name != "zero2.yaml")
        assert plugin.offload_param_device == ("cpu" if name == "zero3_offload.yaml" else "none")
    elif name == "fsdp.yaml":
        from torch.distributed.fsdp import StateDictType

        assert plugin.fsdp_version == 2
        assert plugin.reshard_after_forward is True and plugin.activation_checkpointing is False
        assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT  # the adapter is gathered on save
        assert plugin.cpu_ram_efficient_loading is True
    else:
        assert args.multi_gpu and not args.use_deepspeed and not args.use_fsdp


def test_cpu_yaml_starts_two_processes_through_the_multi_gpu_launcher():
    # MULTI_CPU / use_cpu would go through accelerate's simple launcher: ONE process (see the yaml's header).
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACC_DIR / "cpu.yaml"))
    assert cfg.distributed_type.value == "MULTI_GPU" and cfg.use_cpu is False and cfg.num_processes == 2
    assert cfg.mixed_precision == "no"


@pytest.mark.parametrize("name", [y for y in YAMLS if y != "cpu.yaml"])
def test_gpu_yamls_use_bf16_where_allowed(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACC_DIR / name))
    if name in ZERO_YAMLS:
        # With deepspeed_config_file, precision must come from the JSON ("auto" = the recipe's bf16/fp16).
        assert cfg.mixed_precision is None
        assert not REFUSED_WITH_DS_FILE & set(cfg.deepspeed_config)
    else:
        assert cfg.mixed_precision == "bf16"


@pytest.mark.parametrize("name", ZERO_YAMLS)
def test_zero_yaml_points_at_its_json(name):
    from accelerate.commands.config.config_args import load_config_from_file

    ds_file = load_config_from_file(str(ACC_DIR / name)).deepspeed_config["deepspeed_config_file"]
    assert ds_file == f"ds_configs/{name.removesuffix('.yaml')}.json"
    assert (ROOT / ds_file).is_file()


def test_accelerate_refuses_mixed_precision_next_to_a_deepspeed_file(tmp_path, monkeypatch):
    """Why the ZeRO yamls carry no mixed_precision: accelerate 1.15 rejects it at Accelerator start."""
    monkeypatch.chdir(ROOT)
    text = (ACC_DIR / "zero3.yaml").read_text().replace("distributed_type: DEEPSPEED",
                                                         "distributed_type: DEEPSPEED\nmixed_precision: bf16")
    bad = tmp_path / "zero3_bf16.yaml"
    bad.write_text(text)
    args, env = _launch_env(bad)
    with pytest.raises(ValueError, match="deepspeed_config_file"):
        _build_plugin(args, env)


@pytest.mark.parametrize(
    "name, strategy, offload",
    [("ddp.yaml", "ddp", False), ("fsdp.yaml", "fsdp", False), ("zero2.yaml", "zero2", False),
     ("zero3.yaml", "zero3", False), ("zero3_offload.yaml", "zero3", True), ("cpu.yaml", "ddp", False)],
)
def test_runtime_reads_the_strategy_each_yaml_sets(name, strategy, offload, monkeypatch):
    """The seam with dist_dpo.runtime: a worker started from this yaml resolves the intended strategy."""
    from dist_dpo.runtime import resolve_runtime

    monkeypatch.chdir(ROOT)
    _, env = _launch_env(ACC_DIR / name)
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    with mock.patch.dict(os.environ, env, clear=True):
        rt = resolve_runtime(device_type="cpu")
    assert (rt.strategy, rt.offload, rt.launcher) == (strategy, offload, "accelerate")


# --- DeepSpeed JSON ----------------------------------------------------------------------------------------------


def _ds(name: str) -> dict:
    return json.loads((DS_DIR / name).read_text())


@pytest.mark.parametrize("name", ZERO_JSONS)
def test_ds_json_leaves_trainer_owned_values_auto(name):
    ds = _ds(name)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
    assert "optimizer" not in ds and "scheduler" not in ds, "the Trainer builds them from the recipe"
    zero = ds["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json"])
def test_zero3_gathers_weights_on_save(name):
    # Without it the saved LoRA adapter is EMPTY (each rank writes its partition placeholders).
    zero = _ds(name)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_zero3_offload_offloads_optimizer_and_params():
    zero = _ds("zero3_offload.json")["zero_optimization"]
    for key in ("offload_optimizer", "offload_param"):
        assert zero[key] == {"device": "cpu", "pin_memory": True}
    for name in ("zero2.json", "zero3.json"):
        assert "offload_optimizer" not in _ds(name)["zero_optimization"]


@pytest.mark.parametrize("name", ZERO_JSONS)
def test_ds_json_is_accepted_by_transformers_and_deepspeed(name):
    """HF's "auto" filler resolves every "auto", and DeepSpeed's own parser accepts the result."""
    from types import SimpleNamespace

    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    args = SimpleNamespace(
        world_size=1, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=1.0,
        learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
        save_on_each_node=False, fp16=False, fp16_full_eval=False, bf16=True, bf16_full_eval=False,
        get_warmup_steps=lambda steps: 0,
    )
    try:
        hf = HfTrainerDeepSpeedConfig(str(DS_DIR / name))
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), 10)
    finally:
        unset_hf_deepspeed_config()
    assert "auto" not in json.dumps(hf.config)
    assert hf.config["train_batch_size"] == 8 and hf.config["bf16"]["enabled"] is True
    ds = DeepSpeedConfig(hf.config)  # raises on unknown keys, bad types or an inconsistent batch size
    assert ds.zero_optimization_stage == hf.config["zero_optimization"]["stage"]


def test_ds_readme_explains_every_key():
    readme = (DS_DIR / "README.md").read_text()
    keys = set()
    for name in ZERO_JSONS:
        ds = _ds(name)
        keys |= {k for k in ds if k not in ("bf16", "fp16", "zero_optimization")}
        for k, v in ds["zero_optimization"].items():
            keys |= {f"{k}.{sub}" for sub in v} if isinstance(v, dict) else {k}
    keys |= {"bf16.enabled", "fp16.enabled"}
    keys.discard("stage")
    keys.add("zero_optimization.stage")
    missing = sorted(k for k in keys if f"`{k}`" not in readme)
    assert not missing, f"ds_configs/README.md lacks a row for {missing}"


# --- launch scripts ------------------------------------------------------------------------------------------------


def _bash(script: str, *args: str, env: dict | None = None, cwd=None, timeout: int = 60):
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(LAUNCH_DIR / script), *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_syntax(name):
    proc = subprocess.run(["bash", "-n", str(LAUNCH_DIR / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (LAUNCH_DIR / name).read_text()
    if name != "env.sh":  # env.sh is sourced, the others are run
        assert os.access(LAUNCH_DIR / name, os.X_OK), f"launch/{name} is not executable"
        assert "set -euo pipefail" in text
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/env.sh"' in text


def test_env_sh_takes_ngpus_override():
    proc = subprocess.run(["bash", "-c", f'source "{LAUNCH_DIR}/env.sh"; echo "$PYTHON $PWD"'],
                          env={**os.environ, "NGPUS": "3", "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    python, cwd = proc.stdout.split()
    assert python == sys.executable and Path(cwd) == ROOT
    # NGPUS becomes --gpus: 3 processes, the cores split between them
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    line = subprocess.run(["bash", str(LAUNCH_DIR / "torchrun.sh"), "recipes/demo.yaml"], capture_output=True, text=True,
                          env={**env, "DRY_RUN": "1", "NGPUS": "3", "PYTHON": sys.executable}, timeout=60)
    assert line.returncode == 0, line.stderr
    assert "--nproc_per_node 3 " in line.stderr
    assert line.stderr.startswith(f"+ OMP_NUM_THREADS={max(1, os.cpu_count() // 3)} ")


def test_env_sh_rejects_bad_values():
    proc = _bash("torchrun.sh", "recipe.yaml", env={"NGPUS": "x"})
    assert proc.returncode == 2 and "NGPUS='x'" in proc.stderr
    proc = _bash("torchrun.sh", "recipe.yaml", env={"NGPUS": "1", "NNODES": "2", "MASTER_ADDR": ""})
    assert proc.returncode == 2 and "MASTER_ADDR" in proc.stderr


def test_gpu_launch_without_gpus_is_one_clear_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    for script, args in [("accelerate.sh", ["ddp", str(recipe)]), ("deepspeed.sh", ["zero3", str(recipe)]),
                         ("torchrun.sh", [str(recipe)])]:
        proc = _bash(script, *args, env={"NGPUS": "0"})
        assert proc.returncode == 2, (script, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "needs GPUs" in proc.stderr and "make demo" in proc.stderr


def test_launch_scripts_name_bad_strategy_and_recipe(tmp_path):
    proc = _bash("accelerate.sh", "zero4", "r.yaml", env={"NGPUS": "1"})
    assert proc.returncode == 2 and "unknown strategy 'zero4'" in proc.stderr
    proc = _bash("deepspeed.sh", "zero4", "r.yaml", env={"NGPUS": "1"})
    assert proc.returncode == 2 and "unknown strategy 'zero4'" in proc.stderr
    proc = _bash("deepspeed.sh", "ddp", "r.yaml", env={"NGPUS": "1"})
    assert proc.returncode == 2 and "the deepspeed launcher runs the ZeRO strategies only" in proc.stderr
    proc = _bash("accelerate.sh", "ddp", "no/such.yaml", env={"NGPUS": "1"}, cwd=tmp_path)
    assert proc.returncode == 2 and f"recipe file '{tmp_path}/no/such.yaml' does not exist" in proc.stderr
    for proc in (_bash("accelerate.sh", "zero4", "r.yaml"), _bash("accelerate.sh", "ddp", "no/such.yaml")):
        assert proc.stderr.count("\n") == 1, proc.stderr  # one line each


def _dry(script: str, *args: str, **env: str) -> str:
    """The command the script runs, without the VAR=value words in front of it (test_printed_command_runs_as_is)."""
    proc = _bash(script, *args, env={"DRY_RUN": "1", **env})
    assert proc.returncode == 0, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("+ ") and line.count("\n") == 0, line
    return line[line.index(sys.executable):]


def test_accelerate_sh_command(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    cmd = _dry("accelerate.sh", "zero3", str(recipe), "--max_steps", "3", NGPUS="4")
    assert cmd == (f"{sys.executable} -m accelerate.commands.accelerate_cli launch --config_file "
                   f"{PKG}/accelerate_configs/zero3.yaml --deepspeed_config_file {PKG}/ds_configs/zero3.json "
                   f"--num_processes 4 -m dist_dpo train --config {recipe} --max_steps 3")
    # Multi-node: accelerate's --num_processes is the total over the nodes.
    cmd = _dry("accelerate.sh", "ddp", str(recipe), NGPUS="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.1.2.3",
               MASTER_PORT="29600")
    assert ("--num_processes 16 --num_machines 2 --machine_rank 1 --main_process_ip 10.1.2.3 "
            "--main_process_port 29600 -m dist_dpo") in cmd


def test_deepspeed_sh_command(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    cmd = _dry("deepspeed.sh", "zero3_offload", str(recipe), NGPUS="2", MASTER_PORT="29555", CUDA_VISIBLE_DEVICES="")
    assert cmd == (f"{sys.executable} -m deepspeed.launcher.runner --num_gpus 2 --master_port 29555 --module dist_dpo "
                   f"train --config {recipe} --deepspeed {PKG}/ds_configs/zero3_offload.json")
    # deepspeed's --num_gpus ignores CUDA_VISIBLE_DEVICES, so the visible ids are named instead.
    cmd = _dry("deepspeed.sh", "zero2", str(recipe), NGPUS="2", CUDA_VISIBLE_DEVICES="4,6,7")
    assert "--include localhost:4,6 --master_port" in cmd and "--num_gpus" not in cmd


def test_torchrun_sh_command(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    cmd = _dry("torchrun.sh", str(recipe), NGPUS="2")
    assert cmd == (f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2 -m dist_dpo train "
                   f"--config {recipe}")
    cmd = _dry("torchrun.sh", str(recipe), NGPUS="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="h0")
    assert "--nnodes 2 --node_rank 1 --master_addr h0 --master_port 29500 --nproc_per_node 8 -m dist_dpo" in cmd


def test_demo_cpu_sh_command():
    cmd = _dry("demo_cpu.sh", "--max_steps", "2")
    assert cmd.endswith(f"launch --config_file {PKG}/accelerate_configs/cpu.yaml --num_processes 2 -m dist_dpo train "
                        "--config recipes/demo.yaml --max_steps 2")


# --- Makefile ------------------------------------------------------------------------------------------------------


def _make(*args: str) -> str:
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_help_is_default_and_lists_targets():
    out = _make()
    assert out == _make("help")
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert set(TRAIN_TARGETS) | {"help", "install", "demo", "test", "clean", "distclean"} <= listed


@pytest.mark.parametrize("target", TRAIN_TARGETS)
def test_make_train_targets_pass_recipe_and_args(target):
    out = _make("-n", target, "RECIPE=recipes/x.yaml", "ARGS=--max_steps 7", "STAGE=zero2")
    script = {"train-deepspeed": "launch/deepspeed.sh zero2", "train-torchrun": "launch/torchrun.sh"}.get(
        target, f"launch/accelerate.sh {target.removeprefix('train-').replace('-', '_')}")
    assert out.strip() == f"{script} recipes/x.yaml --max_steps 7"


# --- the real thing ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_cpu_runs_two_processes(tmp_path):
    """launch/demo_cpu.sh starts a real 2-process gloo job (about a minute on 2 cores)."""
    out = tmp_path / "demo"
    proc = _bash("demo_cpu.sh", "--output_dir", str(out), "--max_steps", "2", "--eval_steps", "2",
                 env={"DIST_DPO_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "logs" / "rank0.log").read_text()
    assert "world 2" in log
    assert (out / "logs" / "rank1.log").is_file()
    assert (out / "adapter_model.safetensors").is_file()
