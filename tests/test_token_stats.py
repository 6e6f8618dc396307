"""TRL's token statistics (entropy, mean logit, top-1 accuracy) from the engine equal the naive
computation (padded batch, full logits), and are logged as token means the way TRL logs them."""

import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig

from test_logps import VOCAB, ragged_pairs, tiny_lm
from dpokit.data.batching import LAYOUTS, make_batch
from dpokit.logps import TOKEN_STATS, WPO_TOKEN_STATS, ReplyLogProbs, token_logps, token_logps_and_statistics, token_statistics
from dpokit.metrics import token_means, token_sums


def naive_token_stats(model, pairs) -> torch.Tensor:
    """[2P, 4] per reply (chosen, rejected interleaved): entropy, mean logit, top-1 hits and WPO's
    log p(y_t) - log Σ_v p_v² summed over its tokens, from the full logits of each sequence on its own."""
    out = []
    for p in pairs:
        for reply in (p.chosen_ids, p.rejected_ids):
            ids = torch.tensor([p.prompt_ids + reply])
            logits = model(input_ids=ids).logits[0, len(p.prompt_ids) - 1 : -1].float()  # [reply, V]
            entropy = torch.distributions.Categorical(logits=logits).entropy()
            top1 = (logits.argmax(-1) == torch.tensor(reply)).float()
            probs = torch.softmax(logits.double(), -1)
            wpo = (probs.gather(1, torch.tensor(reply)[:, None])[:, 0].log() - (probs ** 2).sum(-1).log()).float()
            out.append(torch.stack([entropy.sum(), logits.mean(-1).sum(), top1.sum(), wpo.sum()]))
    return torch.stack(out)


def test_token_statistics_of_a_chunk_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -1.0, 3.0]])
    targets = torch.tensor([1, 3])
    stats = token_statistics(logits, targets)
    p = torch.softmax(logits[1], -1)
    assert stats[0].tolist() == pytest.approx([torch.log(torch.tensor(4.0)).item(), 0.0, 0.0])  # uniform: argmax is 0
    assert stats[1].tolist() == pytest.approx([-(p * p.log()).sum().item(), 1.0, 1.0])
    with_wpo = token_statistics(logits, targets, len(WPO_TOKEN_STATS))
    assert with_wpo[:, :3].tolist() == stats.tolist()
    # uniform: log(1/4) - log(4/16) = 0; else log p_3 - log Σ p²
    assert with_wpo[:, 3].tolist() == pytest.approx([0.0, (p[3].log() - (p ** 2).sum().log()).item()], abs=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunked, chunk_size", [(True, 7), (True, 1024), (False, 1024)])
@pytest.mark.parametrize("columns", [TOKEN_STATS, WPO_TOKEN_STATS])
def test_reply_token_statistics_match_naive(layout, chunked, chunk_size, columns):
    model = tiny_lm("llama", tie=False)
    pairs = ragged_pairs()
    batch = make_batch(pairs, layout)
    scorer = ReplyLogProbs(model, chunk_size, chunked=chunked)
    logps, stats = scorer(**batch.model_inputs(), token_stats=columns)
    torch.testing.assert_close(stats, naive_token_stats(model, pairs)[:, :len(columns)], atol=1e-4, rtol=0)
    torch.testing.assert_close(logps, scorer(**batch.model_inputs()), atol=0, rtol=0)  # the log-probs are unchanged


@pytest.mark.parametrize("columns", [TOKEN_STATS, WPO_TOKEN_STATS])
@pytest.mark.parametrize("softcap, bias", [(None, True), (3.0, False)])
def test_token_statistics_of_a_transformed_head_are_taken_once_in_training(softcap, bias, columns, monkeypatch):
    """The generic head path (bias, soft-capping) recomputes each chunk in backward: its statistics
    are those of the transformed logits, taken once, and its gradients are as without them."""
    import dpokit.logps

    torch.manual_seed(0)
    head = nn.Linear(16, VOCAB, bias=bias)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (23,))
    taken = []
    monkeypatch.setattr(dpokit.logps, "token_statistics", lambda logits, t, columns: taken.append(len(t)) or token_statistics(logits, t, columns))
    logps, stats = token_logps_and_statistics(hidden, head, targets, chunk_size=5, softcap=softcap, scale=0.5,
                                              stats=columns)
    (logps * torch.arange(23)).sum().backward()
    assert taken == [5, 5, 5, 5, 3]  # once per chunk of 5 rows, in the forward only
    grad = hidden.grad.clone()
    hidden.grad = None
    (token_logps(hidden, head, targets, chunk_size=5, softcap=softcap, scale=0.5) * torch.arange(23)).sum().backward()
    torch.testing.assert_close(hidden.grad, grad, atol=0, rtol=0)

    logits = head(hidden).detach() * 0.5
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    assert stats.shape == (23, len(columns))
    torch.testing.assert_close(stats, token_statistics(logits, targets, len(columns)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("columns", [TOKEN_STATS, WPO_TOKEN_STATS])
def test_statistics_of_the_plain_head_leave_its_gradients_as_they_were(columns):
    torch.manual_seed(1)
    head = nn.Linear(16, VOCAB, bias=False)
    hidden = torch.randn(19, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (19,))
    logps, stats = token_logps_and_statistics(hidden, head, targets, chunk_size=4, stats=columns)
    assert not stats.requires_grad and stats.shape == (19, len(columns))
    grads = torch.autograd.grad(logps.sum(), (hidden, head.weight))
    plain = torch.autograd.grad(token_logps(hidden, head, targets, chunk_size=4).sum(), (hidden, head.weight))
    for ours, theirs in zip(grads, plain):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    logits = hidden.detach() @ head.weight.detach().T
    torch.testing.assert_close(stats, token_statistics(logits, targets, len(columns)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="token statistics are"):
        token_logps_and_statistics(hidden, head, targets, stats=("entropy",))


def test_token_means_weigh_every_token_as_trl_does():
    """Two pairs: replies of 1 and 3 tokens (chosen), 2 and 2 (rejected). A mean per pair first would
    give the short reply's tokens more weight; TRL's means are over all tokens."""
    seq_stats = torch.tensor([
        [2.0, 1.0, 1.0], [4.0, -2.0, 0.0],  # pair 1: chosen (1 token), rejected (2 tokens)
        [6.0, 6.0, 0.0], [2.0, 0.0, 1.0],  # pair 2: chosen (3 tokens), rejected (2 tokens)
    ])
    sums = token_sums(seq_stats, torch.tensor([1, 2, 3, 2]))
    means = token_means({k: v.mean() for k, v in sums.items()} | {"loss": torch.tensor(0.5)})
    assert set(means) == {"loss", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}
    assert means["entropy"].item() == pytest.approx(14 / 8)
    assert means["logits/chosen"].item() == pytest.approx(7 / 4)
    assert means["logits/rejected"].item() == pytest.approx(-2 / 4)
    assert means["mean_token_accuracy"].item() == pytest.approx(1 / 4)  # the rejected reply's top-1 does not count
    assert means["loss"].item() == 0.5
    assert token_means({"loss": 0.5}) == {"loss": 0.5}  # nothing to turn into token means


def test_training_and_eval_rows_log_trls_token_means(tmp_path):
    """A run's rows carry the four token means, in train and eval rows, and none of the sums behind them;
    a random-weight model's entropy is near log(vocab)."""
    from runs import make_workdir, run_config, read_rows
    from dpokit.train import train

    workdir = make_workdir(tmp_path)
    config = run_config(workdir, "out", "max_steps=2", "eval_steps=2")
    train(config)
    rows = read_rows(workdir / "out")
    train_row = next(r for r in rows if "loss" in r)
    eval_row = next(r for r in rows if "eval/loss" in r)
    for key in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        assert key in train_row and f"eval/{key}" in eval_row
    assert not any(k.startswith(("sum/", "tokens/", "eval/sum/", "eval/tokens/")) for r in rows for k in r)
    vocab = AutoConfig.from_pretrained(workdir / "model").vocab_size
    assert 0 <= train_row["mean_token_accuracy"] <= 1 and 0 <= eval_row["eval/mean_token_accuracy"] <= 1
    assert 0.5 * math.log(vocab) < eval_row["eval/entropy"] <= math.log(vocab)


def test_the_chunked_logsumexp_takes_rows_with_minus_infinity_as_torch_does():
    """Logits of -inf (a vocabulary entry never predicted) leave the logsumexp finite; a row all -inf
    gives -inf, not NaN, as torch.logsumexp does. With statistics: the same logsumexp."""
    from dpokit.logps import _logsumexp_and_statistics

    inf = float("inf")
    logits = torch.tensor([[1.0, -inf, 2.0], [-inf, -inf, -inf], [0.5, 0.5, 0.5]])
    targets = torch.tensor([2, 0, 1])
    expected = torch.logsumexp(logits, -1)
    torch.testing.assert_close(_logsumexp_and_statistics(logits.clone(), targets, None), expected)
    stats = torch.empty(3, 3)
    torch.testing.assert_close(_logsumexp_and_statistics(logits.clone(), targets, stats), expected)
    p = torch.softmax(logits[0, [0, 2]], -1)
    assert stats[0, 0].item() == pytest.approx(-(p * p.log()).sum().item())  # -inf entries add no entropy
    assert stats[0, 2].item() == 1.0 and stats[2, 0].item() == pytest.approx(math.log(3))
    assert token_statistics(logits, targets)[0, 0].item() == pytest.approx(stats[0, 0].item())
    wpo = token_statistics(logits, targets, len(WPO_TOKEN_STATS))[:, 3]  # a -inf entry adds nothing to Σ p²
    assert wpo[0].item() == pytest.approx((p[1].log() - (p ** 2).sum().log()).item())
    assert wpo[2].item() == pytest.approx(0.0, abs=1e-6)
