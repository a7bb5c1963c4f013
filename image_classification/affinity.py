"""CPU affinity per training process from the machine's NUMA layout (``--gpu-affinity``, NVIDIA DLE's modes).

Each local process first gets its "socket": the CPUs close to its device, read from ``/sys`` (a GPU's
``/sys/bus/pci/devices/<bus id>/local_cpulist``, or its ``numa_node``'s CPUs; on the CPU, process ``r`` of ``n``
gets NUMA node ``r * nodes // n``), limited to the CPUs this process may use. The CPUs are grouped into physical
cores by their hyperthread siblings (``/sys/devices/system/cpu/cpu*/topology/thread_siblings_list``), and a core
always comes with its siblings. The modes, as NVIDIA's:

- ``socket``: every core of the socket;
- ``socket_single``: the socket's first core (processes on one socket share it);
- ``socket_single_unique``: the socket's first core no earlier process took;
- ``socket_unique_interleaved`` / ``socket_unique_contiguous``: the socket's cores split among the processes on
  it, every ``k``-th core or ``k`` consecutive cores each, the same number for every process (``balanced``);
- ``none``: the affinity is left as it is.

(``MODES`` is imported by main.py's parser, so this module imports torch only where it needs CUDA.)
NVIDIA reads a GPU's CPUs through NVML; here they come from ``/sys``, so the same modes work without pynvml and on
CPU-only machines. Where ``/sys`` has no NUMA information (containers that hide it, other systems) the affinity is
left as it is and one line says so.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Set, Tuple

from errors import UserError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MODES = ("none", "socket", "socket_single", "socket_single_unique", "socket_unique_interleaved",
         "socket_unique_contiguous")
SYSFS = "/sys"

Core = Tuple[int, ...]  # the logical CPUs of one physical core (hyperthread siblings)


def parse_cpulist(text: str) -> List[int]:
    """``"0-3,8,10-11"`` -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: List[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii") as stream:
            return stream.read().strip()
    except OSError:
        return None


def numa_nodes(sysfs: str = SYSFS) -> List[List[int]]:
    """The CPUs of each NUMA node that has any, in node order; [] without that information."""
    nodes = []
    for path in glob.glob(os.path.join(sysfs, "devices/system/node/node[0-9]*")):
        cpus = parse_cpulist(_read(os.path.join(path, "cpulist")) or "")
        if cpus:
            nodes.append((int(os.path.basename(path)[4:]), cpus))
    return [cpus for _, cpus in sorted(nodes)]


def sibling_groups(sysfs: str = SYSFS) -> Dict[int, Core]:
    """Logical CPU -> the logical CPUs of its physical core (itself alone where /sys does not say)."""
    groups: Dict[int, Core] = {}
    for path in glob.glob(os.path.join(sysfs, "devices/system/cpu/cpu[0-9]*/topology/thread_siblings_list")):
        siblings = tuple(sorted(parse_cpulist(_read(path) or "")))
        for cpu in siblings:
            groups[cpu] = siblings
    return groups


def gpu_cpus(bus_id: str, sysfs: str = SYSFS) -> List[int]:
    """The CPUs local to the PCI device ``bus_id`` (``0000:3b:00.0``): its ``local_cpulist``, else its NUMA node's."""
    device = os.path.join(sysfs, "bus/pci/devices", bus_id.lower())
    cpus = parse_cpulist(_read(os.path.join(device, "local_cpulist")) or "")
    if cpus:
        return cpus
    node = _read(os.path.join(device, "numa_node"))
    if node is not None and node.lstrip("-").isdigit() and int(node) >= 0:
        return parse_cpulist(_read(os.path.join(sysfs, f"devices/system/node/node{node}/cpulist")) or "")
    return []


def _cuda_bus_id(index: int) -> Optional[str]:
    import torch

    props = torch.cuda.get_device_properties(index)
    if not hasattr(props, "pci_bus_id"):
        return None
    return f"{getattr(props, 'pci_domain_id', 0):04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


def device_sockets(device: torch.device, local_world_size: int, sysfs: str = SYSFS) -> List[List[int]]:
    """The CPUs near each local process's device (one list per local rank); [] when /sys cannot tell."""
    if device.type == "cuda":
        import torch

        sockets = []
        for index in range(local_world_size):
            bus_id = _cuda_bus_id(index) if index < torch.cuda.device_count() else None
            cpus = gpu_cpus(bus_id, sysfs) if bus_id else []
            if not cpus:
                return []
            sockets.append(cpus)
        return sockets
    nodes = numa_nodes(sysfs)
    if not nodes:
        return []
    return [nodes[rank * len(nodes) // local_world_size] for rank in range(local_world_size)]


def plan(mode: str, sockets: Sequence[Sequence[int]], siblings: Dict[int, Core], available: Set[int],
         balanced: bool = True) -> List[List[int]]:
    """The CPUs of every local process under ``mode`` (see the module docstring); a pure function of the layout."""
    if mode not in MODES:
        raise UserError(f"unknown affinity mode {mode!r}; valid: {', '.join(MODES)}")
    grouped: List[List[Core]] = []
    for socket in sockets:
        cores = sorted({siblings.get(cpu, (cpu,)) for cpu in socket if cpu in available})
        grouped.append([tuple(cpu for cpu in core if cpu in available) for core in cores])
    if mode == "none":
        return [sorted(available)] * len(sockets)
    if mode == "socket":
        chosen = grouped
    elif mode == "socket_single":
        chosen = [cores[:1] for cores in grouped]
    elif mode == "socket_single_unique":
        taken: Set[Core] = set()
        chosen = []
        for cores in grouped:
            free = [core for core in cores if core not in taken][:1]
            taken.update(free)
            chosen.append(free)
    else:
        sharing: Dict[Tuple[Core, ...], List[int]] = {}
        for rank, cores in enumerate(grouped):
            sharing.setdefault(tuple(cores), []).append(rank)
        per_process = min(len(cores) // len(ranks) for cores, ranks in sharing.items())
        chosen = [[] for _ in grouped]
        for cores, ranks in sharing.items():
            count = per_process if balanced else len(cores) // len(ranks)
            for position, rank in enumerate(ranks):
                if mode == "socket_unique_interleaved":
                    chosen[rank] = list(cores[position::len(ranks)][:count])
                else:
                    chosen[rank] = list(cores[position * count:(position + 1) * count])
    return [sorted(cpu for core in cores for cpu in core) for cores in chosen]


def set_affinity(mode: str, local_rank: int, local_world_size: int, device: torch.device,
                 sysfs: Optional[str] = None) -> Optional[Set[int]]:
    """Pin this process as ``mode`` says (see :func:`plan`) and log its CPUs in one line; None when the mode is
    ``none`` or /sys has no NUMA information (then one line says the affinity is left as it is)."""
    if mode == "none":
        return None
    sysfs = sysfs or SYSFS
    sockets = device_sockets(device, local_world_size, sysfs)
    if not sockets:
        logger.info("--gpu-affinity %s: no NUMA layout in %s on this machine; CPU affinity left as it is", mode, sysfs)
        return None
    available = os.sched_getaffinity(0)
    cpus = plan(mode, sockets, sibling_groups(sysfs), available)[local_rank]
    if not cpus:  # more processes than cores on the socket: share the socket rather than run on nothing
        cpus = sorted(cpu for cpu in sockets[local_rank] if cpu in available) or sorted(available)
        logger.info("--gpu-affinity %s: too few cores for process %d of %d; it gets its socket's", mode, local_rank,
                    local_world_size)
    os.sched_setaffinity(0, cpus)
    affinity = os.sched_getaffinity(0)
    logger.info("--gpu-affinity %s: process %d of %d on CPUs %s", mode, local_rank, local_world_size,
                format_cpulist(sorted(affinity)))
    return affinity


def format_cpulist(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 3, 8] -> ``"0-3,8"``."""
    ranges: List[List[int]] = []
    for cpu in cpus:
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
