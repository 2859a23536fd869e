"""What a recipe needs from a backend, as one record of functions; `functional` and `deepspeed` build it."""

from pathlib import Path
from typing import Any, Callable, ContextManager

import attrs
import torch
from torch import nn

from automodel.training.forward import Batch
from automodel.training.state import TrainState
from automodel.training.step import StepMetrics


@attrs.frozen
class Backend:
    name: str
    state: TrainState  # the initial state
    step: Callable[[TrainState, list[Batch]], tuple[TrainState, StepMetrics]]
    # (summed cross-entropy, label tokens), for evaluation: a distillation run's student alone
    loss_sum: Callable[[TrainState, Batch], tuple[torch.Tensor, torch.Tensor]]
    model_for_generation: Callable[[TrainState], ContextManager[nn.Module]]
    save: Callable[[TrainState, Path], None]  # every rank, into a staging directory
    load: Callable[[TrainState, Path], TrainState]  # every rank; returns the restored state
    export: Callable[[TrainState, Any, Path], None]  # every rank (may be collective); saves the tokenizer/processor too
    trainable_params: int
    # The trainable tensors' names -> [shape, dtype], as a checkpoint's manifest records them
    tensor_table: Callable[[TrainState], dict[str, list]]
    loss_description: str  # how the loss is computed (chunks of hidden states or whole logits), for the log
    generate_kwargs: dict = attrs.field(factory=dict)  # e.g. synced_gpus under ZeRO-3
