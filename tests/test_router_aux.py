"""A mixture-of-experts model's load-balancing loss (``loss.router_aux_loss_coef``): in every batch
layout it equals the one the model's own forward gives on the naive padded batch, with the same
gradients, and a run adds it to its loss and logs it."""

from __future__ import annotations

import pytest
import torch

from dpokit.config import ConfigError
from dpokit.data.batching import LAYOUTS, make_batch
from dpokit.logps import ReplyLogProbs, check_rows_kept_apart, load_balancing_of
from test_architectures import save_tiny_model, tiny_model
from test_logps import ragged_pairs

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def naive_padded(pairs) -> dict:
    """The naive batch: one right-padded row per sequence (prompt + reply), with its attention mask."""
    seqs = [p.prompt_ids + reply for p in pairs for reply in (p.chosen_ids, p.rejected_ids)]
    width = max(map(len, seqs))
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, ids in enumerate(seqs):
        input_ids[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), 1
    return dict(input_ids=input_ids, attention_mask=mask)


def router_gradients(model, loss: torch.Tensor) -> list[torch.Tensor]:
    gates = [p for name, p in model.named_parameters() if ".gate." in name or name.endswith(".gate.weight")]
    assert gates, "no router weights found"
    return list(torch.autograd.grad(loss, gates))


@pytest.mark.parametrize("model_type", MOE)
def test_load_balancing_matches_the_models_own_on_the_padded_batch_in_every_layout(model_type):
    model, pairs = tiny_model(model_type), ragged_pairs(seed=2)
    naive = model(**naive_padded(pairs), output_router_logits=True, use_cache=False).aux_loss
    expected_grads = router_gradients(model, naive)
    for layout in LAYOUTS:
        scorer = ReplyLogProbs(model, chunk_size=7, mask_packed_rows=check_rows_kept_apart(model, layout))
        logps, aux = scorer(**make_batch(pairs, layout, row_tokens=60).model_inputs(), router_aux=True)
        assert logps.shape == (2 * len(pairs),)
        assert aux.item() == pytest.approx(naive.item(), rel=1e-5), f"{model_type} {layout}"
        for ours, theirs in zip(router_gradients(model, aux), expected_grads):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)


def test_a_dense_model_has_no_load_balancing_to_add():
    dense = tiny_model("qwen2")
    assert load_balancing_of(dense) is None and load_balancing_of(tiny_model("mixtral")) is not None
    with pytest.raises(ValueError, match="computes no load-balancing loss"):
        ReplyLogProbs(dense)(**make_batch(ragged_pairs(), "packed").model_inputs(), router_aux=True)
    with pytest.raises(ValueError, match="needs the chunked log-probs"):
        ReplyLogProbs(tiny_model("mixtral"), chunked=False)(**make_batch(ragged_pairs(), "packed").model_inputs(), router_aux=True)


def test_a_run_adds_the_weighted_load_balancing_loss_and_logs_it(workdir, tmp_path):
    """One pair per step: each row's loss is DPO's loss of its rewards plus 0.5 times its logged
    aux_loss, also with gradient checkpointing; a run without the setting logs none. A dense model
    with the setting is refused, naming it, and so is scoring through the full logits."""
    import math

    from dpokit.train import train
    from runs import run_config, train_rows

    model_dir = save_tiny_model("qwen2_moe", workdir, tmp_path)
    common = [f"model.name_or_path={model_dir}", "per_device_train_batch_size=1", "max_steps=3", "eval=null"]
    rows = train_rows(train(run_config(workdir, "moe-aux", *common, "router_aux_loss_coef=0.5")))
    assert len(rows) == 3
    for row in rows:
        dpo = math.log1p(math.exp(-(row["rewards/chosen"] - row["rewards/rejected"])))
        assert row["aux_loss"] > 0 and row["loss"] == pytest.approx(dpo + 0.5 * row["aux_loss"], rel=1e-4, abs=1e-6)
    checkpointed = train_rows(train(run_config(workdir, "moe-aux-gc", *common, "router_aux_loss_coef=0.5",
                                               "gradient_checkpointing=true")))
    for row, again in zip(rows, checkpointed, strict=True):  # router logits of recomputed layers: the same step
        for key in ("aux_loss", "loss", "grad_norm"):
            assert again[key] == pytest.approx(row[key], rel=1e-5), key
    assert "aux_loss" not in train_rows(train(run_config(workdir, "moe-no-aux", *common)))[0]
    with pytest.raises(ConfigError, match=r"router_aux_loss_coef=0.5 adds .* but Qwen2ForCausalLM .* has none"):
        train(run_config(workdir, "dense-aux", "router_aux_loss_coef=0.5", "max_steps=1"))
    with pytest.raises(ConfigError, match=r"full logits \(training.chunked_logps=false\): set chunked_logps=true"):
        train(run_config(workdir, "moe-aux-full", *common, "router_aux_loss_coef=0.5", "chunked_logps=false"))
