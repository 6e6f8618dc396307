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

Any of them combine with weights, e.g. ``[sigmoid, sft]`` with ``[1.0, 0.2]`` (RPO). WPO (Zhou et
al. 2024) weighs each pair's loss by how likely the policy itself is to produce its two replies
(:func:`wpo_weights`).

f-DPO (Wang et al. 2023) swaps DPO's reverse-KL regularizer for another f-divergence: each reply's
log-ratio x = log(π/ref) becomes its score f'(e^x), and h = f'(e^c) - f'(e^r) (then averaged per
reply token where the loss averages). Only the losses of h alone take it (:data:`MARGIN_LOSSES`):

    reverse_kl        f'(t) = log t            x (DPO; the default)
    forward_kl        f'(t) = 1 - 1/t          1 - e^(-x)
    js_divergence     f'(t) = log(2t/(1+t))    log 2 + log σ(x)
    alpha_divergence  f'(t) = (t^(α-1) - 1)/(α-1)   (e^((α-1)x) - 1)/(α-1); α=0 is forward_kl, α=1 reverse_kl
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
MARGIN_LOSSES = ("sigmoid", "robust", "ipo", "hinge", "exo_pair", "discopop")
"""The losses with a reference that read only h, the difference of the two replies' scores: the
ones an f-divergence other than reverse KL applies to (TRL's set). The others read each reply's
log-ratio on its own, or sort margins, where f-DPO's normalizer β log Z(x) does not cancel."""
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
EXP_LIMIT = 80.0
"""The largest exponent the f-divergence scores take (e^80 is finite in float32): a reply whose
log-ratio passes it gets a constant score (no gradient) rather than an infinite loss."""


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


def divergence_score(log_ratio: torch.Tensor, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(t) at t = π(y|x)/ref(y|x), from x = log t: a reply's score under the f-divergence
    regularizer ``divergence`` (one of :data:`F_DIVERGENCES`; ``alpha`` is the α of
    alpha_divergence). Exponents are capped at :data:`EXP_LIMIT`. [P] -> [P]."""
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and alpha == 1.0):  # f'(t) = log t
        return log_ratio
    if divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(log_ratio)
    if divergence == "forward_kl":
        alpha = 0.0
    elif divergence != "alpha_divergence":
        raise ValueError(f"unknown f-divergence '{divergence}'; known: {', '.join(F_DIVERGENCES)}")
    return torch.expm1(((alpha - 1.0) * log_ratio).clamp(max=EXP_LIMIT)) / (alpha - 1.0)


def margin_loss(name: str, h: torch.Tensor, beta: float, label_smoothing: float = 0.0,
                discopop_tau: float = 0.05) -> torch.Tensor:
    """The loss ``name`` (one of :data:`MARGIN_LOSSES`) of the pairs' score differences h. [P] -> [P]."""
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
    raise ValueError(f"'{name}' is not a loss of the margin alone ({', '.join(MARGIN_LOSSES)})")


def with_reference_loss(name: str, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                        ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
                        discopop_tau: float = 0.05) -> torch.Tensor:
    """The loss ``name`` (one of :data:`PAIRWISE_WITH_REFERENCE`) of a micro-batch's policy and reference
    log-probs of the chosen and rejected replies (summed or averaged per token), each [P] -> [P]."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if name in MARGIN_LOSSES:
        return margin_loss(name, chosen_ratio - rejected_ratio, beta, label_smoothing, discopop_tau)
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


def wpo_weights(chosen_aligned: torch.Tensor, chosen_tokens: torch.Tensor, rejected_aligned: torch.Tensor,
                rejected_tokens: torch.Tensor) -> torch.Tensor:
    """WPO's weight of each pair (Zhou et al. 2024, Eq. 2, as TRL 1.16): the product over its two
    replies of exp(the mean over the reply's tokens of log p(y_t) - log Σ_v p_v²), p the policy's
    next-token distribution. Off-policy pairs (replies the policy would not write) weigh less.
    ``*_aligned``: those summed over each reply's tokens (:data:`dpokit.logps.WPO_TOKEN_STATS`).
    No gradient: a weight, not a path. [P] x 4 -> [P]."""
    return torch.exp(per_token(chosen_aligned, chosen_tokens) + per_token(rejected_aligned, rejected_tokens)).detach()


def per_token(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed log-probs averaged over their reply tokens; a reply of no tokens (which dpokit's data
    never makes, but a caller of these functions might) averages to 0, not NaN. [P], [P] -> [P]."""
    return logps / tokens.clamp(min=1)


@dataclass
class PairLogps:
    """Summed reply log-probs and reply token counts of a batch of pairs, each of shape [P].

    ``ref_*`` are None when no reference is used. Under LD-DPO (``ld_alpha``), ``chosen``,
    ``rejected`` and ``ref_*`` are its weighted sums and ``plain_*`` the plain ones, which the
    losses without a reference (sft, simpo) read; else ``plain_*`` are None.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    plain_chosen: torch.Tensor | None = None
    plain_rejected: torch.Tensor | None = None

    def plain(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain summed log-probs of the chosen and rejected replies, [P] each."""
        if self.plain_chosen is None or self.plain_rejected is None:
            return self.chosen, self.rejected
        return self.plain_chosen, self.plain_rejected


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
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the named losses, with TRL's per-pair reward statistics. With an
    ``f_divergence_type`` other than reverse_kl, the losses of :data:`MARGIN_LOSSES` read each reply's
    :func:`divergence_score` (of its summed log-ratio, then averaged per token where the loss
    averages, as TRL); the others refuse it. ``pair_weights`` [P] (WPO's, :func:`wpo_weights`)
    multiply each loss of each pair.

    Returns:
        per_pair_loss: [P], the weighted sum of every named loss for each pair.
        stats: per-pair tensors [P] (detached) for ``rewards/chosen``, ``rewards/rejected``,
            ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, and with
            more than one loss each one's own value, without its ``loss_weights`` weight (``loss/sigmoid``,
            ``loss/sft``; with ``pair_weights``, weighted by those), and ``wpo/weight``: ``pair_weights``.
            Rewards are β·(log π - log ref) with a reference, β·(avg log π) without (SimPO's).
    """
    weights = loss_weights or [1.0] * len(loss_type)
    has_ref = logps.ref_chosen is not None and logps.ref_rejected is not None
    plain_chosen, plain_rejected = logps.plain()  # what the losses without a reference read

    def scaled(name: str, policy: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return per_token(policy, tokens) if uses_length_normalization(name, length_normalize) else policy

    def score(name: str, policy: torch.Tensor, ref: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return scaled(name, divergence_score(policy - ref, f_divergence_type, f_alpha_divergence_coef), tokens)

    total = torch.zeros_like(logps.chosen)
    parts: dict[str, torch.Tensor] = {}
    for name, weight in zip(loss_type, weights):
        if name in PAIRWISE_WITH_REFERENCE and not has_ref:
            raise ValueError(f"loss '{name}' needs reference log-probs")
        if name in MARGIN_LOSSES and f_divergence_type != "reverse_kl":
            h = (score(name, logps.chosen, logps.ref_chosen, logps.chosen_tokens)
                 - score(name, logps.rejected, logps.ref_rejected, logps.rejected_tokens))
            loss = margin_loss(name, h, beta, label_smoothing, discopop_tau)
        elif name in PAIRWISE_WITH_REFERENCE:
            if f_divergence_type != "reverse_kl":
                raise ValueError(f"loss '{name}' has no f-divergence form; those that have: {', '.join(MARGIN_LOSSES)}")
            loss = with_reference_loss(
                name, scaled(name, logps.chosen, logps.chosen_tokens), scaled(name, logps.rejected, logps.rejected_tokens),
                scaled(name, logps.ref_chosen, logps.chosen_tokens), scaled(name, logps.ref_rejected, logps.rejected_tokens),
                beta, label_smoothing, discopop_tau)
        elif name == "simpo":
            loss = simpo_loss(
                per_token(plain_chosen, logps.chosen_tokens),
                per_token(plain_rejected, logps.rejected_tokens),
                beta,
                simpo_gamma,
                label_smoothing,
            )
        elif name == "sft":
            loss = sft_loss(plain_chosen, logps.chosen_tokens)
        else:
            raise ValueError(f"unknown loss '{name}'; known: {', '.join(ALL_LOSSES)}")
        if pair_weights is not None:
            loss = loss * pair_weights
        total = total + weight * loss
        parts[f"loss/{name}"] = loss.detach()

    with torch.no_grad():
        if has_ref:
            reward_chosen = beta * (logps.chosen - logps.ref_chosen)
            reward_rejected = beta * (logps.rejected - logps.ref_rejected)
        else:
            reward_chosen = beta * per_token(plain_chosen, logps.chosen_tokens)
            reward_rejected = beta * per_token(plain_rejected, logps.rejected_tokens)
        stats = {
            "rewards/chosen": reward_chosen,
            "rewards/rejected": reward_rejected,
            # NaN where a reward is not finite (a diverged run): NaN > NaN is False, a real-looking 0
            "rewards/accuracies": (reward_chosen > reward_rejected).float().masked_fill(
                ~(reward_chosen - reward_rejected).isfinite(), float("nan")),
            "rewards/margins": reward_chosen - reward_rejected,
            "logps/chosen": logps.chosen.detach(),
            "logps/rejected": logps.rejected.detach(),
            **(parts if len(parts) > 1 else {}),  # a combined loss's parts, each without its loss weight
            **({} if pair_weights is None else {"wpo/weight": pair_weights.detach()}),
        }
    return total, stats
