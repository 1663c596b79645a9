"""Who am I in the job: global/local rank, node, world size, device, and the distributed strategy.

This is the ONLY module that reads the launcher's environment (torchrun, `accelerate launch`, the `deepspeed`
launcher, or plain `python`). Everything else asks the `Runtime` it returns.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from dist_dpo.errors import UserError
from dist_dpo.strategies import STRATEGY_TABLE

STRATEGIES = tuple(STRATEGY_TABLE)  # what resolve_runtime can find a job running


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Runtime:
    rank: int  # global rank, 0 .. world_size-1
    local_rank: int  # rank on this node: the GPU index this process owns
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    strategy: str  # one of STRATEGIES
    launcher: str  # python | torchrun | accelerate | deepspeed
    deepspeed_config: str | None  # the ZeRO JSON in force (accelerate yaml or --deepspeed)
    offload: bool  # ZeRO-3 optimizer/param offload to CPU is on
    device_type: str  # "cuda" or "cpu"
    hostname: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        extra = " + CPU offload" if self.offload else ""
        return (
            f"{self.strategy}{extra} via {self.launcher}: {self.num_nodes} node(s) x {self.local_world_size} "
            f"process(es) = world {self.world_size} on {self.device_type}"
        )


def _read_deepspeed_json(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"DeepSpeed config '{path}' does not exist: pass one of ds_configs/*.json")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config '{path}' is not valid JSON: line {e.lineno}: {e.msg}") from None


def _zero_strategy(ds: dict, source: str) -> tuple[str, bool]:
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage not in (2, 3):
        raise UserError(f"{source}: zero_optimization.stage is {stage}; dist-dpo supports ZeRO stage 2 or 3")
    offload = any(
        zero.get(key, {}).get("device", "none") not in ("none", None) for key in ("offload_optimizer", "offload_param")
    )
    return f"zero{stage}", offload


def resolve_runtime(deepspeed_config: str | None = None, device_type: str | None = None) -> Runtime:
    """Read the launch environment once. `deepspeed_config` comes from the recipe/CLI (`--deepspeed`)."""
    import torch

    rank = _env_int("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", default=0)
    world = _env_int("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", default=1)
    local_rank = _env_int("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", default=0)
    local_world = _env_int("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", default=world)
    # torchrun exports GROUP_RANK, the deepspeed launcher CROSS_RANK: both are the node rank.
    node_rank = _env_int("GROUP_RANK", "CROSS_RANK", "NODE_RANK", default=rank // max(local_world, 1))
    num_nodes = max(1, world // max(local_world, 1))

    if "ACCELERATE_DYNAMO_BACKEND" in os.environ or _env_true("ACCELERATE_USE_DEEPSPEED") or _env_true(
        "ACCELERATE_USE_FSDP"
    ):
        launcher = "accelerate"
    elif "CROSS_RANK" in os.environ:  # set by the `deepspeed` launcher only
        launcher = "deepspeed"
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = "torchrun"
    else:
        launcher = "python" if world == 1 else "torchrun"

    ds_path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or deepspeed_config
    offload = False
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        if ds_path:
            strategy, offload = _zero_strategy(_read_deepspeed_json(ds_path), ds_path)
        else:
            stage = _env_int("ACCELERATE_DEEPSPEED_ZERO_STAGE", default=2)
            strategy = f"zero{stage}"
            offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") != "none"
    elif _env_true("ACCELERATE_USE_FSDP"):
        strategy = "fsdp"
    elif deepspeed_config:
        strategy, offload = _zero_strategy(_read_deepspeed_json(deepspeed_config), deepspeed_config)
    else:
        strategy = "ddp" if world > 1 else "single"

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return Runtime(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=node_rank,
        num_nodes=num_nodes,
        strategy=strategy,
        launcher=launcher,
        deepspeed_config=ds_path if STRATEGY_TABLE[strategy].engine == "deepspeed" else None,
        offload=offload,
        device_type=device_type,
        hostname=socket.gethostname(),
    )


def accelerate_env(config_path: str | Path) -> dict[str, str]:
    """What `accelerate launch --config_file <config_path>` tells its workers about the strategy (accelerate 1.15)."""
    import yaml

    path = Path(config_path)
    cfg = yaml.safe_load(path.read_text()) or {}
    env = {"ACCELERATE_DYNAMO_BACKEND": "NO"}
    kind = cfg.get("distributed_type")
    if kind == "DEEPSPEED":
        ds_file = cfg.get("deepspeed_config", {}).get("deepspeed_config_file")
        root = path.resolve().parent.parent  # the yamls name their JSON from the repo root
        env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(root / ds_file))
    elif kind == "FSDP":
        env["ACCELERATE_USE_FSDP"] = "true"
    return env


def planned_runtime(deepspeed_config: str | None = None) -> Runtime | None:
    """The Runtime rank 0 of the job a launch script is about to start will resolve, for the script's one-process
    check before the launcher (launch/env.sh): DIST_DPO_PLANNED_LAUNCH names the accelerate yaml, the DeepSpeed JSON
    of the `deepspeed` launcher, or `torchrun`; NGPUS x NNODES is the world. None: no launch script asked."""
    planned = os.environ.get("DIST_DPO_PLANNED_LAUNCH")
    if not planned:
        return None
    per_node = _env_int("NGPUS", default=1) or 1
    world = per_node * _env_int("NNODES", default=1)
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(per_node)}
    if planned.endswith((".yaml", ".yml")):
        env.update(accelerate_env(planned))
    elif planned.endswith(".json"):
        env["CROSS_RANK"] = "0"  # the deepspeed launcher's mark
        deepspeed_config = planned
    elif world > 1:
        env["TORCHELASTIC_RUN_ID"] = "planned"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return resolve_runtime(deepspeed_config)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
