"""Each rank on its own physical cores, next to its GPU.

A DPO step on short, variable-length pairs is host-bound: thousands of small kernel launches, so the speed of the
Python thread that issues them sets the step time (a 1-GPU var6k step took 212 ms while its
GPU worked ~20-60 % of it). Left to the scheduler, the ranks of one machine float over every CPU: two of them can
land on the two hardware threads of one core, or far from their GPU, and then the slower one holds every collective
(the same 2-GPU run measured 0.72 to 0.94 of linear scaling across machines). The launchers do not pin: torchrun and
`accelerate launch` leave affinity alone unless ACCELERATE_CPU_AFFINITY=1, and accelerate's pinning gives every rank
of a NUMA node the whole node, so ranks still share cores. Here the CPUs of each NUMA node are split, by whole
physical cores, among the machine's GPUs on that node, and each rank takes its GPU's share.

Measured, it did not pay where we could measure it (2 x H200 VM, 32 vCPUs shown as one NUMA node and one thread per
core, GPUs with no NUMA node; the `pinned` rows of throughput.py): a steady var6k DDP step took 207-214 ms per rank
pinned to 16 vCPUs each and 183-187 ms unpinned, 2-GPU scaling 0.72 vs 0.80. A VM's vCPUs hide which of them share
a physical core, so the split can put both ranks on sibling threads. Hence `cpu_affinity: false` by default; the
option stays for bare-metal machines with real NUMA nodes, where the launchers' lack of pinning is known to cost.
"""

from __future__ import annotations

import os
from pathlib import Path

SYS = Path("/sys")
PINNED: list[int] | None = None  # this process's CPUs once pin_this_rank has run: already its share of the machine


def cpus_for_gpu(gpu: int, gpu_nodes: list[int], node_cpus: dict[int, list[int]], allowed: set[int],
              core_of: dict[int, tuple]) -> list[int] | None:
    """The CPUs for the process that drives GPU number `gpu` of the machine, or None when they cannot be split
    (fewer physical cores than GPUs to share them).

    gpu_nodes: NUMA node of each GPU of the machine (-1: unknown); node_cpus: CPUs of each node; allowed: the CPUs
    this process may use; core_of: CPU -> its physical core (hardware threads of one core share it). Every GPU of the
    machine gets its share, not only this job's: two jobs on GPUs 0,1 and 2,3 of one machine get different cores."""
    node = gpu_nodes[gpu]
    pool = [c for c in node_cpus.get(node, []) if c in allowed]
    sharing = [r for r, n in enumerate(gpu_nodes) if n == node]
    if any(n < 0 or not allowed.intersection(node_cpus.get(n, [])) for n in gpu_nodes):
        # no NUMA facts, or a GPU whose node has none of our CPUs: all local ranks split all allowed CPUs
        pool, sharing = sorted(allowed), list(range(len(gpu_nodes)))
    cores: dict[tuple, list[int]] = {}
    for c in sorted(pool):
        cores.setdefault(core_of.get(c, (c,)), []).append(c)
    groups = list(cores.values())
    k, i = len(sharing), sharing.index(gpu)
    if len(groups) < k:
        return None
    mine = groups[i * len(groups) // k:(i + 1) * len(groups) // k]
    return sorted(c for g in mine for c in g)


def _cpulist(text: str) -> list[int]:
    out: list[int] = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _topology(allowed: set[int]) -> tuple[dict[int, list[int]], dict[int, tuple]]:
    node_cpus = {int(d.name[4:]): _cpulist((d / "cpulist").read_text())
                 for d in (SYS / "devices/system/node").glob("node[0-9]*")}
    core_of = {}
    for c in allowed:
        top = SYS / f"devices/system/cpu/cpu{c}/topology"
        try:
            core_of[c] = ((top / "physical_package_id").read_text().strip(), (top / "core_id").read_text().strip())
        except OSError:
            core_of[c] = (str(c),)
    return node_cpus, core_of


def _bus(domain: int, bus: int, device: int) -> str:
    return f"{domain:04x}:{bus:02x}:{device:02x}.0"


def _machine_gpus() -> list[str]:
    """PCI addresses of every GPU this machine (container) shows, whatever CUDA_VISIBLE_DEVICES says: nvidia-smi
    lists them all; without it, the ones torch sees."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
        found = []
        for line in out.split():  # 00000000:19:00.0
            dom, bus, dev = line.strip().lower().split(":")
            found.append(_bus(int(dom, 16), int(bus, 16), int(dev.split(".")[0], 16)))
        if found:
            return found
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    import torch

    return [_torch_bus(i) for i in range(torch.cuda.device_count())]


def _torch_bus(index: int) -> str:
    import torch

    p = torch.cuda.get_device_properties(index)
    return _bus(p.pci_domain_id, p.pci_bus_id, p.pci_device_id)


def _numa_node(bus: str) -> int:
    try:
        return int((SYS / f"bus/pci/devices/{bus}/numa_node").read_text())
    except (OSError, ValueError):
        return -1


def pin_this_rank(local_rank: int) -> list[int] | None:
    """Pin every thread of this process (and those it starts later) to the CPUs of the GPU it drives (torch device
    `local_rank`); returns them, or None if nothing was pinned. Call it before the heavy threads start (process
    group, data workers)."""
    allowed = set(os.sched_getaffinity(0))
    node_cpus, core_of = _topology(allowed)
    gpus = _machine_gpus()
    mine = _torch_bus(local_rank)
    if mine not in gpus:
        return None
    cpus = cpus_for_gpu(gpus.index(mine), [_numa_node(b) for b in gpus], node_cpus, allowed, core_of)
    if not cpus:
        return None
    for tid in os.listdir("/proc/self/task"):  # sched_setaffinity binds one thread: bind the running ones too
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that ended meanwhile
            pass
    global PINNED
    PINNED = cpus
    import torch

    if torch.get_num_threads() > len(cpus):  # intra-op threads beyond the pinned cores would only fight
        torch.set_num_threads(len(cpus))
    return cpus
