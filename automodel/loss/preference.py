"""Preference losses from per-sequence log-probs: DPO and its family, each as TRL defines it.

Every function takes the policy's (and the reference's) log-probs of the completions, summed over their tokens, and
returns the per-example losses (summed by the caller, then divided by the global batch's number of pairs or
examples, so that each weighs the same over micro-batches, accumulation and ranks) and the rewards TRL logs.

    sigmoid (DPO)  -log sigmoid(beta * ((c - c_ref) - (r - r_ref)))
    robust (rDPO)  ((1 - e) l(beta d) - e l(-beta d)) / (1 - 2e) with l = -log sigmoid, d as above, e = label_smoothing
    ipo            ((c - c_ref) / |c| - (r - r_ref) / |r| - 1 / (2 beta))^2         (length-averaged, as TRL)
    simpo          -(1 - e) log sigmoid(beta (c/|c| - r/|r|) - gamma) - e log sigmoid(-(...))  (no reference)
    orpo           -lambda log sigmoid(log odds(c/|c|) - log odds(r/|r|)), added to the chosen NLL  (no reference)
    kto            w_d (1 - sigmoid(beta (c - c_ref - z0))) for desirable, w_u (1 - sigmoid(beta (z0 - c + c_ref)))
                   for undesirable, z0 = max(0, mean KL estimate over the global batch), detached

|c| is the number of completion tokens whose log-probs are summed.
"""

import math

import torch
import torch.nn.functional as F

LN_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012), written as TRL's ORPO writes it."""
    return torch.where(x < LN_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(loss: str, chosen: torch.Tensor, rejected: torch.Tensor, chosen_len: torch.Tensor,
                rejected_len: torch.Tensor, ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None, *,
                beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                orpo_lambda: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair losses, per-pair statistics) for a paired loss; `chosen`/`rejected` are summed log-probs of P pairs,
    *_len their completion token counts. Statistics (each (P,), detached): rewards/chosen, rewards/rejected,
    logps/chosen, logps/rejected, and for orpo log_odds_ratio and log_odds_chosen."""
    if loss in ("sigmoid", "robust", "ipo"):
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if loss == "ipo":
            delta = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
            losses = (delta - 1 / (2 * beta)) ** 2
        else:
            delta = chosen_ratio - rejected_ratio
            e = label_smoothing if loss == "robust" else 0.0
            clean, flipped = -(1 - e) * F.logsigmoid(beta * delta), -e * F.logsigmoid(-beta * delta)
            losses = (clean - flipped) / (1 - 2 * e) if loss == "robust" else clean
        stats = {"rewards/chosen": beta * chosen_ratio, "rewards/rejected": beta * rejected_ratio,
                 "logps/chosen": chosen, "logps/rejected": rejected}
    elif loss == "simpo":
        chosen_avg, rejected_avg = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
        logits = (chosen_avg - rejected_avg) - simpo_gamma / beta
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
        stats = {"rewards/chosen": beta * chosen_avg, "rewards/rejected": beta * rejected_avg,
                 "logps/chosen": chosen_avg, "logps/rejected": rejected_avg}
    elif loss == "orpo":
        chosen_avg = (chosen / chosen_len.clamp(min=1)).float()
        rejected_avg = (rejected / rejected_len.clamp(min=1)).float()
        log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
        ratio = F.logsigmoid(log_odds)
        losses = -orpo_lambda * ratio
        stats = {"rewards/chosen": orpo_lambda * chosen_avg, "rewards/rejected": orpo_lambda * rejected_avg,
                 "logps/chosen": chosen_avg, "logps/rejected": rejected_avg, "log_odds_ratio": ratio,
                 "log_odds_chosen": log_odds}
    else:
        raise ValueError(f"unknown paired preference loss {loss!r}")
    stats = {k: v.detach().float() for k, v in stats.items()}
    stats["rewards/accuracies"] = (stats["rewards/chosen"] > stats["rewards/rejected"]).float()
    stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    return losses, stats


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example weighted losses, per-example rewards beta * (logps - ref_logps)) of KTO (Ethayarajh et al.
    2024), with `kl` the batch's reference point z0 (already clamped at 0 and detached)."""
    ratio = logps - ref_logps
    chosen_loss = 1 - torch.sigmoid(beta * (ratio - kl))
    rejected_loss = 1 - torch.sigmoid(beta * (kl - ratio))
    losses = torch.where(desirable, desirable_weight * chosen_loss, undesirable_weight * rejected_loss)
    return losses, (beta * ratio).detach()


__all__ = ["kto_losses", "log1mexp", "pair_losses"]
