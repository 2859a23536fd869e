"""What the Slurm partition has, asked of sinfo before an sbatch script is written: a request no node can hold
(more CPUs, memory or GPUs per node than the nodes have, more nodes than the partition, a longer time than its
limit) would pend forever with a terse reason ("PartitionConfig", "Resources"), so it is a one-line error with the
numbers instead; and launch.slurm.cpus_per_task = 0 becomes the node's CPUs shared among its ranks.

Where sinfo is not installed or reaches no controller (a laptop writing a script for later), nothing is checked
and cpus_per_task = 0 means 8.
"""

import re
import subprocess
import sys
from typing import Optional

import attrs

from automodel.config import ConfigError
from automodel.config.schema import SlurmConfig
from automodel.launcher import Topology

CPUS_PER_TASK_UNKNOWN = 8  # cpus_per_task = 0 where sinfo does not answer
SINFO_FORMAT = "%P|%D|%c|%m|%G|%l"
SINFO_TIMEOUT_S = 15


@attrs.frozen
class NodeGroup:
    """One line of sinfo: nodes of a partition that look alike."""
    partition: str
    default: bool   # the partition sbatch uses when none is given
    nodes: int
    cpus: int
    memory_mb: int
    gpus: int
    time_limit_min: Optional[int]  # None: no limit


def parse_minutes(text: str) -> Optional[int]:
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) to whole minutes (rounded up); None for
    "infinite"/"UNLIMITED"."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", "n/a"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, *parts
    else:
        hours, minutes, seconds = parts
    return int(days or 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def parse_memory_mb(text: str) -> int:
    """--mem's value ("200G", "64000", "1T"; default unit MB) in MB."""
    match = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper())
    if not match:
        raise ConfigError(f'launch.slurm.mem "{text}" is not a Slurm memory size; e.g. "200G" or "64000" (MB)')
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[match.group(2)]
    return int(int(match.group(1)) * scale)


def parse_gpus(gres: str) -> int:
    """GPUs per node from sinfo's Gres column: "gpu:8", "gpu:h100:8(S:0-1)", "gpu:a100:4,shard:8", "(null)"."""
    total = 0
    for entry in gres.split(","):
        fields = re.sub(r"\(.*?\)", "", entry).split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def parse_sinfo(text: str) -> list[NodeGroup]:
    groups = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, nodes, cpus, memory, gres, limit = line.split("|")
        groups.append(NodeGroup(name.rstrip("*"), name.endswith("*"), int(nodes), int(cpus.rstrip("+")),
                                int(memory.rstrip("+")), parse_gpus(gres), parse_minutes(limit)))
    return groups


def sinfo() -> Optional[list[NodeGroup]]:
    """The cluster's node groups, or None where sinfo does not answer."""
    try:
        done = subprocess.run(["sinfo", "-h", "-o", SINFO_FORMAT], capture_output=True, text=True,
                              timeout=SINFO_TIMEOUT_S)
    except OSError:
        return None
    except subprocess.TimeoutExpired:  # (a SLURM_CONF that names no file: sinfo retries for a minute)
        print(f"warning: sinfo did not answer in {SINFO_TIMEOUT_S} s; the partition was not checked",
              file=sys.stderr)
        return None
    if done.returncode != 0:
        return None
    return parse_sinfo(done.stdout)


def fit(slurm: SlurmConfig, topo: Topology, groups: Optional[list[NodeGroup]]) -> SlurmConfig:
    """The Slurm settings to write: cpus_per_task resolved, after checking that the partition can ever run them."""
    if groups is None:
        return attrs.evolve(slurm, cpus_per_task=slurm.cpus_per_task or CPUS_PER_TASK_UNKNOWN)
    name = slurm.partition or next((g.partition for g in groups if g.default), "")
    mine = [g for g in groups if g.partition == name]
    if not mine:
        known = sorted({g.partition for g in groups})
        what = f'partition "{name}"' if name else "a default partition"
        raise ConfigError(f"launch.slurm.partition: sinfo lists no {what}; the partitions are {', '.join(known)}")
    where = f"partition {name} (sinfo)"
    ranks = topo.nproc_per_node
    cpus_per_task = slurm.cpus_per_task or max(1, min(g.cpus for g in mine) // ranks)
    problems = []  # why each group of nodes cannot hold one node's share
    need_mb = parse_memory_mb(slurm.mem) if slurm.mem not in ("", "0") else 0
    able = []
    for g in mine:
        if topo.gpus_per_node > g.gpus:
            problems.append(f"--gpus-per-node {topo.gpus_per_node}, but the nodes of {where} have {g.gpus} GPU(s)"
                            + ("; choose a GPU partition (launch.slurm.partition) or --gpus-per-node 0 to run on CPU"
                               if not g.gpus else ""))
        elif ranks > g.cpus:
            problems.append(f"{ranks} rank(s) per node, but the nodes of {where} have {g.cpus} CPU(s); run fewer "
                            "ranks per node (--nproc-per-node) or choose another partition")
        elif ranks * cpus_per_task > g.cpus:
            problems.append(f"{ranks} rank(s) x launch.slurm.cpus_per_task = {cpus_per_task} is {ranks * cpus_per_task} "
                            f"CPUs per node, but the nodes of {where} have {g.cpus}; set launch.slurm.cpus_per_task = "
                            f"{g.cpus // ranks} (or 0: the node's CPUs shared among its ranks)")
        elif need_mb > g.memory_mb:
            problems.append(f'launch.slurm.mem = "{slurm.mem}" is {need_mb} MB per node, but the nodes of {where} have '
                            f'{g.memory_mb} MB; ask for less, or "0" (all of a node\'s memory)')
        else:
            able.append(g)
    if not able:
        raise ConfigError(f"this job could never start: {problems[0]}")
    if sum(g.nodes for g in able) < topo.nodes:
        raise ConfigError(f"--nodes {topo.nodes}, but {where} has {sum(g.nodes for g in able)} node(s) that can hold "
                          f"{ranks} rank(s) each; this job could never start")
    limit = min((g.time_limit_min for g in able if g.time_limit_min is not None), default=None)
    asked = parse_minutes(slurm.time)
    if limit is not None and asked is not None and asked > limit:
        raise ConfigError(f'launch.slurm.time = "{slurm.time}" is longer than the time limit of {where}, {limit} '
                          "minute(s); the job would never start. Ask for at most that: a preempted or timed-out run "
                          "checkpoints and requeues, so a long run fits in short jobs")
    return attrs.evolve(slurm, cpus_per_task=cpus_per_task)
