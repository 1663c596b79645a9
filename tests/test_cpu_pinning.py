"""cpu_pinning.cpus_for_gpu: each local rank gets whole physical cores of its GPU's NUMA node, never a core another rank
holds; what cannot be split is left alone."""

from dist_dpo.cpu_pinning import _cpulist, cpus_for_gpu
from dist_dpo.train import _ranges

# 2 sockets x 4 cores x 2 hardware threads: cpu c and c+8 are one core; node 0 = cores 0-3, node 1 = cores 4-7
NODES = {0: [0, 1, 2, 3, 8, 9, 10, 11], 1: [4, 5, 6, 7, 12, 13, 14, 15]}
CORE = {c: ("pkg", c % 8) for c in range(16)}
ALL = set(range(16))


def test_two_gpus_on_one_node_split_its_cores_without_sharing_one():
    r0 = cpus_for_gpu(0, [0, 0], NODES, ALL, CORE)
    r1 = cpus_for_gpu(1, [0, 0], NODES, ALL, CORE)
    assert r0 == [0, 1, 8, 9] and r1 == [2, 3, 10, 11]  # both threads of each core go to one rank
    assert not set(r0) & set(r1)


def test_gpus_on_two_nodes_each_get_their_own_node():
    assert cpus_for_gpu(0, [0, 1], NODES, ALL, CORE) == NODES[0]
    assert cpus_for_gpu(1, [0, 1], NODES, ALL, CORE) == sorted(NODES[1])


def test_unknown_numa_node_splits_every_allowed_cpu():
    r0, r1 = (cpus_for_gpu(r, [-1, -1], NODES, ALL, CORE) for r in (0, 1))
    assert len(r0) == len(r1) == 8 and not set(r0) & set(r1) and set(r0) | set(r1) == ALL


def test_a_node_without_our_cpus_falls_back_for_every_rank():
    allowed = set(NODES[0])  # a cpuset that holds node 0 only, GPU 1 on node 1
    r0, r1 = (cpus_for_gpu(r, [0, 1], NODES, allowed, CORE) for r in (0, 1))
    assert set(r0) | set(r1) == allowed and not set(r0) & set(r1)


def test_two_jobs_on_one_machine_take_different_cores():
    """Job A on GPUs 0,1 and job B on GPUs 2,3, all four on node 0: each GPU's process gets its own core."""
    nodes = [0, 0, 0, 0]
    shares = [cpus_for_gpu(g, nodes, NODES, ALL, CORE) for g in range(4)]
    assert shares == [[0, 8], [1, 9], [2, 10], [3, 11]]


def test_fewer_cores_than_ranks_is_left_alone():
    assert cpus_for_gpu(2, [0, 0, 0, 0, 0], {0: [0, 1]}, {0, 1}, {0: (0,), 1: (1,)}) is None


def test_cpulist_and_ranges_round_trip():
    assert _cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert _ranges([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"


def test_pin_this_rank_binds_running_and_later_threads(tmp_path):
    """In a child process (pinning is process-wide): rank 1 of 2 with no NUMA facts takes its half of the cores."""
    import subprocess
    import sys

    code = """
import json, os, threading
import dist_dpo.cpu_pinning as cp
cp._machine_gpus = lambda: ["0000:01:00.0", "0000:02:00.0"]
cp._torch_bus = lambda i: ["0000:01:00.0", "0000:02:00.0"][i]
cp._numa_node = lambda bus: -1
before = sorted(os.sched_getaffinity(0))
seen = {}
started = threading.Event()
t = threading.Thread(target=lambda: (started.wait(), seen.update(old=sorted(os.sched_getaffinity(0)))))
t.start()
got = cp.pin_this_rank(1)
started.set(); t.join()
late = threading.Thread(target=lambda: seen.update(new=sorted(os.sched_getaffinity(0))))
late.start(); late.join()
print(json.dumps({"before": before, "got": got, "main": sorted(os.sched_getaffinity(0)), **seen}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    if r["got"] is None:  # fewer physical cores than ranks (a 1-core box): nothing may change
        assert r["main"] == r["old"] == r["new"] == r["before"]
    else:
        assert r["main"] == r["old"] == r["new"] == r["got"]
        assert set(r["got"]) < set(r["before"])
