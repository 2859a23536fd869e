"""Rank discovery from the launchers' and Slurm's variables, and the variables setup() exports."""

import pytest

from automodel.distributed import RankInfo, first_host, rank_info, setup


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_ID",
                "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_launcher_variables_win_over_slurm(clean_env):
    assert rank_info() == RankInfo(0, 0, 1)
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_NTASKS", "4")
    assert rank_info() == RankInfo(3, 1, 4)
    clean_env.setenv("RANK", "5")
    clean_env.setenv("LOCAL_RANK", "2")
    clean_env.setenv("WORLD_SIZE", "8")
    assert rank_info() == RankInfo(5, 2, 8)


def test_one_rank_group_exports_what_deepspeed_reads(clean_env):
    import os

    import torch
    import torch.distributed as dist

    assert setup(RankInfo(), torch.device("cpu"), group_on_one_rank=True) is None
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")
        assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    finally:
        dist.destroy_process_group()


def test_first_host_of_a_slurm_node_list():
    assert first_host("vm") == "vm"
    assert first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_host("node7,node[1-2]") == "node7"
    assert first_host("rack[2-3]-n[01-04],x") == "rack2-n01"


def test_slurm_variables_alone_make_a_process_group(clean_env):
    """What srun gives a task (no launcher): rank from SLURM_PROCID, port from the job id, address from the
    node list. One task here, so the group forms without peers."""
    import os

    import torch
    import torch.distributed as dist

    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_LOCALID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    clean_env.setenv("SLURM_JOB_ID", "123457")
    clean_env.setenv("SLURM_JOB_NODELIST", "localhost")
    assert setup(rank_info(), torch.device("cpu"), group_on_one_rank=True) is None
    try:
        assert os.environ["MASTER_ADDR"] == "localhost" and os.environ["MASTER_PORT"] == str(10000 + 123457 % 50000)
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1") and dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()
