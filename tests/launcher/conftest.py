import os

import pytest

from tests.launcher import slurm_cluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running two-node Slurm (on this host; each node has its CPUs) for the session; its clients find it through SLURM_CONF."""
    root = tmp_path_factory.mktemp("slurm")
    started = slurm_cluster.start(root)
    if isinstance(started, str):
        pytest.skip(f"no Slurm: {started}")
    previous = os.environ.get("SLURM_CONF")
    os.environ.update(started)
    yield root
    slurm_cluster.stop(root, started)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
