"""Each loss against values computed by hand (with math, not torch)."""

import math

import pytest
import torch

from dpokit.losses import PairLogps, preference_loss
from trl_code import dpo_trainer_block


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# policy chosen/rejected, reference chosen/rejected summed log-probs; token counts 4 and 2
LOGPS = PairLogps(
    chosen=torch.tensor([-10.0]), rejected=torch.tensor([-12.0]),
    chosen_tokens=torch.tensor([4.0]), rejected_tokens=torch.tensor([2.0]),
    ref_chosen=torch.tensor([-11.0]), ref_rejected=torch.tensor([-11.5]),
)
H = (-10 - -12) - (-11 - -11.5)  # 1.5
H_AVG = (-10 / 4 - -12 / 2) - (-11 / 4 - -11.5 / 2)  # 3.5 - 3.0 = 0.5


def loss_of(**kw) -> float:
    loss, _ = preference_loss(LOGPS, **kw)
    return loss.item()


def test_sigmoid():
    assert loss_of(loss_type=["sigmoid"], beta=0.1) == pytest.approx(-logsig(0.15), abs=1e-6)


def test_sigmoid_label_smoothing_cdpo():
    expected = -0.8 * logsig(0.15) - 0.2 * logsig(-0.15)
    assert loss_of(loss_type=["sigmoid"], beta=0.1, label_smoothing=0.2) == pytest.approx(expected, abs=1e-6)


def test_robust():
    expected = (-0.8 * logsig(0.15) + 0.2 * logsig(-0.15)) / 0.6
    assert loss_of(loss_type=["robust"], beta=0.1, label_smoothing=0.2) == pytest.approx(expected, abs=1e-6)


def test_ipo_is_length_normalized_by_default():
    assert loss_of(loss_type=["ipo"], beta=0.1) == pytest.approx((H_AVG - 5.0) ** 2, abs=1e-5)
    assert loss_of(loss_type=["ipo"], beta=0.1, length_normalize=False) == pytest.approx((H - 5.0) ** 2, abs=1e-5)


def test_hinge():
    assert loss_of(loss_type=["hinge"], beta=0.1) == pytest.approx(1 - 0.15, abs=1e-6)
    assert loss_of(loss_type=["hinge"], beta=1.0) == pytest.approx(0.0, abs=1e-6)


def test_length_normalized_sigmoid():
    assert loss_of(loss_type=["sigmoid"], beta=0.1, length_normalize=True) == pytest.approx(-logsig(0.05), abs=1e-6)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# each reply's own log-ratio in LOGPS: c = -10 - -11 = 1.0, r = -12 - -11.5 = -0.5 (h = c - r = 1.5)
@pytest.mark.parametrize("settings, expected", [
    ({"loss_type": ["exo_pair"], "beta": 0.1, "label_smoothing": 1e-3},
     sig(0.15) * (logsig(0.15) - math.log(1 - 1e-3)) + sig(-0.15) * (logsig(-0.15) - math.log(1e-3))),
    ({"loss_type": ["nca_pair"], "beta": 0.1}, -logsig(0.1) - 0.5 * logsig(-0.1) - 0.5 * logsig(0.05)),
    ({"loss_type": ["bco_pair"], "beta": 0.1}, -logsig(0.1) - logsig(0.05)),
    ({"loss_type": ["sppo_hard"], "beta": 0.1}, (1.0 - 5) ** 2 + (-0.5 + 5) ** 2),
    ({"loss_type": ["sppo_hard"], "beta": 0.1, "length_normalize": True}, (0.25 - 5) ** 2 + (-0.25 + 5) ** 2),  # c, r per token
    ({"loss_type": ["apo_zero"], "beta": 0.1}, 1 - sig(0.1) + sig(-0.05)),
    ({"loss_type": ["apo_zero"], "beta": 2.0}, 1 - sig(2.0) + sig(-1.0)),
    ({"loss_type": ["apo_down"], "beta": 0.1}, sig(0.1) + 1 - sig(0.15)),
    ({"loss_type": ["discopop"], "beta": 0.1}, -logsig(0.15) * (1 - sig(3.0)) + math.exp(-0.15) * sig(3.0)),
    ({"loss_type": ["discopop"], "beta": 0.1, "discopop_tau": 0.5}, -logsig(0.15) * (1 - sig(0.3)) + math.exp(-0.15) * sig(0.3)),
    ({"loss_type": ["apo_zero", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1}, 1 - sig(0.1) + sig(-0.05) + 0.5 * 10 / 4),
])
def test_losses_of_each_replys_log_ratio(settings, expected):
    """TRL 1.16's exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down and discopop, by hand."""
    assert loss_of(**settings) == pytest.approx(expected, abs=1e-6)


# three pairs: policy margins log π(y_c) - log π(y_r) = [2, -1, 3], reference margins [-2, -1, 3];
# chosen log-ratios c = [3, 1, -1], rejected r = [-1, 1, -1]
THREE = PairLogps(
    chosen=torch.tensor([-10.0, -8.0, -6.0]), rejected=torch.tensor([-12.0, -7.0, -9.0]),
    chosen_tokens=torch.tensor([4.0, 2.0, 1.0]), rejected_tokens=torch.tensor([2.0, 2.0, 3.0]),
    ref_chosen=torch.tensor([-13.0, -9.0, -5.0]), ref_rejected=torch.tensor([-11.0, -8.0, -8.0]),
)


@pytest.mark.parametrize("loss_type, label_smoothing, deltas", [
    ("aot", 0.0, [1.0, 3.0, 0.0]),  # sorted [-1, 2, 3] - sorted [-2, -1, 3]
    ("aot_unpaired", 0.0, [0.0, 2.0, 2.0]),  # sorted c [-1, 1, 3] - sorted r [-1, -1, 1]
    ("aot", 0.2, [1.0, 3.0, 0.0]),
])
def test_aot_sorts_the_margins_of_the_micro_batch(loss_type, label_smoothing, deltas):
    loss, _ = preference_loss(THREE, [loss_type], beta=0.5, label_smoothing=label_smoothing)
    expected = [-(1 - label_smoothing) * logsig(0.5 * d) - label_smoothing * logsig(-0.5 * d) for d in deltas]
    assert sorted(loss.tolist()) == pytest.approx(sorted(expected), abs=1e-6)
    one = PairLogps(*(t[:1] for t in (THREE.chosen, THREE.rejected, THREE.chosen_tokens, THREE.rejected_tokens,
                                      THREE.ref_chosen, THREE.ref_rejected)))
    assert preference_loss(one, [loss_type], beta=0.5)[0].item() == pytest.approx(-logsig(0.5 * 4.0), abs=1e-6)  # sigmoid's


def test_discopop_is_finite_where_its_exponential_alone_overflows():
    """exp(-βh) overflows float32 at βh = -100 while its weight σ(βh/τ) is 0: the loss is the logistic
    part alone (about 100), and its gradient the logistic one's, not NaN."""
    from dpokit.losses import discopop_loss

    h = torch.tensor([-1000.0, 1.5, 40.0], requires_grad=True)
    loss = discopop_loss(h, beta=0.1, tau=0.05)
    assert loss[0].item() == pytest.approx(100.0, abs=1e-4)
    naive = lambda x: -torch.nn.functional.logsigmoid(0.1 * x) * (1 - torch.sigmoid(2 * x)) + torch.exp(-0.1 * x) * torch.sigmoid(2 * x)
    assert naive(h.detach())[0].isnan()  # what the plain form would give
    loss.sum().backward()
    x = h.detach()[1:].clone().requires_grad_(True)
    naive(x).sum().backward()
    torch.testing.assert_close(loss[1:], naive(x).detach())
    torch.testing.assert_close(h.grad[1:], x.grad)
    assert h.grad[0].item() == pytest.approx(-0.1, abs=1e-6)  # d/dh of -log σ(0.1 h) far below 0


def test_every_loss_and_divergence_the_config_takes_is_one_the_loss_knows():
    import typing

    from dpokit.config import LossConfig, LossName
    from dpokit.losses import ALL_LOSSES, F_DIVERGENCES

    assert sorted(typing.get_args(LossName)) == sorted(ALL_LOSSES)
    divergences = typing.get_type_hints(LossConfig)["f_divergence_type"]
    assert typing.get_args(divergences) == F_DIVERGENCES


def test_simpo_needs_no_reference():
    free = PairLogps(chosen=LOGPS.chosen, rejected=LOGPS.rejected, chosen_tokens=LOGPS.chosen_tokens, rejected_tokens=LOGPS.rejected_tokens)
    loss, stats = preference_loss(free, ["simpo"], beta=2.0, simpo_gamma=0.5)
    # avg chosen -2.5, avg rejected -6 -> 2.0 * 3.5 - 0.5 = 6.5
    assert loss.item() == pytest.approx(-logsig(6.5), abs=1e-6)
    assert stats["rewards/chosen"].item() == pytest.approx(2.0 * -2.5)
    assert stats["rewards/margins"].item() == pytest.approx(2.0 * 3.5)


def test_sft_is_per_token_nll_of_chosen():
    assert loss_of(loss_type=["sft"]) == pytest.approx(10 / 4)


def test_a_reply_of_no_tokens_averages_to_zero_not_nan():
    """dpokit's data never makes an empty reply (EOS or end-of-turn is always kept), but a direct
    caller may: the per-token average is then 0, as TRL's clamp(min=1) gives, and no loss is NaN."""
    empty = PairLogps(chosen=torch.tensor([0.0]), rejected=torch.tensor([-12.0]), chosen_tokens=torch.tensor([0.0]),
                      rejected_tokens=torch.tensor([2.0]), ref_chosen=torch.tensor([0.0]), ref_rejected=torch.tensor([-11.5]))
    for loss_type in (["ipo"], ["simpo"], ["sft"], ["sigmoid", "sft"]):
        loss, stats = preference_loss(empty, loss_type, beta=0.1)
        assert torch.isfinite(loss).all() and all(torch.isfinite(v).all() for v in stats.values()), loss_type
    assert preference_loss(empty, ["sft"])[0].item() == 0.0
    # ipo: h = (0 - -6) - (0 - -5.75) = 0.25 -> (0.25 - 5)^2
    assert preference_loss(empty, ["ipo"], beta=0.1)[0].item() == pytest.approx((0.25 - 5) ** 2)


def test_weighted_combination_rpo():
    expected = 1.0 * -logsig(0.15) + 0.2 * 2.5
    assert loss_of(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], beta=0.1) == pytest.approx(expected, abs=1e-6)
    # each part is logged as it is, unweighted; a single loss has no parts
    _, stats = preference_loss(LOGPS, ["sigmoid", "sft"], loss_weights=[1.0, 0.2], beta=0.1)
    assert stats["loss/sigmoid"].item() == pytest.approx(-logsig(0.15), abs=1e-6) and stats["loss/sft"].item() == pytest.approx(2.5)
    assert not any(k.startswith("loss/") for k in preference_loss(LOGPS, ["sigmoid"], beta=0.1)[1])


def test_reward_statistics_follow_trl():
    _, stats = preference_loss(LOGPS, ["sigmoid"], beta=0.1)
    assert stats["rewards/chosen"].item() == pytest.approx(0.1 * 1.0)
    assert stats["rewards/rejected"].item() == pytest.approx(0.1 * -0.5)
    assert stats["rewards/margins"].item() == pytest.approx(0.15)
    assert stats["rewards/accuracies"].item() == 1.0
    assert stats["logps/chosen"].item() == -10.0 and stats["logps/rejected"].item() == -12.0


def test_accuracy_of_a_diverged_pair_is_nan_not_zero():
    """NaN log-probs (a diverged run) compared False, so such a run logged accuracy 0, a real-looking
    value, while its loss and margins said non-finite."""
    nan = torch.tensor([float("nan"), -10.0])
    diverged = PairLogps(chosen=nan, rejected=torch.tensor([-12.0, -12.0]), chosen_tokens=torch.tensor([3.0, 3.0]),
                         rejected_tokens=torch.tensor([4.0, 4.0]), ref_chosen=torch.tensor([-11.0, -11.0]),
                         ref_rejected=torch.tensor([-11.5, -11.5]))
    accuracy = preference_loss(diverged, ["sigmoid"], beta=0.1)[1]["rewards/accuracies"]
    assert accuracy.isnan().tolist() == [True, False] and accuracy[1].item() == 1.0


def test_accuracy_of_a_pair_with_an_infinite_log_prob_is_nan():
    """A reward that is -inf (a log-prob of -inf) is not finite either: its accuracy is NaN, not the 0
    or 1 that comparing it gives (chosen -inf < any rejected; rejected -inf < any chosen)."""
    inf = float("inf")
    lp = PairLogps(chosen=torch.tensor([-inf, -10.0]), rejected=torch.tensor([-12.0, -inf]),
                   chosen_tokens=torch.tensor([4.0, 4.0]), rejected_tokens=torch.tensor([2.0, 2.0]),
                   ref_chosen=torch.tensor([-11.0, -11.0]), ref_rejected=torch.tensor([-11.5, -11.5]))
    accuracy = preference_loss(lp, ["sigmoid"], beta=0.1)[1]["rewards/accuracies"]
    assert accuracy.isnan().tolist() == [True, True]


def test_a_tie_in_rewards_is_not_counted_accurate():
    """As TRL: accuracy is chosen reward > rejected reward, strictly. Here both rewards are
    0.1 * (-10 - -11) = 0.1 * (-12 - -13) = 0.1, so the pair scores 0, not 1."""
    lp = PairLogps(chosen=torch.tensor([-10.0]), rejected=torch.tensor([-12.0]), chosen_tokens=torch.tensor([4.0]),
                   rejected_tokens=torch.tensor([2.0]), ref_chosen=torch.tensor([-11.0]), ref_rejected=torch.tensor([-13.0]))
    stats = preference_loss(lp, ["sigmoid"], beta=0.1)[1]
    assert stats["rewards/margins"].item() == 0.0 and stats["rewards/accuracies"].item() == 0.0


def test_a_one_token_reply_is_its_own_average():
    """The per-token average divides by the token count, clamped only to keep an empty reply at 0: a
    reply of one token averages to its own log-prob (sft: -(-3) / 1 = 3; simpo with β=1, γ=0:
    logits -3/1 - -8/4 = -1)."""
    lp = PairLogps(chosen=torch.tensor([-3.0]), rejected=torch.tensor([-8.0]),
                   chosen_tokens=torch.tensor([1.0]), rejected_tokens=torch.tensor([4.0]))
    assert preference_loss(lp, ["sft"])[0].item() == pytest.approx(3.0)
    assert preference_loss(lp, ["simpo"], beta=1.0, simpo_gamma=0.0)[0].item() == pytest.approx(-logsig(-1.0), abs=1e-6)


def test_a_reference_with_one_side_missing_is_an_error():
    """Reference log-probs for the chosen replies only (or the rejected only) are no reference: a
    pairwise loss refuses them with the same error as none at all."""
    for ref_chosen, ref_rejected in ((LOGPS.ref_chosen, None), (None, LOGPS.ref_rejected)):
        half = PairLogps(chosen=LOGPS.chosen, rejected=LOGPS.rejected, chosen_tokens=LOGPS.chosen_tokens,
                         rejected_tokens=LOGPS.rejected_tokens, ref_chosen=ref_chosen, ref_rejected=ref_rejected)
        with pytest.raises(ValueError, match="needs reference log-probs"):
            preference_loss(half, ["sigmoid"])


def test_pairwise_loss_without_reference_is_an_error():
    free = PairLogps(chosen=LOGPS.chosen, rejected=LOGPS.rejected, chosen_tokens=LOGPS.chosen_tokens, rejected_tokens=LOGPS.rejected_tokens)
    with pytest.raises(ValueError, match="reference"):
        preference_loss(free, ["sigmoid"])


def test_sigmoid_gradient_direction():
    chosen = torch.tensor([-10.0], requires_grad=True)
    rejected = torch.tensor([-12.0], requires_grad=True)
    lp = PairLogps(chosen, rejected, torch.tensor([4.0]), torch.tensor([2.0]), torch.tensor([-11.0]), torch.tensor([-11.5]))
    loss, _ = preference_loss(lp, ["sigmoid"], beta=0.1)
    loss.sum().backward()
    # dL/d chosen = -β σ(-βh)
    assert chosen.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.15)), abs=1e-6)
    assert rejected.grad.item() == pytest.approx(0.1 / (1 + math.exp(0.15)), abs=1e-6)


# The training loop's side: score_batch hands the configured settings and each reply's token count to the loss.

def scored(loss_settings: dict, with_reference: bool = True) -> tuple[float, dict]:
    """score_batch's loss and stats for one pair of the values above (LOGPS): chosen of 4 reply
    tokens, rejected of 2, a stand-in policy answering the policy log-probs (and token statistics:
    entropy, mean logit and top-1 summed over each reply's tokens, and WPO's column: -2 and -3)."""
    from dpokit.config import Config, LossConfig
    from dpokit.data.batching import make_batch
    from dpokit.data.tokenize import TokenizedPair
    from dpokit.train import score_batch

    batch = make_batch([TokenizedPair(prompt_ids=[5, 6, 7], chosen_ids=[8, 9, 10, 2], rejected_ids=[11, 2])], "padded")
    assert batch.seq_tokens.tolist() == [4, 2]
    config = Config(loss=LossConfig(**loss_settings))
    ref = torch.tensor([-11.0, -11.5]) if with_reference else None
    summed_stats = torch.tensor([[8.0, 0.4, 3.0, -2.0], [5.0, -0.2, 0.0, -3.0]])  # the last: WPO's column

    def policy(token_stats: tuple, **inputs):
        return torch.tensor([-10.0, -12.0]), summed_stats[:, :len(token_stats)]

    loss, stats = score_batch(policy, ref, batch, config)
    return loss.item(), {k: v.item() for k, v in stats.items()}


@pytest.mark.parametrize("settings, expected", [
    ({"beta": 0.1}, -logsig(0.15)),
    ({"beta": 0.5}, -logsig(0.75)),
    ({"beta": 0.1, "label_smoothing": 0.2}, -0.8 * logsig(0.15) - 0.2 * logsig(-0.15)),
    ({"loss_type": ["robust"], "beta": 0.1, "label_smoothing": 0.2}, (-0.8 * logsig(0.15) + 0.2 * logsig(-0.15)) / 0.6),
    ({"beta": 0.1, "length_normalize": True}, -logsig(0.05)),
    ({"loss_type": ["ipo"], "beta": 0.1}, (H_AVG - 5) ** 2),
    ({"loss_type": ["ipo"], "beta": 0.1, "length_normalize": False}, (H - 5) ** 2),
    ({"loss_type": ["hinge"], "beta": 0.4}, 1 - 0.4 * H),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.2], "beta": 0.1}, -logsig(0.15) + 0.2 * 10 / 4),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.5, 2.0], "beta": 0.1}, -0.5 * logsig(0.15) + 2.0 * 10 / 4),
    ({"loss_type": ["discopop"], "beta": 0.1, "discopop_tau": 0.5}, -logsig(0.15) * (1 - sig(0.3)) + math.exp(-0.15) * sig(0.3)),
    ({"loss_type": ["exo_pair"], "beta": 0.1, "label_smoothing": 0.01},
     sig(0.15) * (logsig(0.15) - math.log(0.99)) + sig(-0.15) * (logsig(-0.15) - math.log(0.01))),
    ({"loss_type": ["apo_down"], "beta": 0.1, "length_normalize": True}, sig(0.025) + 1 - sig(0.05)),
    # f-DPO: chosen log-ratio c = 1, rejected r = -0.5, each reply's score f'(e^x) in place of x
    ({"beta": 0.1, "f_divergence_type": "forward_kl"}, -logsig(0.1 * (math.exp(0.5) - math.exp(-1)))),
    ({"beta": 0.1, "f_divergence_type": "js_divergence"}, -logsig(0.1 * (logsig(1) - logsig(-0.5)))),
    ({"beta": 0.1, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
     -logsig(0.1 * (math.exp(-0.7) - math.exp(0.35)) / -0.7)),
    ({"loss_type": ["ipo"], "beta": 0.1, "f_divergence_type": "forward_kl"},  # scores averaged per token: 4 and 2
     ((1 - math.exp(-1)) / 4 - (1 - math.exp(0.5)) / 2 - 5) ** 2),
    ({"loss_type": ["hinge", "sft"], "beta": 0.4, "f_divergence_type": "js_divergence"},
     1 - 0.4 * (logsig(1) - logsig(-0.5)) + 10 / 4),
])
def test_the_training_step_scores_with_the_configured_loss(settings, expected):
    """What the loop computes (score_batch) under each setting, against the value by hand: a setting
    dropped on its way to the loss, or the chosen and rejected token counts swapped, changes it."""
    assert scored(settings)[0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("settings, expected", [
    ({"loss_type": ["simpo"], "beta": 2.0, "simpo_gamma": 0.5}, -logsig(6.5)),  # 2.0 * (-10/4 - -12/2) - 0.5
    ({"loss_type": ["simpo"], "beta": 2.0, "simpo_gamma": 1.5}, -logsig(5.5)),
    ({"loss_type": ["simpo"], "beta": 2.0, "label_smoothing": 0.2}, -0.8 * logsig(6.5) - 0.2 * logsig(-6.5)),
    ({"loss_type": ["sft"]}, 10 / 4),
    ({"loss_type": ["simpo", "sft"], "loss_weights": [1.0, 0.3], "beta": 2.0}, -logsig(6.5) + 0.3 * 10 / 4),
])
def test_the_training_step_scores_reference_free_losses_per_token(settings, expected):
    assert scored(settings, with_reference=False)[0] == pytest.approx(expected, abs=1e-6)


def test_simpo_label_smoothing():
    free = PairLogps(chosen=LOGPS.chosen, rejected=LOGPS.rejected, chosen_tokens=LOGPS.chosen_tokens, rejected_tokens=LOGPS.rejected_tokens)
    loss, _ = preference_loss(free, ["simpo"], beta=2.0, simpo_gamma=0.5, label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * logsig(6.5) - 0.2 * logsig(-6.5), abs=1e-6)


def test_rewards_are_of_summed_log_probs_whatever_the_loss_averages():
    """As TRL: β·(log π - log ref) over the whole reply, also where the loss itself averages per token
    (ipo, length_normalize); without a reference, β·(average log π) (SimPO's reward)."""
    for settings in ({"loss_type": ["ipo"], "beta": 0.1}, {"beta": 0.1, "length_normalize": True}):
        stats = scored(settings)[1]
        assert stats["rewards/chosen"] == pytest.approx(0.1 * 1.0) and stats["rewards/rejected"] == pytest.approx(0.1 * -0.5)
        assert stats["rewards/margins"] == pytest.approx(0.15) and stats["loss"] == pytest.approx(scored(settings)[0])
    stats = scored({"loss_type": ["simpo"], "beta": 2.0}, with_reference=False)[1]
    assert stats["rewards/chosen"] == pytest.approx(2.0 * -2.5) and stats["rewards/rejected"] == pytest.approx(2.0 * -6.0)


def test_the_training_step_keeps_the_sums_behind_trls_token_means():
    """Per pair: the entropy summed over both replies, each reply's summed mean logit, the chosen
    reply's top-1 hits, and each reply's token count (4 and 2), for means over all tokens later."""
    stats = scored({"beta": 0.1})[1]
    assert stats["sum/entropy"] == 13.0 and stats["sum/mean_token_accuracy"] == 3.0
    assert stats["sum/logits/chosen"] == pytest.approx(0.4) and stats["sum/logits/rejected"] == pytest.approx(-0.2)
    assert stats["tokens/chosen"] == 4 and stats["tokens/rejected"] == 2


@pytest.mark.parametrize("name, label_smoothing", [
    ("sigmoid", 0.0), ("robust", 0.2), ("hinge", 0.0), ("exo_pair", 1e-3), ("nca_pair", 0.0), ("bco_pair", 0.0),
    ("sppo_hard", 0.0), ("apo_zero", 0.0), ("apo_down", 0.0), ("discopop", 0.0), ("aot", 0.1), ("aot_unpaired", 0.0),
])
def test_each_loss_matches_trls_own_code(name, label_smoothing):
    """The loss block of the installed TRL's DPOTrainer (its bench extra; not installed in CI), run on
    the same per-pair log-probs (float64, six pairs): the same mean loss as dpokit's."""
    import types

    block = dpo_trainer_block("        loss = 0.0\n        for loss_type, loss_weight in zip(self.loss_types",
                              "            if self.use_weighting:", "its loss")
    block += "    loss += per_sequence_loss.mean() * loss_weight\n"

    generator = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, dtype=torch.float64, generator=generator) * 3 - 20 for _ in range(4))
    trainer = types.SimpleNamespace(loss_types=[name], loss_weights=[1.0], beta=0.3, label_smoothing=label_smoothing,
                                    args=types.SimpleNamespace(discopop_tau=0.05), use_weighting=False)
    scope = dict(self=trainer, torch=torch, F=torch.nn.functional, math=math, device="cpu", chosen_logps=pc,
                 rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr, chosen_logratios=pc - rc,
                 rejected_logratios=pr - rr, chosen_scores=pc - rc, rejected_scores=pr - rr, delta_score=(pc - rc) - (pr - rr))
    exec(block, scope)
    ours, _ = preference_loss(PairLogps(pc, pr, torch.ones(6), torch.ones(6), rc, rr), [name], beta=0.3,
                              label_smoothing=label_smoothing, discopop_tau=0.05)
    assert ours.mean().item() == pytest.approx(scope["loss"].item(), abs=1e-6)  # TRL takes exo_pair's ε in float32


def test_divergence_scores_by_hand_and_at_their_limits():
    """f'(e^x) of each divergence; α-divergence at α=0 is forward KL and near 1 reverse KL; a log-ratio
    past the exponent cap scores finite, with no gradient, rather than an infinite loss."""
    from dpokit.losses import divergence_score

    x = torch.tensor([-2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    assert divergence_score(x, "reverse_kl").tolist() == x.tolist()
    assert divergence_score(x, "forward_kl").tolist() == pytest.approx([1 - math.exp(-v) for v in x.tolist()], abs=1e-12)
    assert divergence_score(x, "js_divergence").tolist() == pytest.approx(
        [math.log(2 * math.exp(v) / (1 + math.exp(v))) for v in x.tolist()], abs=1e-12)
    assert divergence_score(x, "alpha_divergence", 0.3).tolist() == pytest.approx(
        [(math.exp(v) ** -0.7 - 1) / -0.7 for v in x.tolist()], abs=1e-12)
    assert divergence_score(x, "alpha_divergence", 0.0).tolist() == pytest.approx(divergence_score(x, "forward_kl").tolist())
    assert divergence_score(x, "alpha_divergence", 1.0).tolist() == x.tolist()
    assert divergence_score(x, "alpha_divergence", 1 - 1e-6).tolist() == pytest.approx(x.tolist(), abs=1e-5)
    assert divergence_score(torch.zeros(3), "js_divergence").tolist() == pytest.approx([0.0] * 3)  # f'(1) = 0 for each
    assert divergence_score(torch.zeros(3), "forward_kl").tolist() == [0.0] * 3

    far = torch.tensor([-200.0, -1.0], requires_grad=True)
    score = divergence_score(far, "forward_kl")
    score.sum().backward()
    assert score[0].item() == pytest.approx(-math.expm1(80.0), rel=1e-6) and math.isfinite(score[0].item())
    assert far.grad.tolist() == pytest.approx([0.0, math.exp(1.0)])  # d/dx (1 - e^-x) = e^-x, 0 past the cap
    with pytest.raises(ValueError, match="unknown f-divergence 'kl'"):
        divergence_score(x, "kl")


def test_a_loss_without_an_f_divergence_form_refuses_one():
    with pytest.raises(ValueError, match="loss 'nca_pair' has no f-divergence form"):
        preference_loss(LOGPS, ["nca_pair"], f_divergence_type="forward_kl")
    # sft reads no reference: it combines with any divergence, unchanged
    alone = preference_loss(LOGPS, ["sft"])[0].item()
    assert preference_loss(LOGPS, ["sigmoid", "sft"], f_divergence_type="forward_kl")[1]["loss/sft"].item() == alone


@pytest.mark.parametrize("name, label_smoothing", [
    ("sigmoid", 0.0), ("sigmoid_norm", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0), ("exo_pair", 1e-3),
    ("discopop", 0.0),
])
@pytest.mark.parametrize("divergence, alpha", [
    ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 0.2),
])
def test_each_f_divergence_matches_trls_own_code(name, label_smoothing, divergence, alpha):
    """TRL's f-divergence scores and loss block, from its installed DPOTrainer (skipped without TRL),
    on the same float32 log-probs (TRL's α-divergence caps exponents by dtype, float64 not among them)
    of six pairs with replies of 1 to 9 tokens: the same mean loss.
    TRL's sigmoid_norm is dpokit's sigmoid with length_normalize; TRL's ipo averages per token as
    dpokit's does by default."""
    import types

    block = dpo_trainer_block('        if self.f_divergence_type == "reverse_kl":', "            if self.use_weighting:",
                              "its f-divergences and loss")
    block += "    loss += per_sequence_loss.mean() * loss_weight\n"

    generator = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(6, generator=generator) * 0.8 - 20 for _ in range(4))
    tokens = torch.randint(1, 10, (12,), generator=generator)  # chosen replies' counts, then the rejected ones'
    completion_mask = (torch.arange(12)[None, :] < tokens[:, None]).long()
    trainer = types.SimpleNamespace(loss_types=[name], loss_weights=[1.0], beta=0.3, label_smoothing=label_smoothing,
                                    args=types.SimpleNamespace(discopop_tau=0.05), use_weighting=False,
                                    f_divergence_type=divergence, f_alpha_divergence_coef=alpha)
    scope = dict(self=trainer, torch=torch, F=torch.nn.functional, math=math, device="cpu", chosen_logps=pc,
                 rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr, chosen_logratios=pc - rc,
                 rejected_logratios=pr - rr, completion_mask=completion_mask)
    exec(block, scope)
    logps = PairLogps(pc, pr, tokens[:6].float(), tokens[6:].float(), rc, rr)
    ours, _ = preference_loss(logps, ["sigmoid" if name == "sigmoid_norm" else name], beta=0.3,
                              label_smoothing=label_smoothing, length_normalize=True if name == "sigmoid_norm" else None,
                              f_divergence_type=divergence, f_alpha_divergence_coef=alpha)
    assert ours.mean().item() == pytest.approx(scope["loss"].item(), abs=1e-6)


def test_wpo_weighs_each_loss_of_a_pair_by_its_replies_own_likelihood():
    """Through score_batch: the weight is exp(-2/4) · exp(-3/2) (WPO's column summed over the 4 chosen
    and 2 rejected tokens), it multiplies every loss of the pair, and is logged; no gradient flows
    through it."""
    weight = math.exp(-2 / 4 - 3 / 2)
    loss, stats = scored({"beta": 0.1, "use_weighting": True})
    assert loss == pytest.approx(weight * -logsig(0.15), rel=1e-6) and stats["wpo/weight"] == pytest.approx(weight)
    loss, stats = scored({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.2], "beta": 0.1, "use_weighting": True})
    assert loss == pytest.approx(weight * (-logsig(0.15) + 0.2 * 10 / 4), rel=1e-6)
    assert stats["loss/sft"] == pytest.approx(weight * 10 / 4, rel=1e-6)
    loss, stats = scored({"loss_type": ["simpo"], "beta": 2.0, "use_weighting": True}, with_reference=False)
    assert loss == pytest.approx(weight * -logsig(6.5), rel=1e-6)
    assert "wpo/weight" not in scored({"beta": 0.1})[1]

    from dpokit.losses import wpo_weights
    aligned = torch.tensor([-2.0], requires_grad=True)
    assert not wpo_weights(aligned, torch.tensor([4.0]), aligned, torch.tensor([0.0])).requires_grad
    assert wpo_weights(aligned, torch.tensor([4.0]), aligned, torch.tensor([0.0])).item() == pytest.approx(math.exp(-0.5 - 2))


def test_wpo_weights_match_trls_own_code():
    """TRL's WPO block, from its installed DPOTrainer (skipped without TRL), on per-token log-probs and
    log Σ p² of six pairs with replies of 1 to 9 tokens, against dpokit's weights of the same tokens'
    sums: the same weighted loss."""
    import types

    block = dpo_trainer_block("            if self.use_weighting:", "            loss += per_sequence_loss.mean() * loss_weight",
                              "WPO's weights")

    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, 10, (12,), generator=generator)  # chosen replies' counts, then the rejected ones'
    mask = (torch.arange(10)[None, :] < tokens[:, None]).long()  # [12, 10]: TRL's shifted completion mask
    per_token_logps = -torch.rand(12, 10, generator=generator, dtype=torch.float64) * 3
    log_sum_sq = -torch.rand(12, 10, generator=generator, dtype=torch.float64) * 2
    per_pair = torch.rand(6, dtype=torch.float64, generator=generator)
    scope = dict(self=types.SimpleNamespace(use_weighting=True), torch=torch, shift_completion_mask=mask, per_token_logps=per_token_logps,
                 outputs=types.SimpleNamespace(log_sum_sq_probs=log_sum_sq), seq_len=10, per_sequence_loss=per_pair.clone())
    exec(block, scope)

    from dpokit.losses import wpo_weights
    aligned = ((per_token_logps - log_sum_sq) * mask).sum(dim=1)
    ours = per_pair * wpo_weights(aligned[:6], tokens[:6].double(), aligned[6:], tokens[6:].double())
    torch.testing.assert_close(ours, scope["per_sequence_loss"], atol=1e-12, rtol=1e-12)
