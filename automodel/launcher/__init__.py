"""From a config and a few flags to the commands that run it: a `deepspeed` command for one node, or an sbatch
script (one srun task per GPU, job arrays for sweeps)."""

import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import attrs

from automodel.config import ConfigError
from automodel.config.schema import LaunchConfig

RUN_PY = Path(__file__).resolve().parents[2] / "launch" / "run.py"


@attrs.frozen
class Topology:
    nodes: int
    gpus_per_node: int
    nproc_per_node: int  # ranks per node: one per GPU, or CPU processes

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def topology(launch: LaunchConfig, nodes: Optional[int] = None, gpus_per_node: Optional[int] = None,
             nproc_per_node: Optional[int] = None) -> Topology:
    """Flags win over the config's [launch] section. With GPUs there is one rank per GPU."""
    nodes = launch.nodes if nodes is None else nodes
    gpus = launch.gpus_per_node if gpus_per_node is None else gpus_per_node
    nproc = launch.nproc_per_node if nproc_per_node is None else nproc_per_node
    if nodes < 1:
        raise ConfigError(f"--nodes must be >= 1 (got {nodes})")
    if gpus < 0 or nproc < 0:
        raise ConfigError("--gpus-per-node and --nproc-per-node must be >= 0")
    if gpus > 0 and nproc not in (0, gpus):
        raise ConfigError(f"--nproc-per-node {nproc} with --gpus-per-node {gpus}: runs have one rank per GPU; "
                          "leave --nproc-per-node out, or use --gpus-per-node 0 for CPU processes")
    return Topology(nodes, gpus, nproc or gpus or 1)


def entry_point() -> list[str]:
    """What each rank runs: launch/run.py of this checkout (relative when under the current directory), or
    `-m automodel run` for an installed package without one."""
    if RUN_PY.is_file():
        try:
            return [str(RUN_PY.relative_to(Path.cwd()))]
        except ValueError:
            return [str(RUN_PY)]
    return ["-m", "automodel", "run"]


def deepspeed_command(config: str, overrides: Sequence[str], topo: Topology) -> list[str]:
    """The one-node `deepspeed` command (on CPU, --num_gpus starts that many processes with gloo)."""
    if topo.nodes > 1:
        raise ConfigError(f"--nodes {topo.nodes} without --slurm: a multi-node run needs the nodes' hosts; use "
                          "--slurm (one task per GPU on every node of the allocation), or run this command with "
                          "deepspeed's own --hostfile")
    entry = entry_point()
    script = ["--module", "automodel", *entry[2:]] if entry[0] == "-m" else entry
    return [deepspeed_bin(), "--num_gpus", str(topo.nproc_per_node), *script, "--config", config, *overrides]


def deepspeed_bin() -> str:
    """`deepspeed` when it is on PATH, else the one installed beside this interpreter (an unactivated venv)."""
    beside = Path(sys.executable).parent / "deepspeed"
    if shutil.which("deepspeed") or not beside.is_file():
        return "deepspeed"
    return str(beside)


def python_for(slurm_python: str, container_image: str) -> str:
    if slurm_python:
        return slurm_python
    return "python" if container_image else sys.executable
