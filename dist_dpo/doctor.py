"""`dist-dpo doctor [--config RECIPE] [--strategy NAME] [--key value ...]`: is this machine ready to train?

The tutorial's manual first step ("nvidia-smi, nvcc --version, torch version: make sure they match"), automated:
driver, CUDA runtime vs the torch build, package versions vs the tested set (constraints.txt), GPUs (count, memory,
bf16), bitsandbytes CUDA kernels, NCCL, free disk for checkpoints. With a recipe it also runs `train`'s own checks
(preflight.check_combination for the strategy, then the preflight: data, model, LoRA targets, output dir, disk) - the same
code, so doctor and train never disagree.

Exit code: 0 ready (warnings allowed), 1 at least one blocking problem, 2 doctor was called wrongly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata as md
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from dist_dpo.errors import UserError
from dist_dpo.packaged import ACCELERATE_CONFIGS, DS_CONFIGS

ROOT = Path(__file__).resolve().parent.parent  # in a checkout: constraints.txt, pyproject.toml (an installed wheel has neither)
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes")
OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "-"
EXIT_NOT_READY = 1


@dataclass
class Row:
    check: str
    status: str
    detail: str


def main(argv: list[str]) -> int:
    args, recipe_argv = _parser().parse_known_args(argv)
    rows: list[Row] = []
    gpus = _gpu_count()
    driver = _driver_cuda()
    rows += driver_rows(driver)
    rows += torch_cuda_rows(gpus, driver)
    rows += version_rows()
    rows += gpu_rows(gpus)
    rows += bitsandbytes_rows(gpus)
    rows += packed_rows_rows(gpus)
    rows += communication_rows(gpus)
    if args.output_dir and (args.config or recipe_argv):
        recipe_argv += ["--output_dir", args.output_dir]  # the recipe's output_dir: where train would write
    recipe = _recipe(args.config, recipe_argv) if (args.config or recipe_argv) else None
    rows += strategy_rows(recipe, args.strategy, gpus)
    if recipe is not None:
        rows += recipe_rows(recipe, args.strategy, gpus)
    else:
        rows += disk_rows(Path(args.output_dir or "outputs"))
    print_table(rows)
    failed = [r for r in rows if r.status == FAIL]
    warned = [r for r in rows if r.status == WARN]
    if failed:
        print(f"\nverdict: NOT READY - {len(failed)} blocking problem(s); first: {failed[0].check}: {failed[0].detail}")
        return EXIT_NOT_READY
    if gpus == 0:
        print("\nverdict: READY FOR CPU ONLY - the CPU demo (make demo: 2 processes over gloo) and ddp on CPU run here; "
              "GPU strategies (fsdp, zero2, zero3, ddp on GPUs) and 4/8-bit QLoRA need a machine with CUDA GPUs"
              + (f" ({len(warned)} warning(s) above)" if warned else ""))
    else:
        print(f"\nverdict: READY - {gpus} GPU(s)" + (f", {len(warned)} warning(s) above" if warned else ""))
    return 0


def _parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2, like every dist-dpo command
            raise UserError(f"doctor: {message}")

    names = ", ".join(strategy_names())
    p = Parser(prog="dist-dpo doctor", description=__doc__.split("\n\n")[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="Recipe YAML: also run train's checks on it (other --key value override it).")
    p.add_argument("--strategy", help=f"The strategy you will launch: {names}. Its problems become blocking.")
    p.add_argument("--output_dir", help="Where train would write (overrides the recipe's; default outputs/).")
    return p


def strategy_names() -> list[str]:
    return sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml"))


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _driver_cuda() -> tuple[str | None, str | None]:
    """(driver version, highest CUDA version the driver supports) from nvidia-smi; (None, None) without a driver."""
    if not shutil.which("nvidia-smi"):
        return None, None
    header = _run(["nvidia-smi"]) or ""
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    driver = re.search(r"Driver Version:\s*([\d.]+)", header)
    return (driver.group(1) if driver else "unknown"), (cuda.group(1) if cuda else None)


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def driver_rows(driver_cuda: tuple[str | None, str | None]) -> list[Row]:
    driver, cuda = driver_cuda
    if driver is None:
        return [Row("NVIDIA driver", INFO, "no nvidia-smi: no NVIDIA driver here (a CPU-only machine)")]
    return [Row("NVIDIA driver", OK, f"{driver}, supports CUDA up to {cuda or '?'}")]


def torch_cuda_rows(gpus: int, driver_and_cuda: tuple[str | None, str | None]) -> list[Row]:
    import torch

    rows = []
    driver, driver_cuda = driver_and_cuda
    build = torch.version.cuda
    if build is None:
        status = FAIL if driver else INFO
        why = "a GPU is here but this torch cannot use it: install torch built for CUDA" if driver else "CPU-only build"
        rows.append(Row("torch build", status, f"torch {torch.__version__}: {why}"))
    else:
        rows.append(Row("torch build", OK, f"torch {torch.__version__} built for CUDA {build}"))
        if driver_cuda and _vtuple(driver_cuda)[:1] < _vtuple(build)[:1]:
            rows.append(Row("CUDA runtime", FAIL, f"driver supports CUDA {driver_cuda} < torch's CUDA {build}: "
                            "update the driver or install torch for an older CUDA"))
        elif driver_cuda and _vtuple(driver_cuda) < _vtuple(build):
            rows.append(Row("CUDA runtime", WARN, f"driver supports CUDA {driver_cuda}, torch uses {build}: runs on "
                            "minor-version compatibility; some kernels may need a newer driver"))
        elif gpus == 0 and driver:
            rows.append(Row("CUDA runtime", FAIL, "torch sees no GPU although a driver is installed: check "
                            "CUDA_VISIBLE_DEVICES and `nvidia-smi` (a mismatched driver/library shows there)"))
        elif gpus:
            rows.append(Row("CUDA runtime", OK, f"CUDA {build} available to torch"))
    nvcc = _run(["nvcc", "--version"]) if shutil.which("nvcc") else None
    found = re.search(r"release ([\d.]+)", nvcc or "")
    if found and build and _vtuple(found.group(1))[:1] != _vtuple(build)[:1]:
        rows.append(Row("nvcc", WARN, f"nvcc {found.group(1)} vs torch's CUDA {build}: DeepSpeed ops JIT-built with "
                        "this nvcc will not load; point CUDA_HOME at a matching toolkit"))
    elif found:
        rows.append(Row("nvcc", OK, f"{found.group(1)} (only DeepSpeed's JIT-built ops need it)"))
    else:
        rows.append(Row("nvcc", INFO, "not found: fine unless DeepSpeed must JIT-build an op (it will say so)"))
    return rows


def _tested_pins() -> dict[str, str]:
    path = ROOT / "constraints.txt"
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _declared_ranges() -> dict[str, str]:
    from packaging.requirements import Requirement

    try:
        reqs = md.requires("dist-dpo") or []
    except md.PackageNotFoundError:  # run from a checkout without `pip install -e .`: read pyproject.toml
        try:
            import tomllib

            reqs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        except (ImportError, OSError, KeyError, ValueError):
            return {}
    out = {}
    for text in reqs:
        req = Requirement(text)
        if not req.marker:
            out[req.name.lower()] = str(req.specifier)
    return out


def version_rows() -> list[Row]:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    pins, ranges = _tested_pins(), _declared_ranges()
    rows = []
    for name in PACKAGES:
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            rows.append(Row(name, FAIL, "not installed: make install (pip install -c constraints.txt -e .)"))
            continue
        public = Version(have).public  # 2.13.0+cpu -> 2.13.0
        spec = ranges.get(name)
        if spec and public not in SpecifierSet(spec):
            rows.append(Row(name, FAIL, f"{have} is outside the supported range {spec}: "
                            "pip install -c constraints.txt -e ."))
        elif pins.get(name) and public != pins[name]:
            rows.append(Row(name, WARN, f"{have}; tested with {pins[name]} (constraints.txt)"))
        else:
            rows.append(Row(name, OK, have + (" (the tested version)" if pins.get(name) else "")))
    return rows


def gpu_rows(gpus: int) -> list[Row]:
    import torch

    if gpus == 0:
        return [Row("GPUs", INFO, "none visible: the CPU demo works; fsdp/zero2/zero3, ddp on GPUs and QLoRA don't")]
    rows = [Row("GPUs", OK, f"{gpus} visible")]
    for i in range(gpus):
        p = torch.cuda.get_device_properties(i)
        bf16 = p.major >= 8  # Ampere+: bf16 tensor cores; older cards train in fp16 (modeling.resolve_dtype)
        rows.append(Row(f"  GPU {i}", OK if bf16 else WARN,
                        f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}, "
                        + ("bf16" if bf16 else "no bf16: dtype auto falls back to fp16 (less stable for DPO)")))
    return rows


def bitsandbytes_rows(gpus: int) -> list[Row]:
    try:
        import bitsandbytes as bnb
        from bitsandbytes import cextension
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return [Row("bnb kernels", FAIL if gpus else WARN, f"does not import: {str(e).splitlines()[0]}")]
    if gpus == 0:
        return [Row("bnb kernels", INFO, f"{cextension.BNB_BACKEND} backend: 4/8-bit loading needs CUDA")]
    # Anything else is the CPU library or bitsandbytes' mock that raises on first use.
    if not isinstance(cextension.lib, getattr(cextension, "CudaBNBNativeLibrary", ())):
        return [Row("bnb kernels", FAIL, "no CUDA kernels loaded (see `python -m bitsandbytes`): QLoRA will fail")]
    import torch

    try:  # the real thing: pack and unpack a small tensor on GPU 0
        x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
        q, state = bnb.functional.quantize_4bit(x, quant_type="nf4")
        err = (bnb.functional.dequantize_4bit(q, state) - x).abs().mean().item()
    except Exception as e:  # noqa: BLE001
        return [Row("bnb kernels", FAIL, f"CUDA kernels fail: {str(e).splitlines()[0]}")]
    return [Row("bnb kernels", OK, f"CUDA kernels work (NF4 round trip, mean error {err:.3f})")]


def packed_rows_rows(gpus: int) -> list[Row]:
    """The speed path's packed rows need torch's variable-length flash kernel: the same probe train runs."""
    if gpus == 0:
        return [Row("packed rows", INFO,
                    "GPU only (flash attention's variable-length kernel): CPU runs use masked rows")]
    import torch

    from dist_dpo.speed.attention import kernel_reason, native_gqa

    bf16 = torch.cuda.get_device_properties(0).major >= 8
    why = kernel_reason(0, torch.bfloat16 if bf16 else torch.float16, 128)
    if why:
        return [Row("packed rows", WARN, f"off: {why}; training uses padded rows with a mask (slower, more memory)")]
    return [Row("packed rows", OK, "variable-length flash kernel matches sdpa on GPU 0"
                + ("; grouped K/V heads as they are" if native_gqa() else
                   "; K/V heads expanded per query head (the grouped kernel failed the probe here)"))]


def communication_rows(gpus: int) -> list[Row]:
    import torch
    import torch.distributed as dist

    rows = [Row("gloo", OK if dist.is_gloo_available() else FAIL, "CPU collectives (the CPU demo)")]
    if dist.is_nccl_available():
        version = ".".join(map(str, torch.cuda.nccl.version())) if gpus else "?"
        rows.append(Row("NCCL", OK, f"{version} (GPU collectives)"))
    else:
        rows.append(Row("NCCL", FAIL if gpus else INFO, "not in this torch build: multi-GPU strategies cannot run"))
    return rows


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def runtime_for(name: str, gpus: int):
    """The Runtime a worker of `dist-dpo launch <name>` (accelerate, the packaged yaml) would resolve here:
    the launch environment accelerate hands its workers, read by runtime.py like in a real run."""
    from dist_dpo.runtime import accelerate_env, resolve_runtime

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"doctor: unknown strategy '{name}': choose one of {', '.join(strategy_names())}")
    cfg = yaml.safe_load(path.read_text()) or {}
    on_cpu = name == "cpu" or gpus == 0
    procs = int(cfg.get("num_processes", 1)) if on_cpu else gpus
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(procs), "LOCAL_WORLD_SIZE": str(procs),
           **accelerate_env(path)}
    with _environ(env):
        return resolve_runtime(device_type="cpu" if on_cpu else "cuda")


def strategy_rows(recipe, chosen: str | None, gpus: int) -> list[Row]:
    """Each strategy x this machine x the recipe (optimizer, quantization, precision), through
    preflight.check_combination."""
    from dist_dpo.config import Recipe
    from dist_dpo.strategies import strategy_for
    from dist_dpo.preflight import check_combination

    names = [chosen] if chosen else strategy_names()
    r = recipe or Recipe()
    rows = []
    for name in names:
        rt = runtime_for(name, gpus)
        try:
            check_combination(copy.deepcopy(r), rt, say=False)  # each strategy sees the recipe as written
        except UserError as e:
            rows.append(Row(f"strategy {name}", FAIL if chosen else INFO, f"not here: {e}"))
            continue
        caveat = strategy_for(rt.strategy).qlora_caveat
        if r.model.load_in_4bit and caveat:
            rows.append(Row(f"strategy {name}", WARN, caveat))
            continue
        rows.append(Row(f"strategy {name}", OK, rt.describe()))
    return rows


def _recipe(config: str | None, extra: list[str]):
    from dist_dpo.config import parse_recipe

    recipe = parse_recipe((["--config", config] if config else []) + extra)
    recipe.dry_run = True  # doctor never creates the output dir
    return recipe


def recipe_rows(recipe, chosen: str | None, gpus: int) -> list[Row]:
    from dist_dpo.logs import setup_console
    from dist_dpo.preflight import checks, human

    rt = runtime_for(chosen, gpus) if chosen else runtime_for("cpu" if gpus == 0 else "ddp", gpus)
    setup_console(rt)
    try:
        plan = checks(recipe, rt)
    except UserError as e:
        return [Row("recipe", FAIL, str(e))]
    rows = [Row("recipe", OK, f"{recipe.source}: {len(plan.train_ds)} train / {len(plan.eval_ds)} test pairs, "
                f"{plan.trainable:,} trainable of {plan.params:,} params")]
    if plan.model_type:
        from dist_dpo.architectures import summary

        rows.append(Row("model family", INFO, summary(plan.model_type)))
    rows.append(Row("disk", OK if plan.disk_free >= 2 * plan.disk_need else WARN,
                    f"{human(plan.disk_free)} free at {recipe.train.output_dir}, "
                    f"checkpoints need ~{human(plan.disk_need)}"))
    if plan.resume:
        rows.append(Row("resume", INFO, f"train would resume from {plan.resume}"))
    return rows


def disk_rows(output_dir: Path) -> list[Row]:
    from dist_dpo.preflight import free_bytes, human

    free = free_bytes(output_dir)
    return [Row("disk", OK if free > 10 * 2**30 else WARN,
                f"{human(free)} free at {output_dir} (pass --config for what the recipe's checkpoints need)")]


def print_table(rows: list[Row]) -> None:
    width = max(len(r.check) for r in rows)
    print(f"{'check'.ljust(width)}  {'':4}  detail")
    for r in rows:
        print(f"{r.check.ljust(width)}  {r.status:4}  {r.detail}")
