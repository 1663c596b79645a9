"""`dist-dpo launch` and `dist-dpo configs`: the packaged files, SLURM's variables, and a 2-node job simulated on one
machine (two launchers on localhost, as srun would start them, CPU/gloo through torchrun)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from conftest import LAUNCH_ENV, ROOT
from dist_dpo import launch, packaged
from dist_dpo.errors import UserError


def test_nodelist_expansion():
    assert launch.expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert launch.expand_nodelist("rack[1-2]-n[08-09]") == ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]
    assert launch.expand_nodelist("node7") == ["node7"]
    with pytest.raises(UserError, match="node list entry"):
        launch.expand_nodelist("gpu[a-b]")


SLURM = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "4", "SLURM_NNODES": "4", "SLURM_NODEID": "2",
         "SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[03-06]", "SLURM_GPUS_ON_NODE": "8"}


def test_slurm_variables_make_the_multi_node_command():
    job, _, _ = launch.parse(["zero3", "--config", "seed_qlora", "--", "--max_steps", "5"], SLURM)
    assert (job.nnodes, job.node_rank, job.master_addr, job.gpus) == (4, 2, "gpu03", 8)
    assert job.master_port == 20000 + 123456 % 20000  # the same on every node, without talking to each other
    cmd, _ = launch.command(job, SLURM)
    assert cmd[cmd.index("--num_processes") + 1] == "32"  # accelerate's count is the total over the nodes
    assert cmd[cmd.index("--machine_rank") + 1] == "2" and cmd[cmd.index("--main_process_ip") + 1] == "gpu03"
    assert cmd[-2:] == ["--max_steps", "5"]
    # Flags win over SLURM; MASTER_ADDR / MASTER_PORT exported by an sbatch script win over the derived ones.
    job, _, _ = launch.parse(["ddp", "--config", "demo", "--launcher", "torchrun", "--gpus", "2", "--node-rank",
                              "0"], {**SLURM, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29999"})
    cmd, _ = launch.command(job, {})
    assert " ".join(cmd).split(" -m dist_dpo")[0].endswith(
        "--nnodes 4 --node_rank 0 --master_addr 10.0.0.1 --master_port 29999 --nproc_per_node 2")


@pytest.mark.parametrize("argv, env, message", [
    (["ddp", "--config", "demo"], {**SLURM, "SLURM_NTASKS": "32"}, "use one task per node"),
    (["zero3", "--config", "demo", "--launcher", "deepspeed"], SLURM, "pass --hostfile"),
    (["ddp", "--config", "demo", "--gpus", "1", "--nnodes", "2"], {}, "need --master-addr"),
    (["ddp", "--config", "demo", "--gpus", "1", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], {},
     "must be in 0..1"),
    (["fsdp", "--config", "demo", "--gpus", "1", "--launcher", "torchrun"], {}, "use --launcher accelerate"),
    (["ddp", "--config", "demo", "--gpus", "1", "--max_steps", "3"], {}, "the trainer's options go after `--`"),
    (["ddp", "--config", "nope", "--gpus", "1"], {}, "packaged recipes: demo, seed_lora, seed_qlora"),
])
def test_launch_refuses_with_one_line(argv, env, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        launch.parse(argv, env)


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "zero3_offload"])
def test_accelerate_takes_the_packaged_json_from_any_directory(strategy, tmp_path, monkeypatch):
    """The yaml names ds_configs/<name>.json relative to a checkout; the launcher's --deepspeed_config_file wins, so
    the command works from a directory with no ds_configs/ at all. accelerate's own launch code decides."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    monkeypatch.chdir(tmp_path)
    job, _, _ = launch.parse([strategy, "--config", "demo", "--gpus", "2"], {})
    cmd, _ = launch.command(job, {})
    args, defaults, mp = _validate_launch_command(launch_command_parser().parse_args(cmd[cmd.index("launch") + 1:]))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config.keys())
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(packaged.DS_CONFIGS / f"{strategy}.json")
    assert plugin.zero_stage == (2 if strategy == "zero2" else 3)


def test_configs_copies_every_packaged_file_and_never_overwrites(tmp_path, capsys):
    dest = tmp_path / "mine"
    assert packaged.main([str(dest)]) == 0
    for folder in packaged.FOLDERS:
        for f in folder.iterdir():
            assert (dest / folder.name / f.name).read_bytes() == f.read_bytes()
    (dest / "recipes" / "demo.yaml").write_text("# edited\n")
    with pytest.raises(UserError, match="would be overwritten"):
        packaged.main([str(dest)])
    assert (dest / "recipes" / "demo.yaml").read_text() == "# edited\n"  # nothing written
    assert packaged.main([str(dest), "--force"]) == 0
    assert (dest / "recipes" / "demo.yaml").read_bytes() == (packaged.RECIPES / "demo.yaml").read_bytes()


def test_recipe_by_packaged_name(tmp_path, monkeypatch):
    from dist_dpo.config import parse_recipe

    monkeypatch.chdir(tmp_path)  # no recipes/ here: the name resolves to the packaged file
    r = parse_recipe(["--config", "demo"])
    assert r.train.max_steps == 30 and r.model.model_name_or_path == "builtin:tiny-qwen2"
    (tmp_path / "demo").write_text("train: {max_steps: 3}\n")  # a file of that name wins
    assert parse_recipe(["--config", "demo"]).train.max_steps == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path: Path, train_args: list[str]) -> list[subprocess.CompletedProcess]:
    """Two `dist-dpo launch` processes with the variables srun gives the tasks of a 2-node job."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), SLURM_JOB_ID="777", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="localhost,127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dist_dpo", "launch", "cpu", "--launcher", "torchrun", "--gpus", "1", "--config",
           "demo", "--", *train_args]
    procs = [subprocess.Popen(cmd, env={**env, "SLURM_NODEID": str(n), "SLURM_PROCID": str(n)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=400)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_two_slurm_nodes_train_as_one_job(tmp_path):
    run = tmp_path / "run"
    node0, node1 = _two_nodes(tmp_path, ["--output_dir", str(run), "--max_steps", "2", "--eval_steps", "0",
                                         "--save_steps", "2", "--logging_steps", "1", "--report_to", "none"])
    assert node0.returncode == 0, node0.stderr[-3000:]
    assert node1.returncode == 0, node1.stderr[-3000:]
    log0 = (run / "logs" / "rank0.log").read_text()
    assert "ddp via torchrun: 2 node(s) x 1 process(es) = world 2 on cpu" in log0
    log1 = (run / "logs" / "rank1.log").read_text()
    assert "rank 1 of 2 | local rank 0 | node 1 of 2" in log1
    assert (run / "adapter_model.safetensors").is_file()
    # One console: node 0 prints the plan, the steps and the result; node 1's launcher and rank print no INFO line.
    assert "dry run OK" in node0.stdout and "world 2" in node0.stdout
    assert " INFO " not in node1.stdout + node1.stderr, node1.stdout + node1.stderr
    assert "--nnodes 2 --node_rank 1 --master_addr localhost" in node1.stderr  # the command it ran


@pytest.mark.slow
def test_two_slurm_nodes_bad_input_is_one_line(tmp_path):
    node0, node1 = _two_nodes(tmp_path, ["--output_dir", str(tmp_path / "run"), "--learning_rate", "fast"])
    assert node0.returncode == node1.returncode == 2
    lines = [line for p in (node0, node1) for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert lines == ["dist-dpo: error: command line: 'learning_rate' must be a number, got 'fast'"], lines
    assert not (tmp_path / "run").exists()


def test_sbatch_example_is_a_valid_launch_under_slurm():
    import shlex

    path = ROOT / "launch" / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text
    (line,) = [x for x in text.splitlines() if x.startswith("srun ")]
    words = shlex.split(line.replace("$PWD", "/shared").replace("$SLURM_JOB_ID", "9"))
    argv = words[words.index("launch") + 1:]
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "8"}
    job, _, _ = launch.parse(argv, env)
    assert (job.nnodes, job.node_rank, job.master_addr, job.gpus) == (2, 1, "gpu01", 8)
    assert job.overrides == ["--output_dir", "/shared/outputs/slurm-9"]
