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
