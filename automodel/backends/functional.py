"""The functional backend: the state owns the trainable tensors; the step is training/step.py's; several ranks
all-reduce the gradients and nothing else (every rank holds the whole model and optimizer state)."""

from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from automodel.backends.base import Backend
from automodel.config import DistributedConfig, TrainingConfig
from automodel.distributed import AllReduce
from automodel.models.export import save_hf_model
from automodel.optim import (AdamWHyper, MuonHyper, Optimizer, SoapHyper, hidden_matrices, no_decay_names,
                             optimizer)
from automodel.training.teacher import Teacher
from automodel.training.forward import Batch, ModelLoss, Objective
from automodel.training.state import ParamBinding, TrainState, init_state
from automodel.training.step import make_train_step


def build_functional(model: nn.Module, *, optim, clip_grad_norm: float, lr_fn: Callable[[int], float],
                     device: torch.device, grad_method: str, all_reduce: AllReduce, rank: int, world_size: int,
                     seed: int, loss_chunk_tokens: int, master_dtype: str,
                     teacher: Optional[Teacher] = None, on_nonfinite: str = TrainingConfig().on_nonfinite,
                     bucket_mb: float = DistributedConfig().bucket_mb,
                     objective: Optional[Objective] = None, offload_activations: bool = False,
                     fused_loss: bool = TrainingConfig().fused_loss) -> Backend:
    """The functional step with an in-place optimizer (optim.name: AdamW with float32 or 8-bit states, Muon, Adafactor,
    SOAP); several ranks all-reduce the
    gradient dict, nothing else. With a low-precision model and master_dtype "float32"/"auto" the state holds float32
    masters of its trainable tensors. The loss is the cross-entropy (with a `teacher`, distillation), or what
    `objective` builds."""
    binding = ParamBinding(model)
    params = binding.take()
    compute_dtype = next(iter(model.parameters())).dtype  # the model's dtype: forward and backward run in it
    if master_dtype in ("auto", "float32"):
        params = {k: v.float() for k, v in params.items()}
    hyper = AdamWHyper(betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                       no_decay=no_decay_names(params), fused=optim.fused)
    chunk_tokens = loss_chunk_tokens if grad_method == "autograd" else 0
    loss = (objective(model, chunk_tokens, compute_dtype, False) if objective is not None
            else ModelLoss(model, chunk_tokens, compute_dtype, teacher=teacher, fused=fused_loss))
    loss.calibrate(lambda inputs: model(**inputs), device, weights=lambda: binding.bound(params))
    opt = functional_optimizer(optim, model, list(params))
    step = make_train_step(binding, loss, hyper=hyper, lr_fn=lr_fn, clip_grad_norm=clip_grad_norm, device=device,
                           grad_method=grad_method, all_reduce=all_reduce, world_size=world_size,
                           on_nonfinite=on_nonfinite, bucket_mb=bucket_mb, opt=opt,
                           offload_activations=offload_activations)

    def loss_sum(state: TrainState, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with binding.bound(state.params) as bound:
            return loss(lambda inputs: bound(**inputs), batch, distill=False)

    # The optimizer state's tables of tensors (AdamW: exp_avg, exp_avg_sq; 8-bit AdamW also the block scales), each
    # saved as <table>.safetensors beside params.safetensors.
    tables = [k for k, v in attrs.asdict(opt.init({}), recurse=False).items() if isinstance(v, dict)]

    def save(state: TrainState, tmp: Path) -> None:
        if rank == 0:  # every rank holds the same weights and moments
            save_file(_contiguous(state.params), tmp / "params.safetensors")
            for table in tables:
                save_file(_contiguous(getattr(state.opt_state, table)), tmp / f"{table}.safetensors")

    def load(state: TrainState, path: Path) -> TrainState:
        dev = str(device)
        missing = [t for t in tables if not (path / f"{t}.safetensors").is_file()]
        if missing:
            raise ValueError(f"{path}: no {missing[0]}.safetensors; it was written by another optimizer than "
                             f"optim.name = \"{opt.name}\"")
        loaded = {name: load_file(path / f"{name}.safetensors", device=dev) for name in ("params", *tables)}
        if set(loaded["params"]) != set(state.params):
            missing = sorted(set(state.params) ^ set(loaded["params"]))[:5]
            raise ValueError(f"{path}: its parameters do not match this model's (differ: {missing})")
        wrong = [f"{k} {tuple(loaded['params'][k].shape)} vs {tuple(v.shape)}" for k, v in state.params.items()
                 if loaded["params"][k].shape != v.shape]
        if wrong:
            raise ValueError(f"{path}: its tensor shapes do not match this model's ({', '.join(wrong[:3])})")
        params = {k: loaded["params"][k].to(state.params[k].dtype) for k in state.params}
        wrong = [f"{t}.{k} {loaded[t][k].dtype}" for t in tables for k, v in getattr(state.opt_state, t).items()
                 if k not in loaded[t] or loaded[t][k].dtype != v.dtype]
        if wrong:
            raise ValueError(f"{path}: its optimizer state does not match optim.name = \"{opt.name}\" ({wrong[0]})")
        opt_state = attrs.evolve(state.opt_state, count=state.step, **{t: loaded[t] for t in tables})
        return attrs.evolve(state, params=params, opt_state=opt_state)

    def export(state: TrainState, tokenizer: Any, out: Path) -> None:
        if rank == 0:
            with binding.bound(state.params) as bound:
                save_hf_model(bound, tokenizer, out)

    return Backend(
        name="functional", state=init_state(params, device, seed, rank, opt.init), step=step, loss_sum=loss_sum,
        model_for_generation=lambda state: binding.bound(state.params),
        save=save, load=load, export=export, trainable_params=sum(p.numel() for p in params.values()),
        tensor_table=lambda state: {k: [list(v.shape), str(v.dtype).removeprefix("torch.")]
                                    for k, v in sorted(state.params.items())},
        loss_description=loss.description,
    )


def functional_optimizer(optim: Any, model: nn.Module, names: list[str]) -> Optimizer:
    """optim's optimizer over the trainable tensors `names` of `model` (Muon needs to know its hidden matrices)."""
    muon = None
    if optim.name == "muon":
        muon = MuonHyper(matrices=hidden_matrices(model, names), lr=optim.muon_lr, peak_lr=optim.lr,
                         momentum=optim.muon_momentum, adjust_lr=optim.muon_adjust_lr)
    soap = SoapHyper(precondition_frequency=optim.soap_precondition_frequency,
                     max_precondition_dim=optim.soap_max_precondition_dim)
    return optimizer(optim.name, optim.paged, muon=muon, soap=soap)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in tensors.items()}
