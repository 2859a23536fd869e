"""The bucketed all-reduce on 2 processes (gloo): launched from the backward, the same update as one flat all-reduce."""

import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import random_batch, split_batch, tiny_llama

pytestmark = pytest.mark.slow  # starts processes


def _worker(rank: int, store: str, out: str) -> None:
    from automodel.backends import build_functional
    from automodel.config.schema import OptimConfig
    from automodel.distributed import RankInfo, setup

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    all_reduce = setup(RankInfo(rank, rank, 2), torch.device("cpu"))
    launches: list[bool] = []  # per all_reduce call: was the backward still running?
    plain_all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        launches.append(torch._C._current_autograd_node() is not None)
        return plain_all_reduce(tensor, *args, **kwargs)

    def run(bucket_mb: float) -> tuple[list[float], dict[str, torch.Tensor]]:
        model = tiny_llama(vocab_size=96, seed=0)  # 2 layers: ~40k parameters, ~30 buckets of 4 KB
        backend = build_functional(model, optim=OptimConfig(lr=3e-3, weight_decay=0.1), clip_grad_norm=0.5,
                                   lr_fn=lambda s: 3e-3, device=torch.device("cpu"), grad_method="autograd",
                                   all_reduce=all_reduce, rank=rank, world_size=2, seed=0, loss_chunk_tokens=16,
                                   master_dtype="auto", bucket_mb=bucket_mb)
        state, losses = backend.state, []
        for step in range(3):  # each rank its own half of the global batch, 2 micro-batches of 2
            state, metrics = backend.step(state, split_batch(random_batch(4, 24, 96, seed=10 * step + rank), 2))
            losses.append(metrics.loss.item())
        return losses, {k: v.clone() for k, v in state.params.items()}

    flat = run(bucket_mb=0)
    dist.all_reduce = recording_all_reduce
    bucketed = run(bucket_mb=4 / 1024)
    dist.all_reduce = plain_all_reduce
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump({"flat": flat, "bucketed": bucketed, "launches": launches}, f)
    dist.destroy_process_group()


def test_buckets_launch_during_the_backward_and_update_exactly_like_one_flat_all_reduce(tmp_path):
    out = tmp_path / "result.pkl"
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    result = pickle.loads(out.read_bytes())
    (flat_losses, flat_params), (losses, params) = result["flat"], result["bucketed"]
    assert losses == flat_losses  # bit for bit: the same float32 sums, only sent earlier
    for name, value in flat_params.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=0, msg=name)
    launches = result["launches"]
    per_step = len(launches) // 3
    step = launches[:per_step]
    # A step: the label count's all-reduce (before any forward), then the buckets, then the loss's (after). Every
    # bucket leaves while the backward is still running, the first (the head's and last layer's gradients) long
    # before its end: the embedding's gradient, in the last bucket, is among the last the backward produces.
    count, buckets, loss = step[0], step[1:-1], step[-1]
    assert len(buckets) > 10 and all(buckets) and not count and not loss
