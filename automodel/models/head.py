"""The output head of a causal LM, so that the loss can be computed from the final hidden states in chunks.

The model's own forward runs with its head swapped for a stub that records the hidden states it is given and
returns empty logits (so whatever the forward does around its head, it does it exactly as it would). The loss then
calls the real head module once, with its forward temporarily replaced by the chunked cross-entropy. One call of
the head module per micro-batch keeps DeepSpeed ZeRO-3 in step: its hooks gather the head's weight once for the
forward and once for the backward (which recomputes the chunks), on every rank alike, however many chunks each
rank's batch needs.

What a model does to the head's output (Gemma's soft-capping, Cohere's and Granite's logit scaling) is read from
its config and checked once against the model's own logits (`calibrate`); a head that still disagrees is left to
the whole-logits path.
"""

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from automodel.loss import next_token_targets, target_index

Transform = Callable[[torch.Tensor], torch.Tensor]


class _Capture(nn.Module):
    """Stands in for the head during the model's forward: records its input, returns (..., 0) logits."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.seen.append(hidden)
        return hidden[..., :0]


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def logit_transforms(config) -> list[tuple[str, Transform]]:
    """What a model may do to head(hidden), most specific first, each written as the models write it (so the
    floating-point result is the same), ending with nothing at all."""
    found: list[tuple[str, Transform]] = []
    configs = [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else [])
    for cfg in configs:
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            found.append((f"final_logit_softcapping = {cap}", lambda x, c=cap: torch.tanh(x / c) * c))
        scale = getattr(cfg, "logit_scale", None)  # Cohere: logits * logit_scale
        if isinstance(scale, (int, float)) and scale != 1:
            found.append((f"logit_scale = {scale}", lambda x, s=scale: x * s))
        scaling = getattr(cfg, "logits_scaling", None)  # Granite: logits / logits_scaling
        if isinstance(scaling, (int, float)) and scaling != 1:
            found.append((f"logits_scaling = {scaling}", lambda x, s=scaling: x / s))
    return found + [("none", _identity)]


def probe_input_ids(config, length: int = 8) -> torch.Tensor:
    """A short text-only input whose ids avoid every special token the config names (image, video ... tokens
    would make a vision-language model expect pixels)."""
    special = set()
    for cfg in [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else []):
        for key, value in vars(cfg).items():
            if "token" in key and isinstance(value, int):
                special.add(value)
            elif "token" in key and isinstance(value, (list, tuple)):
                special.update(v for v in value if isinstance(v, int))
    vocab = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", 256)
    ids = [i for i in range(3, vocab) if i not in special][:length]
    return torch.tensor([ids])


class OutputHead:
    """The module that maps final hidden states to logits, where it hangs in the model, and what the model does
    to its output."""

    def __init__(self, model: nn.Module):
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings")
        qualified = next(name for name, module in model.named_modules() if module is head)
        parent_name, _, self.attr = qualified.rpartition(".")
        self.parent = model.get_submodule(parent_name)
        self.module = head
        self.transform: Transform = _identity
        self.transform_name = "none"
        self.candidates = logit_transforms(model.config)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        """While inside, the model's forward hands its final hidden states to the returned list instead of the head."""
        seen: list[torch.Tensor] = []
        self.parent._modules[self.attr] = _Capture(seen)
        try:
            yield seen
        finally:
            self.parent._modules[self.attr] = self.module

    def calibrate(self, full_logits: torch.Tensor, hidden: torch.Tensor) -> bool:
        """Picks the transform that turns head(hidden) into `full_logits` (the model's logits for the same input);
        False if none does."""
        scale = full_logits.float().abs().max().item() + 1e-12
        fitting = []
        with torch.no_grad():
            projected = self.module(hidden)
            for name, fn in self.candidates:
                out = fn(projected)
                if out.shape == full_logits.shape:
                    error = (out.float() - full_logits.float()).abs().max().item() / scale
                    if error <= 1e-5:
                        fitting.append((error, name, fn))
        if not fitting:
            return False
        _, self.transform_name, self.transform = min(fitting, key=lambda e: e[0])
        return True

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, index: Optional[torch.Tensor],
             chunked: Callable[..., torch.Tensor], *aligned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, label tokens) over the positions whose next-token target is trained (`index`, from
        `target_index`; found here when None, which syncs a GPU). `chunked(project, hidden, targets, *aligned)` sums
        the loss of the selected rows, calling `project` (head + transform) a chunk at a time; it runs as the head
        module's forward, once. `aligned`: more (batch, time, ...) tensors selected like `hidden` (a teacher's)."""
        if index is None:
            index = target_index(labels)
        index = index.to(hidden.device)
        targets = next_token_targets(labels).reshape(-1).index_select(0, index)
        loss_sum = self.apply(hidden, index, targets, chunked, *aligned)
        return loss_sum, torch.as_tensor(targets.numel(), device=hidden.device)

    def apply(self, hidden: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
              chunked: Callable[..., torch.Tensor], *aligned: torch.Tensor) -> torch.Tensor:
        """`chunked(project, rows, targets, *aligned rows)` over the rows of `hidden` (batch, time, dim) at the flat
        positions `index` (on hidden's device), run as the head module's forward, once; what it returns (a sum, or
        one value per row) is returned."""
        selected = [x.flatten(0, 1).index_select(0, index) for x in (hidden, *aligned)]
        head = self.module
        project_raw = head.forward
        transform = self.transform

        def project(h: torch.Tensor) -> torch.Tensor:
            return transform(project_raw(h))

        had_own = "forward" in head.__dict__
        head.forward = lambda h, t, *rest: chunked(project, h, t, *rest)  # one module call: its hooks run once
        try:
            return head(selected[0], targets, *selected[1:])
        finally:
            if had_own:
                head.forward = project_raw
            else:
                del head.forward
