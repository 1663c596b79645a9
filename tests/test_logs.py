"""Rank-aware logging: rank 0 speaks INFO, others WARNING+, every rank has its own file with host and rank."""

import os
import subprocess
import sys
import textwrap

from conftest import ROOT

SCRIPT = textwrap.dedent(
    """
    import sys
    from dist_dpo.logs import add_rank_file, setup_console
    from dist_dpo.runtime import resolve_runtime
    rt = resolve_runtime(device_type="cpu")
    log = setup_console(rt)
    add_rank_file(rt, sys.argv[1])
    log.info("hello-info")
    log.warning("hello-warning")
    """
)


def run_as(rank, out, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank % 2),
           "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), check=True)


def test_rank0_speaks_others_only_warn(tmp_path):
    out = tmp_path / "run"
    r0, r3 = run_as(0, out, tmp_path), run_as(3, out, tmp_path)
    assert "hello-info" in r0.stdout and "hello-warning" in r0.stdout
    assert "hello-info" not in r3.stdout + r3.stderr and "hello-warning" in r3.stderr
    for rank in (0, 3):
        text = (out / "logs" / f"rank{rank}.log").read_text()
        assert "hello-info" in text and "hello-warning" in text  # files keep everything
        assert f"rank{rank}]" in text and "[" in text.split("rank")[0]  # host and rank on each line


QUIET = textwrap.dedent(
    """
    import logging, sys, warnings
    from dist_dpo.logs import add_rank_file, setup_console
    from dist_dpo.runtime import resolve_runtime
    rt = resolve_runtime(device_type="cpu")
    log = setup_console(rt)
    log.info("ours-before")
    # what liger-kernel logs on GPU start-up, through its module logger
    logging.getLogger("liger_kernel.ops.backends").warning("lib-liger Backend impl could not be imported")
    warnings.warn("lib-warnings-warn: something deprecated")
    import transformers
    transformers.utils.logging.get_logger("transformers.modeling_utils").warning("lib-transformers warning")
    import deepspeed  # logs "Setting accelerator to CPU" through its own stdout handler, at import
    logging.getLogger("accelerate.utils").warning("lib-accelerate warning")
    add_rank_file(rt, sys.argv[1])  # the output dir is known: what was held is written
    warnings.warn("lib-after-the-file")
    log.info("ours-after")
    """
)


def test_library_warnings_go_to_the_rank_file_not_the_console(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", QUIET, str(out)], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), check=True)
    console = proc.stdout + proc.stderr
    assert "ours-before" in proc.stdout and "ours-after" in proc.stdout
    assert "lib-" not in console and "Setting accelerator" not in console, console
    assert [line for line in console.splitlines() if line.strip()] == [
        line for line in proc.stdout.splitlines() if " INFO dist_dpo: ours-" in line]  # nothing else at all
    text = (out / "logs" / "rank0.log").read_text()
    for message in ("lib-liger Backend impl", "lib-warnings-warn", "lib-transformers warning", "lib-accelerate",
                    "Setting accelerator to CPU", "lib-after-the-file", "ours-after"):
        assert message in text, message
    assert "WARNING liger_kernel.ops.backends: lib-liger" in text  # which library said it
