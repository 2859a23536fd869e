"""The partition check before an sbatch script is written, on sinfo lines as Slurm prints them (the same checks
against a real sinfo are in test_slurm.py)."""

import pytest

from automodel.config import ConfigError
from automodel.config.schema import SlurmConfig
from automodel.launcher import Topology
from automodel.launcher.partition import fit, parse_gpus, parse_memory_mb, parse_minutes, parse_sinfo

# `sinfo -h -o "%P|%D|%c|%m|%G|%l"` on a cluster with a GPU partition of two node types and a CPU default.
SINFO = """\
cpu*|40|2|20000|(null)|1-00:00:00
gpu|16|224|2048000|gpu:h100:8(S:0-1)|2-00:00:00
gpu|4|96|1024000|gpu:a100:4,shard:16|2-00:00:00
"""
GROUPS = parse_sinfo(SINFO)
GPU8 = Topology(nodes=2, gpus_per_node=8, nproc_per_node=8)
CPU2 = Topology(nodes=1, gpus_per_node=0, nproc_per_node=2)


def test_sinfo_fields():
    assert [(g.partition, g.default, g.nodes, g.cpus, g.memory_mb, g.gpus, g.time_limit_min) for g in GROUPS] == [
        ("cpu", True, 40, 2, 20000, 0, 1440), ("gpu", False, 16, 224, 2048000, 8, 2880),
        ("gpu", False, 4, 96, 1024000, 4, 2880)]
    assert parse_gpus("gpu:8") == 8 and parse_gpus("(null)") == 0 and parse_gpus("gpu:a:2,gpu:b:2(S:0)") == 4
    assert [parse_minutes(t) for t in ("90", "30:00", "04:00:00", "2-00", "1-12:30", "0:0:30", "infinite")] == \
        [90, 30, 240, 2880, 2190, 1, None]
    assert parse_memory_mb("200G") == 204800 and parse_memory_mb("64000") == 64000 and parse_memory_mb("1T") == 1048576


def test_cpus_per_task_0_is_the_node_shared_among_its_ranks():
    assert fit(SlurmConfig(), CPU2, GROUPS).cpus_per_task == 1  # the 2-CPU default partition, 2 ranks
    assert fit(SlurmConfig(partition="gpu"), GPU8, GROUPS).cpus_per_task == 12  # the smaller node type: 96 / 8
    assert fit(SlurmConfig(cpus_per_task=4), CPU2, None).cpus_per_task == 4
    assert fit(SlurmConfig(), CPU2, None).cpus_per_task == 8  # sinfo did not answer: as before


def test_requests_no_node_can_hold_are_one_line_errors_with_the_numbers():
    with pytest.raises(ConfigError, match=r"2 rank\(s\) x launch.slurm.cpus_per_task = 8 is 16 CPUs per node, but the "
                       r"nodes of partition cpu \(sinfo\) have 2; set launch.slurm.cpus_per_task = 1"):
        fit(SlurmConfig(cpus_per_task=8), CPU2, GROUPS)
    with pytest.raises(ConfigError, match="--gpus-per-node 8, but the nodes of partition cpu .* have 0 GPU.*GPU "
                       "partition"):
        fit(SlurmConfig(), GPU8, GROUPS)
    with pytest.raises(ConfigError, match=r"4 rank\(s\) per node, but the nodes of partition cpu \(sinfo\) have 2 CPU"):
        fit(SlurmConfig(), Topology(1, 0, 4), GROUPS)
    with pytest.raises(ConfigError, match='mem = "4T" is 4194304 MB per node, but .* have 2048000 MB'):
        fit(SlurmConfig(partition="gpu", mem="4T"), GPU8, GROUPS)
    with pytest.raises(ConfigError, match=r"--nodes 17, but partition gpu \(sinfo\) has 16 node\(s\)"):
        fit(SlurmConfig(partition="gpu"), Topology(17, 8, 8), GROUPS)  # only the H100 nodes have 8 GPUs
    assert fit(SlurmConfig(partition="gpu"), Topology(20, 4, 4), GROUPS).cpus_per_task == 24  # both types hold 4
    with pytest.raises(ConfigError, match='time = "3-00:00:00" is longer than the time limit of partition gpu'):
        fit(SlurmConfig(partition="gpu", time="3-00:00:00"), GPU8, GROUPS)
    with pytest.raises(ConfigError, match='no partition "gpus"; the partitions are cpu, gpu'):
        fit(SlurmConfig(partition="gpus"), GPU8, GROUPS)
