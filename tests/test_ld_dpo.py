"""LD-DPO (``loss.ld_alpha``): each reply's log-probs summed as its first min(|y_c|, |y_r|) tokens plus
α times the rest, in every batch layout, against the naive per-token computation and TRL's own code."""

import math

import pytest
import torch

from dpokit.data.batching import LAYOUTS, make_batch, past_shared_length
from dpokit.data.tokenize import TokenizedPair
from dpokit.logps import TOKEN_STATS, ReplyLogProbs
from test_logps import ragged_pairs, tiny_lm
from trl_code import dpo_trainer_block


def naive_token_logps(model, pairs: list[TokenizedPair]) -> list[torch.Tensor]:
    """Each reply's per-token log-probs (chosen, rejected interleaved), from the full logits of each
    sequence on its own."""
    out = []
    for p in pairs:
        for reply in (p.chosen_ids, p.rejected_ids):
            ids = torch.tensor([p.prompt_ids + reply])
            logits = model(input_ids=ids).logits[0, len(p.prompt_ids) - 1 : -1].float()
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(reply)[:, None])[:, 0])
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_tail_is_each_reply_past_its_pairs_shorter_reply(layout):
    pairs = ragged_pairs(n=6)
    batch = make_batch(pairs, layout, row_tokens=40)  # packed layouts: several rows, pairs out of order
    tail = past_shared_length(batch.seq_index, batch.seq_tokens)
    for seq in range(2 * len(pairs)):
        pair = pairs[seq // 2]
        shared = min(len(pair.chosen_ids), len(pair.rejected_ids))
        reply = pair.chosen_ids if seq % 2 == 0 else pair.rejected_ids
        assert tail[batch.seq_index == seq].tolist() == [i >= shared for i in range(len(reply))]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_sums_and_their_gradients_match_the_naive_per_token_ones(layout):
    """The scorer's two parts of each reply equal the naive sums over its first min(|y_c|, |y_r|)
    tokens and over the rest; ``ld_weighted`` weighs them, with the gradient of the naive weighted sum.
    The token statistics still cover every reply token."""
    model = tiny_lm("llama", tie=False)
    pairs = ragged_pairs()
    batch = make_batch(pairs, layout)
    batch.reply_tail, batch.ld_alpha = past_shared_length(batch.seq_index, batch.seq_tokens), 0.3
    scorer = ReplyLogProbs(model, chunk_size=7)
    parts, stats = scorer(**batch.model_inputs(), token_stats=TOKEN_STATS)
    naive = naive_token_logps(model, pairs)
    expected = []
    for seq, per_token in enumerate(naive):
        pair = pairs[seq // 2]
        shared = min(len(pair.chosen_ids), len(pair.rejected_ids))
        expected.append(torch.stack([per_token[:shared].sum(), per_token[shared:].sum()]))
    torch.testing.assert_close(parts, torch.stack(expected), atol=1e-4, rtol=0)
    unsplit = dict(batch.model_inputs(), reply_tail=None)
    torch.testing.assert_close(stats, scorer(**unsplit, token_stats=TOKEN_STATS)[1], atol=1e-5, rtol=0)

    weights = torch.linspace(-1, 1, 2 * len(pairs))
    ours = torch.autograd.grad((batch.ld_weighted(parts) * weights).sum(), model.lm_head.weight)[0]
    naive_weighted = sum(w * (e[0] + 0.3 * e[1]) for w, e in zip(weights, expected))
    theirs = torch.autograd.grad(naive_weighted, model.lm_head.weight)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
def test_ld_weighted_sums_match_trls_own_code(ld_alpha):
    """TRL's LD-DPO block, from its installed DPOTrainer (skipped without TRL), on per-token log-probs
    of six pairs laid out as TRL lays them ([chosen rows; rejected rows], right-padded), against
    dpokit's split sums of the same tokens, weighted."""
    import types

    block = dpo_trainer_block("        if self.ld_alpha is None:\n            logps = per_token_logps.sum(dim=1)",
                              "        chosen_logps, rejected_logps = logps.chunk(2, dim=0)", "LD-DPO's weighting")

    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 10, (12,), generator=generator)  # chosen replies, then rejected ones
    lengths[0] = lengths[6]  # a pair of equal lengths: no tail
    per_token = -torch.rand(12, 10, generator=generator, dtype=torch.float64) * 3
    mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
    scope = dict(self=types.SimpleNamespace(ld_alpha=ld_alpha), torch=torch, device="cpu",
                 per_token_logps=per_token * mask, shift_completion_mask=mask)
    exec(block, scope)

    pairs = [TokenizedPair([1, 2], [5] * int(lengths[i]), [6] * int(lengths[6 + i])) for i in range(6)]
    batch = make_batch(pairs, "packed")
    batch.reply_tail, batch.ld_alpha = past_shared_length(batch.seq_index, batch.seq_tokens), ld_alpha
    # each reply token's log-prob, in the batch's order: sequence 2i is TRL's row i, 2i + 1 its row 6 + i
    rows = torch.where(batch.seq_index % 2 == 0, batch.seq_index // 2, 6 + batch.seq_index // 2)
    assert batch.seq_index.diff().ge(0).all()  # one packed row, replies in order: positions count up per reply
    columns = torch.cat([torch.arange(int(n)) for n in torch.bincount(batch.seq_index, minlength=12)])
    values = per_token[rows, columns]
    parts = torch.zeros(24, dtype=torch.float64).index_add(0, 2 * batch.seq_index + batch.reply_tail.long(), values)
    ours = batch.ld_weighted(parts.view(12, 2))
    theirs = torch.stack(scope["logps"].chunk(2), dim=1).reshape(-1)  # interleaved as dpokit's
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


def test_the_losses_with_a_reference_read_the_weighted_sums_and_sft_the_plain_ones():
    """Through score_batch, the chosen reply's 4 tokens split 2 + 2 (the rejected has 2): its sum -10
    is -4 shared and -6 tail; α = 0.5 gives -7. The reference table (given, already weighted) -11 and
    -11.5: h = (-7 - -12) - (-11 - -11.5) = 4.5. sft reads the plain -10 over 4 tokens."""
    from dpokit.config import Config, LossConfig
    from dpokit.train import build_batch, score_batch

    pair = TokenizedPair(prompt_ids=[5, 6, 7], chosen_ids=[8, 9, 10, 2], rejected_ids=[11, 2])
    config = Config(loss=LossConfig(loss_type=["sigmoid", "sft"], beta=0.1, ld_alpha=0.5))
    batch = build_batch([pair], config, pad_id=0)
    assert batch.reply_tail.tolist() == [False, False, True, True, False, False]

    def policy(reply_tail, token_stats, **inputs):
        assert reply_tail is batch.reply_tail
        return torch.tensor([[-4.0, -6.0], [-12.0, 0.0]], requires_grad=True), torch.zeros(2, len(token_stats))

    loss, stats = score_batch(policy, torch.tensor([-11.0, -11.5]), batch, config)
    assert stats["loss/sigmoid"].item() == pytest.approx(math.log1p(math.exp(-0.45)), abs=1e-6)
    assert stats["loss/sft"].item() == pytest.approx(10 / 4)
    assert stats["logps/chosen"].item() == -7.0 and stats["rewards/chosen"].item() == pytest.approx(0.1 * (-7 - -11))
    assert build_batch([pair], Config(), pad_id=0).reply_tail is None


def test_a_run_with_ld_alpha_scores_its_reference_alike_and_caches_it_apart(workdir):
    """After a plain run, an LD-DPO run on the same model and data does not read the plain reference
    table: its first step's rewards are exactly 0 (policy and reference weighted alike), and each
    row's loss is DPO's loss of its rewards. Its metrics differ from the plain run's."""
    from runs import run_config, train_rows
    from dpokit.train import train

    common = ["per_device_train_batch_size=1", "max_steps=3", "eval=null", "beta=0.5", "logging_steps=1"]
    plain = train_rows(train(run_config(workdir, "plain", *common)))
    rows = train_rows(train(run_config(workdir, "ld", "ld_alpha=0.25", *common)))
    assert rows[0]["rewards/chosen"] == 0.0 and rows[0]["rewards/rejected"] == 0.0
    for row in rows:
        dpo = math.log1p(math.exp(-(row["rewards/chosen"] - row["rewards/rejected"])))
        assert row["loss"] == pytest.approx(dpo, rel=1e-4, abs=1e-7)
    assert len(rows) == len(plain) == 3
    assert any(r["logps/chosen"] != p["logps/chosen"] or r["logps/rejected"] != p["logps/rejected"] for r, p in zip(rows, plain))
