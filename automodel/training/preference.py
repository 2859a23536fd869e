"""The preference loss as a step runs it: per-sequence log-probs of the policy and the reference, then
loss/preference.py's maths, normalised over the global batch.

A batch (data/preference.py's collate) holds 2k rows: pairs [chosen 1..k, rejected 1..k], or KTO's completions with
their mismatched rows under `kl_`. Host-side index tensors name the positions whose next-token log-probs are needed;
those come through the output head in chunks (as the SFT loss does: no tokens x vocab logits), or from whole logits
when the head cannot be split off.

Normalisation is exact: `prepare` counts the global batch's samples N (pairs or KTO examples) and NLL tokens T over
micro-batches and ranks before any backward, and each micro-batch contributes
    sum of its per-sample losses + w x (its NLL sum) x N / T,
so that the step's objective, divided by N, is the mean per-sample loss plus w x the token-mean NLL of the whole
global batch. KTO's reference point z0 is estimated over the whole global batch in `prepare` too (a no-grad pass of
the mismatched rows), so 2 x 4 equals 1 x 8 and 2 ranks equal 1 for every loss.

Statistics are (sum, count) pairs, summed over micro-batches and ranks and divided at the end (`finish_stats`).
"""

import contextlib
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from automodel.config import PreferenceConfig
from automodel.loss import chunked_token_logps
from automodel.loss.preference import kto_losses, pair_losses
from automodel.models.head import OutputHead
from automodel.models.masks import rows_not_packed
from automodel.training.teacher import FrozenModel, RunModel
from automodel.training.forward import Batch, chunked_path_problem, model_inputs

Stats = dict[str, torch.Tensor]  # name -> tensor([sum, count])


def finish_stats(stats: Stats) -> dict[str, torch.Tensor]:
    """name -> sum / count (0-d tensors, no sync); rewards/margins = mean chosen reward - mean rejected reward."""
    out = {k: v[0] / v[1].clamp(min=1) for k, v in stats.items()}
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def add_stats(total: Stats, more: Stats) -> Stats:
    return {k: total[k] + v if k in total else v for k, v in more.items()}


def nll_tokens(pref: PreferenceConfig) -> str:
    """Which tokens the NLL term covers: "all" chosen tokens (ORPO, as TRL's ORPOTrainer: prompt and completion),
    the chosen "completion"s (sft_weight > 0), or "none"."""
    return "all" if pref.loss == "orpo" else "completion" if pref.sft_weight > 0 else "none"


def sub_batch(batch: Batch, prefix: str) -> Batch:
    """The keys of `batch` that start with `prefix`, without it (KTO's mismatched rows: "kl_")."""
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def _logps_of_logits(logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) at the flat positions `index` of whole (batch, time, vocab) logits, float32."""
    return -F.cross_entropy(logits.flatten(0, 1).index_select(0, index).float(), targets, reduction="none")


class PreferenceLoss:
    """(run, batch) -> the preference loss of [preference] (the step's interface: prepare, terms, samples).

    The reference log-probs come from, in this order: the batch (`ref_logps`, precomputed), a frozen model of its own
    (`reference`), or the policy itself with its LoRA adapter switched off (`reference` None and a peft model).
    """

    def __init__(self, model: nn.Module, pref: PreferenceConfig, chunk_tokens: int, dtype: torch.dtype,
                 reference: Optional[FrozenModel] = None, partitioned: bool = False):
        self.model = model
        self.pref = pref
        self.dtype = dtype
        self.attn = getattr(model.config, "_attn_implementation", "sdpa")
        self.chunk_tokens = chunk_tokens
        self.partitioned = partitioned
        self.paired = pref.loss != "kto"
        self.uses_reference = pref.loss not in ("simpo", "orpo")
        self.reference = reference
        self.head = OutputHead(model) if chunk_tokens > 0 else None
        self.reference_head = OutputHead(reference.model) if reference is not None and chunk_tokens > 0 else None
        self.nll_weight = 1.0 if pref.loss == "orpo" else pref.sft_weight
        self.description = "whole logits (train.loss_chunk_tokens = 0)"

    @property
    def nll(self) -> str:
        return nll_tokens(self.pref)

    def calibrate(self, run: RunModel, device: torch.device,
                  weights: Callable[[], ContextManager] = contextlib.nullcontext) -> str:
        """As ModelLoss.calibrate: keep the chunked path only where it reproduces the logits (policy and reference)."""
        if self.head is None:
            return self.description
        problem = chunked_path_problem(self.head, self.model, run, device, weights, self.partitioned,
                                       self.reference_head, self.reference, "reference")
        if problem is not None:
            self.head = self.reference_head = None
            self.description = f"whole logits: {problem}"
            return self.description
        self.description = (f"per-sequence log-probs from chunks of {self.chunk_tokens} tokens of the hidden states "
                            f"(output head{'' if self.head.transform_name == 'none' else ', ' + self.head.transform_name})")
        return self.description

    # -- log-probs ---------------------------------------------------------------------------------

    @staticmethod
    def samples(batch: Batch) -> int:
        """Pairs (or KTO examples) in a batch: what data_position counts."""
        return batch["input_ids"].shape[0] // (2 if "kl_input_ids" not in batch else 1)

    def _forward(self, run: RunModel, batch: Batch, dtype: torch.dtype):
        """run(the batch's forward arguments): the host's `padding` travels with the mask (model_inputs leaves out
        what changes nothing), and transformers is told the rows are not packed (models/masks.py)."""
        inputs = model_inputs({k: batch[k] for k in ("input_ids", "attention_mask", "padding") if k in batch},
                              self.attn, dtype)
        with rows_not_packed(inputs):
            return run(inputs)

    @staticmethod
    def _targets(batch: Batch) -> torch.Tensor:
        """The next token at each position of logp_index (never a row's last position, so always in its row)."""
        return batch["input_ids"].reshape(-1).index_select(0, batch["logp_index"] + 1)

    def token_logps(self, run: RunModel, batch: Batch) -> torch.Tensor:
        """The policy's log p(next token) at logp_index, float32 (with gradients when enabled)."""
        index, targets = batch["logp_index"], self._targets(batch)
        if self.head is None:
            return _logps_of_logits(self._forward(run, batch, self.dtype).logits, index, targets)
        with self.head.capture() as seen:
            self._forward(run, batch, self.dtype)
        chunk = self.chunk_tokens
        return self.head.apply(seen[-1], index, targets, lambda project, h, t: chunked_token_logps(h, t, project, chunk))

    @torch.no_grad()
    def reference_token_logps(self, run: RunModel, batch: Batch) -> torch.Tensor:
        """The reference's log p(next token) at logp_index: its own model, or the policy with the adapter off."""
        ref = self.reference
        if ref is None:
            with self.model.disable_adapter():  # peft: the base model, no second copy of the weights
                return self.token_logps(run, batch)
        index, targets = batch["logp_index"], self._targets(batch)
        if self.reference_head is None:
            return _logps_of_logits(self._forward(ref.run, batch, ref.dtype).logits, index, targets)
        with self.reference_head.capture() as seen:
            self._forward(ref.run, batch, ref.dtype)
        weight, bias = ref.head_weights()  # once per micro-batch, on every rank (a gather under ZeRO-3)
        transform = self.reference_head.transform
        rows = seen[-1].flatten(0, 1).index_select(0, index)
        return chunked_token_logps(rows, targets, lambda h: transform(F.linear(h, weight, bias)), self.chunk_tokens)

    @staticmethod
    def sequence_logps(token_logps: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed completion log-prob per row, completion tokens per row)."""
        rows = batch["input_ids"].shape[0]
        completion = batch["logp_completion"]
        zeros = torch.zeros(rows, dtype=torch.float32, device=token_logps.device)
        sums = zeros.index_add(0, batch["logp_row"], torch.where(completion, token_logps, 0.0))
        lengths = zeros.index_add(0, batch["logp_row"], completion.float())
        return sums, lengths

    def reference_logps(self, run: RunModel, batch: Batch) -> torch.Tensor:
        """Each row's summed reference log-prob: the batch's precomputed ones, or computed now."""
        if "ref_logps" in batch:
            return batch["ref_logps"].float()
        return self.sequence_logps(self.reference_token_logps(run, batch), batch)[0]

    # -- the step's interface -------------------------------------------------------------------------

    def prepare(self, policy: Callable[[], ContextManager[RunModel]], micro_batches: Sequence[Batch],
                all_reduce: Any = None) -> dict[str, torch.Tensor]:
        """What the whole global batch decides before any backward: N (samples), T (NLL tokens) and for KTO z0."""
        device = micro_batches[0]["input_ids"].device
        n = torch.tensor(sum(self.samples(b) for b in micro_batches), dtype=torch.float64, device=device)
        tokens = torch.stack([b["logp_nll"].sum() for b in micro_batches]).sum().double()
        values = [n, tokens]
        if not self.paired:
            kl_sum = torch.zeros((), dtype=torch.float64, device=device)
            with policy() as run, torch.no_grad():
                for b in micro_batches:
                    kl = sub_batch(b, "kl_")
                    policy_logps = self.sequence_logps(self.token_logps(run, kl), kl)[0]
                    kl_sum = kl_sum + (policy_logps - self.reference_logps(run, kl)).sum().double()
            values.append(kl_sum)
        if all_reduce is not None:
            all_reduce(values)
        totals = {"n": values[0].float(), "nll_tokens": values[1].float()}
        if not self.paired:
            totals["kl"] = (values[2] / values[0]).float().clamp(min=0)
        return totals

    def terms(self, run: RunModel, batch: Batch, totals: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        """(this micro-batch's share of loss x N, its statistics)."""
        pref = self.pref
        token_logps = self.token_logps(run, batch)
        logps, lengths = self.sequence_logps(token_logps, batch)
        ref = self.reference_logps(run, batch) if self.uses_reference else None
        one = torch.ones((), device=logps.device)
        if self.paired:
            k = logps.shape[0] // 2
            losses, per_pair = pair_losses(
                pref.loss, logps[:k], logps[k:], lengths[:k], lengths[k:], None if ref is None else ref[:k],
                None if ref is None else ref[k:], beta=pref.beta, label_smoothing=pref.label_smoothing,
                simpo_gamma=pref.simpo_gamma, orpo_lambda=pref.orpo_lambda)
            stats = {name: torch.stack([v.sum(), one * k]) for name, v in per_pair.items()
                     if name != "rewards/margins"}
        else:
            desirable = batch["desirable"]
            losses, rewards = kto_losses(logps, ref, desirable, totals["kl"], beta=pref.beta,
                                         desirable_weight=pref.kto_desirable_weight,
                                         undesirable_weight=pref.kto_undesirable_weight)
            d, u = desirable.float(), (~desirable).float()
            stats = {"rewards/chosen": torch.stack([(rewards * d).sum(), d.sum()]),
                     "rewards/rejected": torch.stack([(rewards * u).sum(), u.sum()]),
                     "logps/chosen": torch.stack([(logps.detach() * d).sum(), d.sum()]),
                     "logps/rejected": torch.stack([(logps.detach() * u).sum(), u.sum()]),
                     "kl": torch.stack([totals["kl"] * len(desirable), one * len(desirable)])}
        loss_sum = losses.sum()
        if self.nll != "none":
            nll_sum = -(token_logps * batch["logp_nll"]).sum()
            loss_sum = loss_sum + self.nll_weight * nll_sum * (totals["n"] / totals["nll_tokens"].clamp(min=1)).float()
            stats["nll_loss"] = torch.stack([nll_sum.detach(), batch["logp_nll"].sum().float()])
        return loss_sum, {k: v.float() for k, v in stats.items()}

    def __call__(self, run: RunModel, batch: Batch, distill: bool = False) -> tuple[torch.Tensor, torch.Tensor, Stats]:
        """Evaluation: (the batch's summed loss, its samples, statistics), normalised within the batch."""
        totals = self.prepare(lambda: contextlib.nullcontext(run), [batch])
        loss_sum, stats = self.terms(run, batch, totals)
        return loss_sum, totals["n"], stats


__all__ = ["PreferenceLoss", "add_stats", "finish_stats", "nll_tokens", "sub_batch"]
