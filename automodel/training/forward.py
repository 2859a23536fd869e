"""The model's forward as a step runs it: a batch's keyword arguments, and the loss from the outputs."""

import contextlib
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from automodel.data.packing import block_causal_mask
from automodel.loss import target_index, token_cross_entropy
from automodel.models.head import OutputHead, probe_input_ids

Batch = dict[str, torch.Tensor]
RunModel = Callable[[dict], Any]  # forward keyword arguments -> the model's output
# Batch keys that are not forward arguments (a processor's image extras are).
NOT_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids", "target_index")


def to_device(batch: Batch, device: torch.device) -> Batch:
    """A collated (host) batch on the device, with the flat positions the loss trains on (`target_index`) worked out
    on the host first, so the chunked loss never has to ask the device how many there are (a sync)."""
    batch = {**batch, "target_index": target_index(batch["labels"])}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: Batch, attn_implementation: str, dtype: torch.dtype) -> dict:
    """The forward's keyword arguments for a batch, packed or not. Packed: flash-attention's varlen path
    reads sample boundaries from position_ids; other kernels get the block-diagonal causal mask."""
    # What a processor adds for images (pixel_values, image_sizes, ...) goes to the forward as it is.
    extras = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False,
                **extras}
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False, **extras}
    if attn_implementation != "flash_attention_2":
        inputs["attention_mask"] = block_causal_mask(batch["position_ids"], dtype)
    return inputs


class ModelLoss:
    """(run, batch) -> (summed next-token cross-entropy, label tokens), where `run(inputs)` calls the model (the
    functional backend: the module with the state's tensors bound; DeepSpeed: the engine).

    With `chunk_tokens` > 0 the loss comes from the final hidden states and the output head, `chunk_tokens`
    trained positions at a time (models/head.py), once `calibrate` has checked that path against the model's own
    logits; otherwise, and for a head that fails the check, from whole logits.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int, dtype: torch.dtype):
        self.model = model
        self.attn = getattr(model.config, "_attn_implementation", "sdpa")
        self.dtype = dtype
        self.chunk_tokens = chunk_tokens
        self.head = OutputHead(model) if chunk_tokens > 0 else None
        self.description = "whole logits (train.loss_chunk_tokens = 0)"

    def calibrate(self, run: RunModel, device: torch.device,
                  weights: Callable[[], ContextManager] = contextlib.nullcontext) -> str:
        """Runs a short probe through both paths (every rank alike: under ZeRO-3 the forward is collective) and
        keeps the chunked one only if it reproduces the model's logits. `weights()` is held open around the probe
        (the functional backend binds the state's tensors). Returns a line for the log."""
        if self.head is None:
            return self.description
        ids = probe_input_ids(self.model.config).to(device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), weights():
                full = run(inputs).logits
                with self.head.capture() as seen:
                    run(inputs)
                fits = len(seen) == 1 and self.head.calibrate(full, seen[0])
            reason = "its output does not match the model's logits"
        except Exception as e:  # a forward that calls its head in another way
            fits, reason = False, f"{type(e).__name__}: {e}"
        finally:
            self.model.train(was_training)
        if not fits:
            self.head = None
            self.description = (f"whole logits: the output head of {type(self.model).__name__} could not be split "
                                f"off ({reason})")
            return self.description
        transform = "" if self.head.transform_name == "none" else f", then {self.head.transform_name}"
        self.description = f"chunks of {self.chunk_tokens} tokens from the hidden states (output head{transform})"
        return self.description

    def __call__(self, run: RunModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = model_inputs(batch, self.attn, self.dtype)
        if self.head is None:
            return token_cross_entropy(run(inputs).logits, batch["labels"])
        with self.head.capture() as seen:
            run(inputs)
        return self.head.loss(seen[-1], batch["labels"], self.chunk_tokens, batch.get("target_index"))
