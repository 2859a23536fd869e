"""Ranks: who am I (from the deepspeed launcher, torchrun or Slurm variables) and the gradient all-reduce."""

import os
import attrs
import torch
import torch.distributed as dist

from automodel.training.step import AllReduce


@attrs.frozen
class RankInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def rank_info() -> RankInfo:
    """RANK/LOCAL_RANK/WORLD_SIZE (deepspeed, torchrun), else SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return RankInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return RankInfo()


def device_for(info: RankInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def setup(info: RankInfo, device: torch.device) -> AllReduce:
    """Joins the process group when there are several ranks and returns the SUM all-reduce (None on one)."""
    if info.world_size == 1:
        return None
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=info.rank,
                                world_size=info.world_size)

    def all_reduce(tensors: list[torch.Tensor]) -> None:
        # One flat buffer per dtype: a collective per tensor costs a round trip each, and casting a token
        # count to float32 would round it.
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    return all_reduce


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


__all__ = ["RankInfo", "barrier", "device_for", "rank_info", "setup", "teardown"]
