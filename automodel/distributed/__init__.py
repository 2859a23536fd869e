"""Ranks: who am I (from the deepspeed launcher, torchrun or Slurm variables) and the gradient all-reduce."""

import os
import socket
from typing import Callable, Optional

import attrs
import torch
import torch.distributed as dist

# In-place SUM all-reduce of a list of tensors across ranks; None on one rank.
AllReduce = Optional[Callable[[list[torch.Tensor]], None]]


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
        # A scheduler that binds one GPU per task shows each task a single device.
        index = info.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[003-005,9],cpu1" -> "gpu003" (what `scontrol show hostnames`
    prints first), for a rendezvous address every task derives alike without calling scontrol."""
    head = nodelist.strip()
    depth = 0
    for i, ch in enumerate(head):  # the first top-level comma ends the first entry
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            head = head[:i]
            break
    prefix, bracket, rest = head.partition("[")
    if not bracket:
        return head
    first_range, _, suffix = rest.partition("]")
    return prefix + first_range.split(",")[0].split("-")[0] + first_host(suffix)  # "r[1-2]-n[01-04]": r1-n01


def setup(info: RankInfo, device: torch.device, group_on_one_rank: bool = False) -> AllReduce:
    """Joins the process group when there are several ranks (or when asked: DeepSpeed wants one even on a
    single rank) and returns the SUM all-reduce of tensor lists (None on one rank)."""
    if (info.world_size > 1 or group_on_one_rank) and not dist.is_initialized():
        # What launchers export; DeepSpeed reads them too (a plain `python` run or Slurm variables set none).
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world_size))
        if "MASTER_ADDR" not in os.environ:
            nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
            os.environ["MASTER_ADDR"] = first_host(nodelist) if nodelist else "127.0.0.1"
        if "MASTER_PORT" not in os.environ:
            if "SLURM_JOB_ID" in os.environ:  # every task of the job derives the same port
                os.environ["MASTER_PORT"] = str(10000 + int(os.environ["SLURM_JOB_ID"]) % 50000)
            elif info.world_size > 1:
                raise RuntimeError("MASTER_PORT is not set; start several ranks with deepspeed or torchrun")
            else:
                os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=info.rank,
                                world_size=info.world_size)
    if info.world_size == 1:
        return None

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (picklable objects; a collective), or [obj] on one rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a collective); `obj` itself on one rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_HOST_GROUP = None  # a gloo group for host-side collectives when the default group is NCCL


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any: a collective over CPU tensors (gloo), so it never waits for the
    device; `flag` itself on one rank."""
    global _HOST_GROUP
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    if _HOST_GROUP is None:  # created on first use: every rank gets here at the same point
        _HOST_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    box = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return bool(box[0])


def teardown() -> None:
    global _HOST_GROUP
    _HOST_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


__all__ = ["AllReduce", "RankInfo", "any_rank", "barrier", "broadcast_object", "gather_objects", "device_for", "first_host", "rank_info", "setup", "teardown"]
