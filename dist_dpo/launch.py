"""`dist-dpo launch STRATEGY --config RECIPE [--gpus N] [--nnodes N --node-rank R --master-addr A] [-- --key value]`:
start a training job with the packaged accelerate / DeepSpeed file, through accelerate launch (the default), torchrun
or the deepspeed launcher, and print the exact command it runs (copy it to edit it).

Strategies are the packaged accelerate_configs/*.yaml: ddp, fsdp, zero2, zero3, zero3_offload (GPUs) and cpu (DDP
over gloo on CPU, the demo). torchrun runs ddp, cpu and the ZeRO ones (the trainer gets --deepspeed JSON); the
deepspeed launcher runs the ZeRO ones. Multi-node: the same command on every node, with --nnodes, --node-rank and
--master-addr; inside a SLURM job (one task per node) they come from SLURM's variables, see launch/slurm.sbatch.
Words after `--` are the trainer's (`dist-dpo train --help`). One process checks the recipe and data first
(`train --dry_run`), so a mistake is one line and exit 2 rather than that line from the launcher's N workers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dist_dpo.errors import EXIT_USER_ERROR, UserError
from dist_dpo.packaged import ACCELERATE_CONFIGS, DS_CONFIGS, resolve_recipe

LAUNCHERS = ("accelerate", "torchrun", "deepspeed")
CPU_PROCS = 2  # the CPU demo: two ranks cooperating is the point, not speed (accelerate_configs/cpu.yaml)


def strategy_names() -> list[str]:
    return sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml"))


def _engine(name: str) -> str:
    """The strategy table's engine for a launch strategy (cpu: none, the CPU demo's plain processes)."""
    from dist_dpo.strategies import planned

    try:
        return planned(name)[0].engine
    except KeyError:
        return "none"


@dataclass
class Job:
    strategy: str
    launcher: str
    recipe: str  # as the user gave it: every worker resolves it the same way
    gpus: int  # processes per node
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    hostfile: str | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def accelerate_yaml(self) -> Path:
        return ACCELERATE_CONFIGS / f"{self.strategy}.yaml"

    @property
    def zero_json(self) -> Path | None:
        path = DS_CONFIGS / f"{self.strategy}.json"
        return path if path.is_file() else None


def main(argv: list[str]) -> int:
    job, dry_run, preflight = parse(argv, os.environ)
    cmd, env = command(job, os.environ)
    if preflight and not dry_run:
        code = run_preflight(job)
        if code:
            return code
    print("+ " + shell_line(cmd, env), file=sys.stderr, flush=True)
    if dry_run:
        return 0
    os.execvpe(cmd[0], cmd, {**os.environ, **env})  # become the launcher: Ctrl-C and SIGTERM reach it directly


# --- what to run ---------------------------------------------------------------------------------------------------


def parse(argv: list[str], environ) -> tuple[Job, bool, bool]:
    ours, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args, unknown = _parser().parse_known_args(ours)
    if unknown:
        raise UserError(f"launch: unknown option '{unknown[0]}'; the trainer's options go after `--`, e.g. "
                        f"dist-dpo launch {args.strategy} --config {args.config} -- --max_steps 10")
    names = strategy_names()
    if args.strategy not in names:
        raise UserError(f"launch: unknown strategy '{args.strategy}': use one of {', '.join(names)}")
    if args.launcher == "deepspeed" and _engine(args.strategy) != "deepspeed":
        raise UserError(f"launch: the deepspeed launcher runs the ZeRO strategies only; run {args.strategy} with "
                        "--launcher accelerate or torchrun")
    if args.launcher == "torchrun" and _engine(args.strategy) == "fsdp2":
        raise UserError("launch: fsdp is configured by accelerate_configs/fsdp.yaml: use --launcher accelerate")
    slurm = slurm_job(environ)
    nnodes = _first(args.nnodes, slurm.get("nnodes"), 1)
    node_rank = _first(args.node_rank, slurm.get("node_rank"), 0)
    master_addr = _first(args.master_addr, slurm.get("master_addr"))
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UserError(f"launch: --node-rank {node_rank} must be in 0..{nnodes - 1} (--nnodes {nnodes})")
    if nnodes > 1 and not master_addr and not (args.launcher == "deepspeed" and args.hostfile):
        raise UserError(f"launch: {nnodes} nodes need --master-addr (node 0's address; MASTER_ADDR for launch/*.sh) "
                        "on every node")
    if nnodes > 1 and args.launcher == "deepspeed" and not args.hostfile:
        raise UserError("launch: the deepspeed launcher reaches the other nodes over ssh: pass --hostfile (and run "
                        "on node 0 only), or use --launcher accelerate or torchrun (one command per node, SLURM too)")
    gpus = _first(args.gpus, slurm.get("gpus"))
    if gpus is None:
        gpus = CPU_PROCS if args.strategy == "cpu" else visible_gpus()
    if gpus < 1 and args.strategy != "cpu":
        raise UserError(f"launch: {args.strategy} needs GPUs but none is visible (CUDA_VISIBLE_DEVICES="
                        f"'{environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}'); `dist-dpo launch cpu --config demo` "
                        "(make demo) runs 2 processes on CPU, or pass --gpus N to force N processes per node")
    if gpus < 1:
        raise UserError(f"launch: --gpus {gpus}: the cpu strategy needs at least 1 process per node")
    resolve_recipe(args.config)  # a missing recipe is one line here, before any launcher starts
    job = Job(args.strategy, args.launcher, args.config, gpus, nnodes, node_rank, master_addr,
              _first(args.master_port, slurm.get("master_port")), args.hostfile, overrides)
    return job, args.dry_run, not args.no_preflight


def _first(*values):
    return next((v for v in values if v is not None), None)


def _parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2, like every dist-dpo command
            raise UserError(f"launch: {message}")

    p = Parser(prog="dist-dpo launch", allow_abbrev=False, description=__doc__.split("\n\n")[0],
               usage="dist-dpo launch STRATEGY --config RECIPE [options] [-- --key value ...]")
    p.add_argument("strategy", help=f"How to distribute: {', '.join(strategy_names())}.")
    p.add_argument("--config", required=True, help="Recipe YAML file, or a packaged recipe by name (seed_qlora).")
    p.add_argument("--launcher", choices=LAUNCHERS, default="accelerate",
                   help="accelerate (every strategy), torchrun (ddp, cpu, zero*) or deepspeed (zero*).")
    p.add_argument("--gpus", type=int, help="Processes per node, one per GPU (default: every visible GPU; "
                   "SLURM_GPUS_ON_NODE in a SLURM job; cpu: 2 CPU processes).")
    p.add_argument("--nnodes", type=int, help="Nodes in the job (default 1; SLURM_JOB_NUM_NODES in a SLURM job).")
    p.add_argument("--node-rank", type=int, help="This node's index, 0..nnodes-1 (SLURM_NODEID).")
    p.add_argument("--master-addr", help="Node 0's address (the first host of SLURM_JOB_NODELIST).")
    p.add_argument("--master-port", type=int, help="Node 0's rendezvous port (the config's, or a free one; in a "
                   "SLURM job MASTER_PORT or one derived from SLURM_JOB_ID).")
    p.add_argument("--hostfile", help="deepspeed launcher only: the hosts it reaches over ssh (run on node 0).")
    p.add_argument("--dry-run", action="store_true", help="Print the command, run nothing.")
    p.add_argument("--no-preflight", action="store_true", help="Skip the one-process check of recipe and data.")
    return p


def command(job: Job, environ) -> tuple[list[str], dict[str, str]]:
    """(argv, the environment variables added for the workers)."""
    train = ["-m", "dist_dpo", "train", "--config", job.recipe]
    python = sys.executable  # the launcher and its workers run in this same environment
    if job.launcher == "accelerate":
        cmd = [python, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(job.accelerate_yaml)]
        if job.zero_json:  # the yaml names it relative to a checkout; this works from anywhere
            cmd += ["--deepspeed_config_file", str(job.zero_json)]
        cmd += ["--num_processes", str(job.gpus * job.nnodes)]  # accelerate's count is the TOTAL over the nodes
        if job.nnodes > 1:
            cmd += ["--num_machines", str(job.nnodes), "--machine_rank", str(job.node_rank),
                    "--main_process_ip", job.master_addr]
        if job.master_port is not None:
            cmd += ["--main_process_port", str(job.master_port)]
        cmd += train + job.overrides
    elif job.launcher == "torchrun":
        if job.nnodes == 1:
            where = ["--standalone"]  # a local rendezvous on a free port: two jobs on one machine never collide
        else:
            where = ["--nnodes", str(job.nnodes), "--node_rank", str(job.node_rank), "--master_addr",
                     job.master_addr, "--master_port", str(job.master_port or 29500)]
        cmd = [python, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(job.gpus), *train]
        cmd += (["--deepspeed", str(job.zero_json)] if job.zero_json else []) + job.overrides
    else:
        visible = environ.get("CUDA_VISIBLE_DEVICES", "")
        if job.hostfile:
            where = ["--hostfile", job.hostfile, "--num_nodes", str(job.nnodes), "--num_gpus", str(job.gpus)]
            where += ["--master_addr", job.master_addr] if job.master_addr else []
        elif visible:
            # deepspeed's --num_gpus IGNORES CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1; name the visible ones.
            where = ["--include", "localhost:" + ",".join(visible.split(",")[:job.gpus])]
        else:
            where = ["--num_gpus", str(job.gpus)]
        port = job.master_port or _free_port()  # deepspeed has no free-port fallback of its own
        # --module: like `python -m`; the launcher appends --local_rank=N, which dist_dpo accepts.
        cmd = [python, "-m", "deepspeed.launcher.runner", *where, "--master_port", str(port), "--module",
               *train[1:], "--deepspeed", str(job.zero_json), *job.overrides]
    return cmd, worker_env(job, environ)


def worker_env(job: Job, environ) -> dict[str, str]:
    cores = os.cpu_count() or 1
    wanted = {
        # torchrun would force 1 thread per process; the node's cores split between its processes instead
        "OMP_NUM_THREADS": str(max(1, cores // job.gpus)),
        "TOKENIZERS_PARALLELISM": "false",  # the Rust tokenizer's thread pool does not survive the dataloader's fork
        "PYTHONUNBUFFERED": "1",  # logs appear as they happen, in order, through the launcher's pipes
    }
    if job.strategy != "cpu":
        # A rank that hits the NCCL timeout (or sees a peer die) tears the job down instead of hanging. (Not
        # TORCH_NCCL_BLOCKING_WAIT: it blocks the CPU thread in every collective, killing compute/comm overlap.)
        wanted["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        # NVLink SHARP off: on shared or virtualised hosts its multicast objects may fail to allocate and NCCL
        # aborts at init; LoRA's small all-reduces gain nothing from it.
        wanted["NCCL_NVLS_ENABLE"] = "0"
    env = {k: v for k, v in wanted.items() if not environ.get(k)}  # what the user set wins
    if job.strategy == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the same CPU run on a GPU machine too
    return env


def shell_line(cmd: list[str], env: dict[str, str]) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.join(cmd)])


def run_preflight(job: Job) -> int:
    """`train --dry_run` in this process. In a multi-node job every node checks (each must stop on bad input, or its
    workers would wait for the others) but only node 0 speaks: one line per job, exit 2 everywhere."""
    from dist_dpo.train import run

    argv = ["--dry_run", "--config", job.recipe, *job.overrides]
    if job.launcher != "accelerate" and job.zero_json:
        argv += ["--deepspeed", str(job.zero_json)]
    # The check sees the job about to start (runtime.planned_runtime): its strategy and world size, so a recipe
    # that cannot run under that strategy is refused here, before the launcher starts N processes.
    planned = {"accelerate": str(job.accelerate_yaml), "deepspeed": str(job.zero_json)}.get(job.launcher, "torchrun")
    saved = {k: os.environ.get(k) for k in ("DIST_DPO_PLANNED_LAUNCH", "NGPUS", "NNODES")}
    os.environ.update(DIST_DPO_PLANNED_LAUNCH=planned, NGPUS=str(job.gpus), NNODES=str(job.nnodes))
    try:
        if job.node_rank == 0:
            return run(argv) or 0
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return run(argv) or 0
        except UserError:
            return EXIT_USER_ERROR
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def visible_gpus() -> int:
    """torch's count honours CUDA_VISIBLE_DEVICES and MIG. No nvidia-smi means no NVIDIA driver: 0 without a torch
    import."""
    if not shutil.which("nvidia-smi"):
        return 0
    import torch

    return torch.cuda.device_count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# --- SLURM -----------------------------------------------------------------------------------------------------------


def slurm_job(environ) -> dict:
    """nnodes, node_rank, master_addr, master_port, gpus from a SLURM job step's variables ({} outside SLURM). One
    launcher per node (`srun --ntasks-per-node=1`); it starts that node's processes itself."""
    if not environ.get("SLURM_JOB_ID"):
        return {}
    nnodes = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    tasks = environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS")
    if tasks and int(tasks) > nnodes:
        raise UserError(f"launch: this SLURM job has {tasks} tasks on {nnodes} node(s); dist-dpo launch starts a "
                        "node's processes itself: use one task per node (sbatch --ntasks-per-node=1)")
    out = {"nnodes": nnodes, "node_rank": int(environ.get("SLURM_NODEID") or environ.get("SLURM_PROCID") or 0)}
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    out["master_addr"] = environ.get("MASTER_ADDR") or (expand_nodelist(nodelist)[0] if nodelist else None)
    # The same port on every node without talking to each other; jobs sharing a node differ by their id.
    out["master_port"] = int(environ.get("MASTER_PORT") or 20000 + int(environ["SLURM_JOB_ID"]) % 20000)
    gpus = environ.get("SLURM_GPUS_ON_NODE")
    if gpus and gpus.isdigit():
        out["gpus"] = int(gpus)
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (`gpu[01-03,07],login1`) as host names: `scontrol show hostnames` where it is
    installed, else the same expansion here."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        hosts += _expand_host(item)
    if not hosts:
        raise UserError(f"launch: cannot read SLURM's node list {nodelist!r}; pass --master-addr")
    return hosts


def _expand_host(item: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", item)
    if not m:
        return [item]
    prefix, ranges, rest = m.groups()
    names = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UserError(f"launch: cannot read SLURM's node list entry {item!r}; pass --master-addr")
        for n in range(int(lo), int(hi or lo) + 1):
            names.append(f"{prefix}{n:0{len(lo)}d}")
    return [name + tail for name in names for tail in _expand_host(rest)]
