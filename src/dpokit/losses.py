"""Preference losses as pure functions of per-pair log-probabilities.

Every function takes tensors of shape ``[P]`` (one entry per pair) and returns per-pair
losses ``[P]``; the caller averages. Notation, with ``π`` the policy and ``ref`` the reference:

    h = (log π(y_c|x) - log π(y_r|x)) - (log ref(y_c|x) - log ref(y_r|x))

where the log-probs are summed over reply tokens, or averaged when length-normalized.

    sigmoid  (DPO, Rafailov et al. 2023; cDPO with ε > 0):
             -(1-ε) log σ(β h) - ε log σ(-β h)
    robust   (Chowdhury et al. 2024, unbiased under label noise ε):
             (-(1-ε) log σ(β h) + ε log σ(-β h)) / (1 - 2ε)
    ipo      (Azar et al. 2023): (h - 1/(2β))²
    hinge    (SLiC, Zhao et al. 2023): max(0, 1 - β h)
    simpo    (Meng et al. 2024, reference-free, length-normalized):
             -(1-ε) log σ(β Δ - γ) - ε log σ(-(β Δ - γ)),  Δ = avg log π(y_c|x) - avg log π(y_r|x)
    sft      negative log-likelihood of the chosen reply per token: -log π(y_c|x) / |y_c|

Any of them combine with weights, e.g. ``[sigmoid, sft]`` with ``[1.0, 0.2]`` (RPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAIRWISE_WITH_REFERENCE = ("sigmoid", "robust", "ipo", "hinge")
REFERENCE_FREE = ("simpo", "sft")
ALL_LOSSES = PAIRWISE_WITH_REFERENCE + REFERENCE_FREE
LABEL_SMOOTHED = ("sigmoid", "robust", "simpo")
"""The losses that read ``label_smoothing`` (ε above)."""


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (and cDPO when ``label_smoothing`` > 0). h: [P] -> [P]."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def robust_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO: an unbiased estimate of the clean-label loss. h: [P] -> [P]."""
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: squared distance of h to 1/(2β). h: [P] -> [P]."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge. h: [P] -> [P]."""
    return torch.relu(1 - beta * h)


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """SimPO on average per-token log-probs. [P], [P] -> [P]."""
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def sft_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the chosen reply. [P], [P] -> [P]."""
    return -per_token(chosen_logps, chosen_tokens)


def per_token(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed log-probs averaged over their reply tokens; a reply of no tokens (which dpokit's data
    never makes, but a caller of these functions might) averages to 0, not NaN. [P], [P] -> [P]."""
    return logps / tokens.clamp(min=1)


@dataclass
class PairLogps:
    """Summed reply log-probs and reply token counts of a batch of pairs, each of shape [P].

    ``ref_*`` are None when no reference is used.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


def uses_length_normalization(loss_type: str, length_normalize: bool | None) -> bool:
    """Whether ``loss_type`` averages log-probs over reply tokens: simpo always (its definition);
    the others as ``length_normalize`` says, and with None (auto) ipo only."""
    if loss_type == "simpo":
        return True
    if length_normalize is None:
        return loss_type == "ipo"
    return length_normalize


def preference_loss(
    logps: PairLogps,
    loss_type: list[str],
    loss_weights: list[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    length_normalize: bool | None = None,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the named losses, with TRL's per-pair reward statistics.

    Returns:
        per_pair_loss: [P], the weighted sum of every named loss for each pair.
        stats: per-pair tensors [P] (detached) for ``rewards/chosen``, ``rewards/rejected``,
            ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, and with
            more than one loss each one's own value, unweighted (``loss/sigmoid``, ``loss/sft``).
            Rewards are β·(log π - log ref) with a reference, β·(avg log π) without (SimPO's).
    """
    weights = loss_weights or [1.0] * len(loss_type)
    has_ref = logps.ref_chosen is not None and logps.ref_rejected is not None

    def scaled(name: str, policy: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return per_token(policy, tokens) if uses_length_normalization(name, length_normalize) else policy

    total = torch.zeros_like(logps.chosen)
    parts: dict[str, torch.Tensor] = {}
    for name, weight in zip(loss_type, weights):
        if name in PAIRWISE_WITH_REFERENCE:
            if not has_ref:
                raise ValueError(f"loss '{name}' needs reference log-probs")
            h = (scaled(name, logps.chosen, logps.chosen_tokens) - scaled(name, logps.rejected, logps.rejected_tokens)) - (
                scaled(name, logps.ref_chosen, logps.chosen_tokens) - scaled(name, logps.ref_rejected, logps.rejected_tokens)
            )
            if name == "sigmoid":
                loss = sigmoid_loss(h, beta, label_smoothing)
            elif name == "robust":
                loss = robust_loss(h, beta, label_smoothing)
            elif name == "ipo":
                loss = ipo_loss(h, beta)
            else:
                loss = hinge_loss(h, beta)
        elif name == "simpo":
            loss = simpo_loss(
                per_token(logps.chosen, logps.chosen_tokens),
                per_token(logps.rejected, logps.rejected_tokens),
                beta,
                simpo_gamma,
                label_smoothing,
            )
        elif name == "sft":
            loss = sft_loss(logps.chosen, logps.chosen_tokens)
        else:
            raise ValueError(f"unknown loss '{name}'; known: {', '.join(ALL_LOSSES)}")
        total = total + weight * loss
        parts[f"loss/{name}"] = loss.detach()

    with torch.no_grad():
        if has_ref:
            reward_chosen = beta * (logps.chosen - logps.ref_chosen)
            reward_rejected = beta * (logps.rejected - logps.ref_rejected)
        else:
            reward_chosen = beta * per_token(logps.chosen, logps.chosen_tokens)
            reward_rejected = beta * per_token(logps.rejected, logps.rejected_tokens)
        stats = {
            "rewards/chosen": reward_chosen,
            "rewards/rejected": reward_rejected,
            # NaN where a reward is not finite (a diverged run): NaN > NaN is False, a real-looking 0
            "rewards/accuracies": (reward_chosen > reward_rejected).float().masked_fill(
                ~(reward_chosen - reward_rejected).isfinite(), float("nan")),
            "rewards/margins": reward_chosen - reward_rejected,
            "logps/chosen": logps.chosen.detach(),
            "logps/rejected": logps.rejected.detach(),
            **(parts if len(parts) > 1 else {}),  # a combined loss's parts, each unweighted
        }
    return total, stats
