"""The model's forward as a step runs it: a batch's keyword arguments, and the loss from the outputs."""

import contextlib
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

from automodel.data.packing import block_causal_mask, flex_block_mask, varlen_boundaries
from automodel.loss import (chunked_cross_entropy, chunked_distill, count_label_tokens, distill_sum,
                            next_token_targets, target_index, token_cross_entropy)
from automodel.loss.fused import cross_entropy_sum, fused_linear_loss, linear_head
from automodel.models.head import OutputHead, probe_input_ids
from automodel.models.masks import rows_not_packed
from automodel.training.teacher import RunModel, Teacher

Batch = dict[str, torch.Tensor]
# (module, loss_chunk_tokens, compute dtype, partitioned under ZeRO-3) -> the loss a step runs: ModelLoss's interface
# (prepare, terms, samples, calibrate, __call__ for evaluation); training/preference.py's PreferenceLoss is one.
Objective = Callable[[nn.Module, int, torch.dtype, bool], Any]
# Batch keys that are not forward arguments (a processor's image extras are).
NOT_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids", "target_index", "cu_seq_lens", "max_length",
              "padding")
FLASH = ("flash_attention_2", "flash_attention_3")


def host_ready(batch: Batch, pin: bool = False) -> Batch:
    """A collated batch with what the device would otherwise be asked for (a sync each) worked out on the host: the
    flat positions the loss trains on (`target_index`), for packed rows flash-attention's sample boundaries, and for
    unpacked rows where their padding lies (`padding`, see model_inputs); with `pin`, in pinned memory (CUDA copies
    from it run asynchronously)."""
    batch = {**batch, "target_index": target_index(batch["labels"])}
    if "position_ids" in batch:
        batch["cu_seq_lens"], batch["max_length"] = varlen_boundaries(batch["position_ids"])
    # Each unpacked set of rows (KTO's mismatched rows come under "kl_" keys beside the batch's own).
    for key in [k for k in batch if k.endswith("attention_mask")]:
        prefix = key[:-len("attention_mask")]
        if f"{prefix}position_ids" not in batch:
            batch[f"{prefix}padding"] = padding_kind(batch[key])
    if pin:
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def padding_kind(attention_mask: torch.Tensor) -> str:
    """"none" (every position real), "trailing" (each row's padding after its tokens: right padding) or "other",
    read from a host mask with numpy (no tensor op, so nothing a device would be asked)."""
    if attention_mask.device.type != "cpu":  # not a host batch: reading it would be the sync this avoids
        return "other"
    mask = attention_mask.numpy()
    if mask.ndim != 2 or not ((mask == 0) | (mask == 1)).all():  # not a (rows, positions) padding mask
        return "other"
    if mask.all():
        return "none"
    return "trailing" if (mask[:, 1:] <= mask[:, :-1]).all() else "other"


def to_device(batch: Batch, device: torch.device) -> Batch:
    """A host batch (host_ready, or it is made so here) on the device."""
    if "target_index" not in batch:
        batch = host_ready(batch)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_inputs(batch: Batch, attn_implementation: str, dtype: torch.dtype) -> dict:
    """The forward's keyword arguments for a batch, packed or not.

    Unpacked rows go without their attention mask where the host knows it changes nothing the loss reads: rows with
    no padding, and rows padded only after their tokens (causal attention never lets a real token see a later
    position, so only the untrained padding positions differ). transformers' sdpa mask code would otherwise read
    the mask on the host (a device sync, twice a forward) to see whether it may use `is_causal`; without a mask it
    does, and SDPA can pick its flash kernels. flash-attention keeps a padded batch's mask: its varlen path skips the
    padding (transformers finds the lengths with a sync). A batch not made by host_ready keeps its mask.

    Packed: flash-attention's varlen path reads sample boundaries from position_ids; flex_attention gets a BlockMask
    (cross-sample blocks skipped); sdpa and eager a dense (batch, 1, T, T) block-diagonal causal mask (the fallback:
    attention over the whole row, masked)."""
    # What a processor adds for images (pixel_values, image_sizes, ...) goes to the forward as it is.
    extras = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
    if "position_ids" not in batch:
        padding = batch.get("padding", "other")
        masked = padding == "other" or (padding == "trailing" and attn_implementation in FLASH)
        return {"input_ids": batch["input_ids"], **({"attention_mask": batch["attention_mask"]} if masked else {}),
                "use_cache": False, **extras}
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False, **extras}
    if attn_implementation in FLASH:
        if "cu_seq_lens" in batch:
            cu_seq_lens, longest = batch["cu_seq_lens"], batch["max_length"]
        else:
            cu_seq_lens, longest = varlen_boundaries(batch["position_ids"])
        cu_seq_lens = cu_seq_lens.to(batch["input_ids"].device)
        inputs.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest)
    elif attn_implementation == "flex_attention":
        inputs["attention_mask"] = flex_block_mask(batch["position_ids"])
    else:
        inputs["attention_mask"] = block_causal_mask(batch["position_ids"], dtype)
    return inputs


class ModelLoss:
    """(run, batch) -> (summed loss, label tokens), where `run(inputs)` calls the model (the functional backend: the
    module with the state's tensors bound; DeepSpeed: the engine). The loss is the next-token cross-entropy, or with
    a `teacher` the distillation loss (loss/distill.py), over the trained positions.

    With `chunk_tokens` > 0 the loss comes from the final hidden states and the output head, `chunk_tokens`
    trained positions at a time (models/head.py), once `calibrate` has checked that path against the model's own
    logits (and the teacher's); otherwise, and for a head that fails the check, from whole logits.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int, dtype: torch.dtype, teacher: Optional[Teacher] = None,
                 partitioned: bool = False, fused: bool = False):
        """partitioned: the weights are ZeRO-3 partitions, gathered by hooks on each module call. fused: the chunks'
        gradients are computed in the forward (loss/fused.py) where the head is a Linear or a LoRA Linear."""
        self.fused = fused
        self.model = model
        self.partitioned = partitioned
        self.attn = getattr(model.config, "_attn_implementation", "sdpa")
        self.dtype = dtype
        self.chunk_tokens = chunk_tokens
        self.teacher = teacher
        self.head = OutputHead(model) if chunk_tokens > 0 else None
        self.teacher_head = OutputHead(teacher.model) if teacher is not None and chunk_tokens > 0 else None
        self.description = "whole logits (train.loss_chunk_tokens = 0)"

    def calibrate(self, run: RunModel, device: torch.device,
                  weights: Callable[[], ContextManager] = contextlib.nullcontext) -> str:
        """Runs a short probe through both paths (every rank alike: under ZeRO-3 the forward is collective) and
        keeps the chunked one only if it reproduces the model's logits, and the teacher's. `weights()` is held open
        around the probe (the functional backend binds the state's tensors). Returns a line for the log."""
        if self.head is None:
            return self.description
        problem = chunked_path_problem(self.head, self.model, run, device, weights, self.partitioned,
                                       self.teacher_head, self.teacher, "teacher")
        if problem is not None:
            self.head = self.teacher_head = None
            self.description = f"whole logits: {problem}"
            return self.description
        names = [h.transform_name for h in (self.head, self.teacher_head) if h is not None and h.transform_name != "none"]
        transform = f", then {' / '.join(names)}" if names else ""
        self.description = f"chunks of {self.chunk_tokens} tokens from the hidden states (output head{transform})"
        if self.fused:
            why_not = (None if linear_head(self.head.module, self.head.transform) is not None
                       else f"the head is a {type(self.head.module).__name__}, not a Linear or a LoRA Linear")
            self.fused = why_not is None
            self.description += (", gradients in the forward (train.fused_loss)" if self.fused else
                                 f", recomputed in the backward (train.fused_loss does not apply {why_not})")
        return self.description

    # The step's interface (training/preference.py's PreferenceLoss has the same three):
    def prepare(self, policy: Callable[[], ContextManager[RunModel]], micro_batches: list[Batch],
                all_reduce=None) -> dict[str, torch.Tensor]:
        """The global batch's normaliser N: its label tokens over micro-batches and ranks."""
        n = torch.stack([count_label_tokens(b["labels"]) for b in micro_batches]).sum()
        if all_reduce is not None:
            all_reduce([n])
        return {"n": n}

    def terms(self, run: RunModel, batch: Batch, totals: dict) -> tuple[torch.Tensor, dict]:
        """(the micro-batch's summed loss, statistics: none)."""
        return self(run, batch)[0], {}

    @staticmethod
    def samples(batch: Batch) -> int:
        return batch["input_ids"].shape[0]

    def __call__(self, run: RunModel, batch: Batch, distill: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """distill=False: the student's cross-entropy alone (what evaluation reports, comparable across runs)."""
        inputs = model_inputs(batch, self.attn, self.dtype)
        with rows_not_packed(inputs):
            return self._loss(run, batch, inputs, self.teacher if distill else None)

    def _loss(self, run: RunModel, batch: Batch, inputs: dict,
              teacher: Optional[Teacher]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.head is None:
            logits = run(inputs).logits
            if teacher is None:
                return token_cross_entropy(logits, batch["labels"])
            with torch.no_grad():
                teacher_logits = teacher.run(model_inputs(batch, self.attn, teacher.dtype)).logits
            index = batch.get("target_index")
            index = (target_index(batch["labels"]) if index is None else index).to(logits.device)
            targets = next_token_targets(batch["labels"]).reshape(-1).index_select(0, index)
            rows = [x.flatten(0, 1).index_select(0, index) for x in (logits, teacher_logits)]
            loss_sum = distill_sum(*rows, targets, teacher.alpha, teacher.temperature)
            return loss_sum, torch.as_tensor(targets.numel(), device=logits.device)
        with self.head.capture() as seen:
            run(inputs)
        index = batch.get("target_index")
        chunk = self.chunk_tokens
        if teacher is None:
            if self.fused:
                return self.head.loss(seen[-1], batch["labels"], index, self._fused(cross_entropy_sum))
            return self.head.loss(seen[-1], batch["labels"], index,
                                  lambda project, h, t: chunked_cross_entropy(h, t, project, chunk))
        with torch.no_grad(), self.teacher_head.capture() as seen_teacher:
            teacher.run(model_inputs(batch, self.attn, teacher.dtype))
        weight, bias = teacher.head_weights()  # once per micro-batch, on every rank
        transform_teacher = self.teacher_head.transform

        def project_teacher(h: torch.Tensor) -> torch.Tensor:
            return transform_teacher(F.linear(h, weight, bias))

        if self.fused:
            def distill_chunk(logits: torch.Tensor, t: torch.Tensor, h_teacher: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    teacher_logits = project_teacher(h_teacher)
                return distill_sum(logits, teacher_logits, t, teacher.alpha, teacher.temperature)

            return self.head.loss(seen[-1], batch["labels"], index, self._fused(distill_chunk), seen_teacher[-1])

        def chunked(project, h, t, h_teacher):
            return chunked_distill(h, t, h_teacher, project, project_teacher, chunk, teacher.alpha,
                                   teacher.temperature)

        return self.head.loss(seen[-1], batch["labels"], index, chunked, seen_teacher[-1])

    def _fused(self, chunk_loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The head's chunked function (OutputHead.loss's `chunked`) with the chunks' gradients in the forward: the
        head's parameters are read as it runs (bound by the functional backend, gathered by ZeRO-3's hooks)."""
        module, transform, chunk = self.head.module, self.head.transform, self.chunk_tokens

        def chunked(project, h, t, *aligned):
            head, params = linear_head(module, transform)
            return fused_linear_loss(h, head, params, t, chunk, chunk_loss, aligned)

        return chunked


def chunked_path_problem(head: OutputHead, model: nn.Module, run: RunModel, device: torch.device,
                         weights: Callable[[], ContextManager], partitioned: bool,
                         frozen_head: Optional[OutputHead] = None, frozen: Any = None,
                         role: str = "teacher") -> Optional[str]:
    """Why the loss cannot come from the hidden states in chunks (None: it can): the model's head must reproduce
    its logits (and, under ZeRO-3, be one module), and a frozen model's (a teacher's, a reference's) likewise and be
    a Linear (its weights are gathered and applied by hand)."""
    problem = calibrate_head(head, model, run, device, weights)
    if problem is None and partitioned and any(True for _ in head.module.children()):
        # Its submodules would gather once per chunk, and ranks with different numbers of chunks would disagree.
        problem = (f"under ZeRO-3 the output head ({type(head.module).__name__}) must be a single module, "
                   "its weights gathered once per micro-batch")
    if problem is None and frozen_head is not None:
        problem = calibrate_head(frozen_head, frozen.model, frozen.run, device, contextlib.nullcontext)
        if problem is None and not isinstance(frozen_head.module, nn.Linear):
            problem = f"the {role}'s head is a {type(frozen_head.module).__name__}, not a Linear"
    return problem


def calibrate_head(head: OutputHead, model: nn.Module, run: RunModel, device: torch.device,
               weights: Callable[[], ContextManager]) -> Optional[str]:
    """None if head(hidden) (with the transform it picks) reproduces the model's logits on a probe, else why not."""
    ids = probe_input_ids(model.config).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), weights():
            full = run(inputs).logits
            with head.capture() as seen:
                run(inputs)
            if len(seen) == 1 and head.calibrate(full, seen[0]):
                return None
        reason = "its output does not match the model's logits"
    except Exception as e:  # a forward that calls its head in another way
        reason = f"{type(e).__name__}: {e}"
    finally:
        model.train(was_training)
    return f"the output head of {type(model).__name__} could not be split off ({reason})"
