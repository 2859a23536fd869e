"""The DeepSpeed backend: ZeRO 0-3 (with CPU offload) behind the same step interface and loss function.

DeepSpeed divides each backward by the accumulation count A and averages gradients over the R ranks,
so micro-batch m is fed `l_m * A * R / N` (N = label tokens of the global batch): the update is then the
gradient of sum_m l_m / N, exactly as in the functional backend (tests pin the two together).
"""

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import attrs
import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from automodel.backends import universal
from automodel.backends.base import Backend
from automodel.backends.functional import functional_optimizer
from automodel.config import TrainingConfig
from automodel.distributed import AllReduce
from automodel.models import numel
from automodel.models.export import save_hf_model
from automodel.optim import AdamWHyper, no_decay_names
from automodel.optim.as_torch import TorchOptimizer
from automodel.training.teacher import Teacher
from automodel.training.forward import Batch, ModelLoss, Objective
from automodel.training.state import TrainState, initial_rng, rng_scope
from automodel.training.preference import add_stats
from automodel.training.offload import Offloaded
from automodel.training.step import StepMetrics, reduce_stats

ENGINE_TAG = "engine"


@contextlib.contextmanager
def zero3_init(ds_config: dict) -> Iterator[None]:
    """While inside, transformers builds models partitioned across ranks (a collective on every rank)."""
    # DeepSpeed's config reads the world size from its own comm layer: attach it to our process group first,
    # or it plans for one rank and rejects the batch sizes.
    deepspeed.init_distributed()
    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep_alive
        unset_hf_deepspeed_config()  # later model builds (e.g. for export checks) must not be collectives


def release_shm_buffer(rank: int) -> None:
    """Unlinks this rank's /dev/shm segment of DeepSpeed's CPU shared-memory all-reduce.

    On CPU, with every rank on one host (the deepspeed launcher sets LOCAL_SIZE), DeepSpeed's comm layer
    creates a 66 MiB segment per rank, maps its peers' by name, and never unlinks them: each run would leave
    132 MiB (2 ranks) of RAM in /dev/shm until reboot. Once the barrier shows that every rank has mapped its
    peers, the names are no longer needed: unlinked, the memory goes when the processes exit, crashed or not.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    if dist.is_initialized():
        dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / name)


def _is_matrix(p: torch.Tensor) -> bool:
    return len(getattr(p, "ds_shape", p.shape)) >= 2  # ZeRO-3 flattens partitions; ds_shape is the real one


def build_deepspeed(model: nn.Module, *, ds_config: dict, optim, lr_fn: Callable[[int], float],
                    device: torch.device, all_reduce: AllReduce, rank: int, world_size: int, seed: int,
                    loss_chunk_tokens: int, teacher: Optional[Teacher] = None,
                    objective: Optional[Objective] = None, offload_activations: bool = False,
                    fused_loss: bool = TrainingConfig().fused_loss) -> Backend:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in trainable if _is_matrix(p)], "weight_decay": optim.weight_decay},
              {"params": [p for _, p in trainable if not _is_matrix(p)], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if "optimizer" in ds_config:  # optimizer offload: DeepSpeed's CPU AdamW, built from the JSON
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    else:
        client = client_optimizer(model, trainable, groups, optim, device)
        engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=ds_config)
    release_shm_buffer(rank)
    stage = ds_config["zero_optimization"]["stage"]
    trainable_params = sum(numel(p) for _, p in trainable)
    dtype = (torch.bfloat16 if ds_config["bf16"]["enabled"] else
             torch.float16 if ds_config["fp16"]["enabled"] else torch.float32)  # the engine's compute dtype
    loss = (objective(engine.module, loss_chunk_tokens, dtype, stage == 3) if objective is not None
            else ModelLoss(engine.module, loss_chunk_tokens, dtype, teacher=teacher, partitioned=stage == 3,
                           fused=fused_loss))

    def run(inputs: dict):
        return engine(**inputs)  # through the engine: its hooks gather ZeRO-3 weights

    loss.calibrate(run, device)
    saving = (lambda: Offloaded(engine.module, device)) if offload_activations else contextlib.nullcontext

    def step(state: TrainState, micro_batches: list[Batch]) -> tuple[TrainState, StepMetrics]:
        # The engine divides each backward by its accumulation count: the scale below relies on the two agreeing.
        if len(micro_batches) != engine.gradient_accumulation_steps():
            raise ValueError(f"{len(micro_batches)} micro-batches for an engine built for "
                             f"{engine.gradient_accumulation_steps()} accumulation steps")
        lr = lr_fn(state.step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=device)
        grad_norm = None
        stats: dict = {}
        with rng_scope(state.rng, device) as rng_out:
            totals = loss.prepare(lambda: contextlib.nullcontext(run), micro_batches, all_reduce)
            n = totals["n"]
            scale = len(micro_batches) * world_size / n
            for i, batch in enumerate(micro_batches):
                with saving():
                    loss_sum, more = loss.terms(run, batch, totals)  # the same loss as the functional backend
                stats = add_stats(stats, more)
                engine.backward(loss_sum * scale)
                if stage == 0 and i == len(micro_batches) - 1:
                    # Stage 0 reports no norm; the last backward has all-reduced the gradients, so read them.
                    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                engine.step()
                total = total + loss_sum.detach()
        if grad_norm is None:
            # A tensor until the loop logs it (a float where DeepSpeed keeps one): no sync here.
            grad_norm = torch.as_tensor(engine.get_global_grad_norm(), device=device)
        samples = world_size * sum(loss.samples(b) for b in micro_batches)
        new_state = attrs.evolve(state, step=state.step + 1, rng=rng_out[0],
                                 data_position=state.data_position + samples)
        if all_reduce is not None:
            all_reduce([total])
        return new_state, StepMetrics(loss=total / n, grad_norm=grad_norm, lr=lr, label_tokens=n,
                                      extras=reduce_stats(stats, all_reduce))

    @contextlib.contextmanager
    def model_for_generation(state: TrainState) -> Iterator[nn.Module]:
        yield engine.module

    has_frozen = any(not p.requires_grad for p in model.parameters())
    log = print if rank == 0 else (lambda _: None)

    def save(state: TrainState, tmp: Path) -> None:
        # Frozen weights (a LoRA base) never change: leave them out of every checkpoint.
        engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, client_state={}, save_latest=False,
                               exclude_frozen_parameters=has_frozen)

    def load(state: TrainState, path: Path) -> TrainState:
        written_by = universal.saved_ranks(path / ENGINE_TAG)
        if stage == 0 or written_by in (0, world_size):
            loaded, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=False, load_module_strict=not has_frozen)
        else:  # ZeRO 1-3 shards cut for another number of ranks
            folder = universal.convert(path, ENGINE_TAG, rank, log)
            engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
            try:
                loaded, _ = engine.load_checkpoint(str(folder), tag=ENGINE_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
            finally:
                engine._config.load_universal_checkpoint = False
            if stage == 3:
                _repair_zero3_universal_load(engine, groups)
            universal.remove(path, rank)
            log(f"checkpoint: {path} was written by {written_by} rank(s); its ZeRO-{stage} shards were joined into "
                f"DeepSpeed's universal checkpoint and cut again for {world_size}")
        if loaded is None:
            raise ValueError(f"{path}: DeepSpeed found no engine state under {path / ENGINE_TAG}")
        return state

    # A PEFT model saves its adapter alone; a model with frozen parts (a VLM's vision tower) saves everything.
    is_adapter = hasattr(engine.module, "peft_config")

    def export(state: TrainState, tokenizer: Any, out: Path) -> None:
        full = None
        if stage == 3 and is_adapter:
            # An adapter: gather only the trainable tensors (small), never the frozen base.
            with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
                full = {n: p.detach().clone() for n, p in trainable} if rank == 0 else None
        elif stage == 3:
            # A whole model: gathered one tensor at a time onto rank 0 only (every rank must call it).
            full = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            save_hf_model(engine.module, tokenizer, out, state_dict=full)

    state = TrainState(step=0, params={}, opt_state=None, rng=initial_rng(seed, rank, device), data_position=0)
    return Backend(name=f"deepspeed (ZeRO-{stage})", state=state, step=step,
                   loss_sum=lambda state, batch: loss(run, batch, distill=False),
                   model_for_generation=model_for_generation, save=save, load=load, export=export,
                   trainable_params=trainable_params, loss_description=loss.description,
                   tensor_table=lambda state: {n: [list(getattr(p, "ds_shape", p.shape)),
                                                   str(p.dtype).removeprefix("torch.")] for n, p in sorted(trainable)},
                   generate_kwargs={"synced_gpus": stage == 3 and world_size > 1})


def _repair_zero3_universal_load(engine: Any, groups: list[dict]) -> None:
    """Two things DeepSpeed 0.19's ZeRO-3 universal load gets wrong for an optimizer of several parameter groups (ours:
    decayed and not decayed): it gives every group the first group's hyperparameters (weight decay included), and one
    `step` tensor to every group's state, which torch's AdamW then increments once per group and step."""
    for group, ours in zip(engine.optimizer.optimizer.param_groups, groups):
        group["weight_decay"] = ours["weight_decay"]
    for state in engine.optimizer.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def client_optimizer(model: nn.Module, trainable: list[tuple[str, nn.Parameter]], groups: list[dict], optim: Any,
                     device: torch.device) -> torch.optim.Optimizer:
    """The optimizer the engine steps: torch's AdamW, the arithmetic the functional backend reproduces (fused on
    CUDA, foreach elsewhere), or bitsandbytes' 8-bit AdamW (the kernel optim/adamw8bit.py calls), paged if asked.
    Muon, Adafactor and SOAP need each weight whole: the validator allows them at ZeRO-0 in float32 only, where the
    engine steps the model's own parameters, and they are the functional backend's own (optim/as_torch.py)."""
    if optim.name in ("muon", "adafactor", "soap"):
        names = [n for n, _ in trainable]
        hyper = AdamWHyper(betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                           no_decay=no_decay_names(dict(trainable)))
        return TorchOptimizer(dict(trainable), functional_optimizer(optim, model, names), hyper, optim.lr)
    if optim.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                   is_paged=optim.paged and device.type == "cuda")
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, foreach=not fused, fused=fused)


def teacher_engine(model: nn.Module, ds_config: dict) -> tuple[Callable[[dict], Any], Callable]:
    """A frozen teacher partitioned under ZeRO-3 like the student: an engine without optimizer (its hooks gather the
    weights for each forward), and a function that gathers its output head's weight and bias once (a collective on
    every rank) and returns a copy, which the loss chunks use through forward and backward."""
    config = {k: v for k, v in ds_config.items() if k != "optimizer"}
    dtype = next(model.parameters()).dtype  # the teacher runs in its own dtype, whatever the student's
    config["bf16"] = {"enabled": dtype == torch.bfloat16}
    config["fp16"] = {**config["fp16"], "enabled": dtype == torch.float16}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    head = engine.module.get_output_embeddings()
    params = [p for p in (head.weight, head.bias) if p is not None]

    def head_weights() -> tuple[torch.Tensor, Any]:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            weight = head.weight.detach().clone()
            bias = None if head.bias is None else head.bias.detach().clone()
        return weight, bias

    return (lambda inputs: engine(**inputs)), head_weights
