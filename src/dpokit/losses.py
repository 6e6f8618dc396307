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

TRL 1.16's other loss types, as it defines them, where some read each reply's log-ratio on its own,
c = log π(y_c|x) - log ref(y_c|x) and r = log π(y_r|x) - log ref(y_r|x) (so h = c - r):

    exo_pair  (EXO, Ji et al. 2024; ε > 0): KL(q || p) of q = (σ(βh), σ(-βh)) to p = (1-ε, ε):
              σ(βh) [log σ(βh) - log(1-ε)] + σ(-βh) [log σ(-βh) - log ε]
    nca_pair  (NCA, Chen et al. 2024): -log σ(βc) - ½ log σ(-βc) - ½ log σ(-βr)
    bco_pair  (BCO, Jung et al. 2024, without its running-mean shift, as TRL 1.16): -log σ(βc) - log σ(-βr)
    sppo_hard (SPPO, Wu et al. 2024, hard labels): (c - 1/(2β))² + (r + 1/(2β))²
    apo_zero  (APO, D'Oosterlinck et al. 2024): 1 - σ(βc) + σ(βr)
    apo_down  (APO): σ(βc) + 1 - σ(βh)
    discopop  (DiscoPOP, Lu et al. 2024): with m = σ(βh/τ),
              (1 - m)(-log σ(βh)) + m exp(-βh)
    aot       (AOT, Melnyk et al. 2024): sigmoid's loss of sort(log π(y_c|x) - log π(y_r|x)) minus
              sort(log ref(y_c|x) - log ref(y_r|x)), sorted over the micro-batch's pairs
    aot_unpaired  the same of sort(c) - sort(r)

Any of them combine with weights, e.g. ``[sigmoid, sft]`` with ``[1.0, 0.2]`` (RPO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAIRWISE_WITH_REFERENCE = ("sigmoid", "robust", "ipo", "hinge",
                           "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop",
                           "aot", "aot_unpaired")
REFERENCE_FREE = ("simpo", "sft")
ALL_LOSSES = PAIRWISE_WITH_REFERENCE + REFERENCE_FREE
LABEL_SMOOTHED = ("sigmoid", "robust", "simpo", "exo_pair", "aot", "aot_unpaired")
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


def exo_pair_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO's pairwise form: the KL divergence of the policy's implied preference (σ(βh), σ(-βh))
    from the target (1-ε, ε); ε must be > 0 (the target's log). h: [P] -> [P]."""
    eps = label_smoothing
    log_q_chosen, log_q_rejected = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)
    return (log_q_chosen.exp() * (log_q_chosen - math.log1p(-eps))
            + log_q_rejected.exp() * (log_q_rejected - math.log(eps)))


def nca_pair_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """NCA: raises the chosen reply's own reward, not only the margin. [P], [P] -> [P]."""
    c, r = beta * chosen_ratio, beta * rejected_ratio
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def bco_pair_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """BCO's binary classifier, each reply's reward on its own side of 0. [P], [P] -> [P]."""
    return -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)


def sppo_hard_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO with hard win probabilities: chosen log-ratio towards 1/(2β), rejected towards -1/(2β).
    [P], [P] -> [P]."""
    return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2


def apo_zero_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-zero: chosen likelihood up and rejected down, for replies better than the model's own.
    [P], [P] -> [P]."""
    return 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)


def apo_down_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-down: both likelihoods down, the rejected more, for replies worse than the model's own.
    [P], [P] -> [P]."""
    return torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * (chosen_ratio - rejected_ratio))


def discopop_loss(h: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP: the logistic loss and the exponential loss exp(-βh), mixed by σ(βh/τ). The
    exponential part is taken as exp(-βh + log σ(βh/τ)): the same value, finite where exp(-βh)
    alone overflows and its weight is 0. h: [P] -> [P]."""
    logits = beta * h
    mix = torch.sigmoid(logits / tau)
    return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits + F.logsigmoid(logits / tau))


def aot_loss(policy_margin: torch.Tensor, ref_margin: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT: the policy's margins log π(y_c|x) - log π(y_r|x) of the batch, sorted, against the
    reference's, sorted (a distributional dominance of the first over the second), in DPO's loss
    (cDPO's with ``label_smoothing``). Also AOT's unpaired form, given the chosen replies' log-ratios and
    the rejected replies' ones. [P], [P] -> [P] (entry i: the i-th smallest of each, not pair i)."""
    delta = torch.sort(policy_margin).values - torch.sort(ref_margin).values
    return sigmoid_loss(delta, beta, label_smoothing)


def with_reference_loss(name: str, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                        ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
                        discopop_tau: float = 0.05) -> torch.Tensor:
    """The loss ``name`` (one of :data:`PAIRWISE_WITH_REFERENCE`) of a micro-batch's policy and reference
    log-probs of the chosen and rejected replies (summed or averaged per token), each [P] -> [P]."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if name == "sigmoid":
        return sigmoid_loss(h, beta, label_smoothing)
    if name == "robust":
        return robust_loss(h, beta, label_smoothing)
    if name == "ipo":
        return ipo_loss(h, beta)
    if name == "hinge":
        return hinge_loss(h, beta)
    if name == "exo_pair":
        return exo_pair_loss(h, beta, label_smoothing)
    if name == "discopop":
        return discopop_loss(h, beta, discopop_tau)
    if name == "aot":
        return aot_loss(chosen - rejected, ref_chosen - ref_rejected, beta, label_smoothing)
    if name == "aot_unpaired":
        return aot_loss(chosen_ratio, rejected_ratio, beta, label_smoothing)
    by_ratio = {"nca_pair": nca_pair_loss, "bco_pair": bco_pair_loss, "sppo_hard": sppo_hard_loss,
                "apo_zero": apo_zero_loss, "apo_down": apo_down_loss}
    return by_ratio[name](chosen_ratio, rejected_ratio, beta)


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
    discopop_tau: float = 0.05,
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
            loss = with_reference_loss(
                name, scaled(name, logps.chosen, logps.chosen_tokens), scaled(name, logps.rejected, logps.rejected_tokens),
                scaled(name, logps.ref_chosen, logps.chosen_tokens), scaled(name, logps.ref_rejected, logps.rejected_tokens),
                beta, label_smoothing, discopop_tau)
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
