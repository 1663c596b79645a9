"""The wheel a user installs: `pip wheel .` carries every packaged config and recipe, and, installed into a fresh
virtual environment outside the checkout, `dist-dpo` trains, copies its configs out and resolves every strategy.

The fresh environment reuses this one's dependencies through a .pth line (written after the install, so pip there
sees an empty environment and touches nothing here): seconds, and no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from dist_dpo.launch import strategy_names
from dist_dpo.packaged import FOLDERS

LAUNCHES = [(s, "accelerate") for s in strategy_names()] + [
    (s, "torchrun") for s in strategy_names() if s != "fsdp"] + [
    (s, "deepspeed") for s in strategy_names() if s.startswith("zero")]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel, the fresh venv's bin/, an environment without this checkout on the path)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # what `pip wheel .` reads, copied so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "dist_dpo", src / "dist_dpo", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          str(tmp / "dist"), str(src)])
    (wheel,) = (tmp / "dist").glob("dist_dpo-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)])
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (purelib / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after dist_dpo's own
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    work = tmp / "elsewhere"  # no checkout, no recipes/ or accelerate_configs/ here
    work.mkdir()
    return wheel, venv, env, work, purelib


def test_wheel_lists_every_config_and_recipe(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in FOLDERS:
        files = [f for f in folder.iterdir() if f.is_file()]
        assert files
        for f in files:
            assert f"dist_dpo/{folder.name}/{f.name}" in names
    assert "dist_dpo/assets/tokenizer/tokenizer.json" in names


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    _, venv, env, work, purelib = installed
    out = _run([str(venv / "bin" / "python"), "-c", "import dist_dpo; print(dist_dpo.__file__)"], env=env,
               cwd=work).stdout
    assert Path(out.strip()).parent == purelib / "dist_dpo"


@pytest.mark.slow
def test_installed_cli_trains_copies_configs_and_resolves_every_strategy(installed):
    _, venv, env, work, purelib = installed
    cli = str(venv / "bin" / "dist-dpo")
    packaged = purelib / "dist_dpo"

    copied = _run([cli, "configs", "mine"], env=env, cwd=work)
    assert "copied" in copied.stdout
    for folder in FOLDERS:
        assert sorted(p.name for p in (work / "mine" / folder.name).iterdir()) == sorted(
            p.name for p in folder.iterdir() if p.is_file())

    for strategy, launcher in LAUNCHES:
        line = _run([cli, "launch", strategy, "--launcher", launcher, "--config", "seed_qlora", "--gpus", "2",
                     "--dry-run"], env=env, cwd=work).stderr.strip()
        assert line.startswith("+ ") and f" {venv / 'bin' / 'python'} -m " in line, line
        files = [w for w in line.split() if w.endswith((".yaml", ".json"))]
        # accelerate's yaml, the ZeRO JSON: the packaged files, by full path (torchrun's DDP needs neither)
        assert len(files) == (launcher == "accelerate") + strategy.startswith("zero"), line
        assert all(Path(f).is_file() and Path(f).is_relative_to(packaged) for f in files), line
    line = _run([cli, "launch", "zero3", "--config", "mine/recipes/demo.yaml", "--gpus", "2", "--dry-run"], env=env,
                cwd=work).stderr
    assert "--config mine/recipes/demo.yaml" in line  # a copied, editable recipe works the same

    out = work / "run"
    trained = _run([cli, "train", "--config", "demo", "--output_dir", str(out), "--max_steps", "2", "--eval_steps",
                    "0", "--logging_steps", "1", "--report_to", "none"], env={**env, "OMP_NUM_THREADS": "2"}, cwd=work)
    assert "step 2/2" in trained.stdout and (out / "adapter_model.safetensors").is_file()
    assert f"{packaged}/recipes/demo.yaml" in (out / "resolved_config.yaml").read_text()
