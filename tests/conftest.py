import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "CROSS_RANK", "LOCAL_SIZE",
              "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_DYNAMO_BACKEND",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "NODE_RANK", "MASTER_ADDR",
              "MASTER_PORT")


@pytest.fixture
def clean_launch_env(monkeypatch):
    """No launcher variables: each test sets the ones it simulates."""
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA GPUs: run on a GPU machine (see benchmarks/README.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def lora_b_nonzero(trainer, seed: int = 1) -> None:
    """LoRA B set to small random values, so the policy differs from the reference from the first step."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def apply_speed_path(trainer, device_type: str = "cpu", **train_keys) -> None:
    """dist-dpo's speed path on a plain trl trainer as `train` applies it, without gradient checkpointing and without
    the first-batch self-check (tests/test_families.py tests that one on its own); `train_keys` set recipe keys."""
    from dist_dpo import speed
    from dist_dpo.config import Recipe
    from dist_dpo.runtime import resolve_runtime

    recipe = Recipe()
    recipe.train.gradient_checkpointing = False
    recipe.train.speed_self_check = False
    for key, value in train_keys.items():
        setattr(recipe.train, key, value)
    speed.apply(trainer, recipe, resolve_runtime(device_type=device_type))
