"""Rank discovery from the launchers' and Slurm's variables, and the variables setup() exports."""

import pytest

from automodel.distributed import RankInfo, rank_info, setup


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_ID",
                "MASTER_ADDR", "MASTER_PORT"):
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
