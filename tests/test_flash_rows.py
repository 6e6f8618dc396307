"""Packed rows under the flash-attention package's kernels (``attn_implementation: flash_attention_2``).

transformers finds packed sequences in the position ids only for a batch of one row; a micro-batch
packed into several rows would run each row as one causal sequence, its sequences seeing each other.
dpokit gives the kernel the sequences' bounds itself (:class:`dpokit.masks.SequenceBounds`). The
kernels are emulated on the CPU under transformers' real dispatch (``tests/flash_on_cpu.py``); the
GPU run with the flash-attn package is in ``tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from dpokit.config import ConfigError, is_flash_attention, load_config
from dpokit.data.batching import make_batch
from dpokit.logps import ReplyLogProbs, check_rows_kept_apart, check_window
from dpokit.masks import SequenceBounds, row_attention_inputs, sequence_bounds
from flash_on_cpu import flash_on_cpu  # noqa: F401 (a fixture)
from test_logps import naive_logps, ragged_pairs, tiny_lm

FLASH = "flash_attention_2"


def test_flash_attention_is_told_by_its_name():
    assert all(map(is_flash_attention, [FLASH, "flash_attention_3", "kernels-community/flash-attn2"]))
    assert not any(map(is_flash_attention, [None, "sdpa", "eager", "flex_attention", "dpokit_varlen"]))


def test_sequence_bounds_of_packed_rows_by_hand():
    """Two rows of width 6 laid end to end: each sequence starts where its group changes or its row
    begins (a sequence never runs on into the next row, even with the same group), and a row's
    padding (-1) is a sequence of its own."""
    groups = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 3, -1, -1]])
    bounds = sequence_bounds(groups)
    assert bounds.cu_seqlens.dtype == torch.int32 and bounds.cu_seqlens.tolist() == [0, 2, 5, 6, 9, 10, 12]
    assert bounds.max_seqlen == 3 and isinstance(bounds.max_seqlen, int)
    assert sequence_bounds(torch.tensor([[4, 4], [4, 4]])).cu_seqlens.tolist() == [0, 2, 4]
    inputs = row_attention_inputs(groups, None, FLASH, torch.float32, varlen=bounds)
    assert inputs.keys() == {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert inputs["cu_seq_lens_q"] is inputs["cu_seq_lens_k"] and inputs["max_length_q"] == inputs["max_length_k"] == 3
    with pytest.raises(ValueError, match="prefix_sharing=false"):
        row_attention_inputs(groups, torch.zeros_like(groups), FLASH, torch.float32)


@pytest.mark.parametrize("row_tokens", [None, 60], ids=["one-row", "several-rows"])
def test_packed_rows_under_flash_attention_match_naive(flash_on_cpu, row_tokens):
    """Log-probs and gradients of packed rows (ragged multi-turn pairs) equal the naive padded
    batch's within 1e-4, in one row or several, every attention call the varlen kernel with dpokit's
    bounds and its longest sequence a Python int. Without the bounds, several rows go wrong: what
    transformers alone computes there."""
    model, pairs = tiny_lm(), ragged_pairs(seed=3, n=6)
    naive = naive_logps(model, pairs)
    naive_grads = torch.autograd.grad(naive.sum(), list(model.parameters()))
    model.config._attn_implementation = FLASH
    assert check_rows_kept_apart(model, "packed") is True
    batch = make_batch(pairs, "packed", row_tokens=row_tokens)
    assert (batch.input_ids.shape[0] > 1) == (row_tokens is not None)
    batch.varlen = sequence_bounds(batch.groups)
    scorer = ReplyLogProbs(model, chunk_size=16, mask_packed_rows=True)  # its output-layer check runs forwards of its own
    flash_on_cpu.clear()
    logps = scorer(**batch.model_inputs())
    assert flash_on_cpu == ["varlen"] * model.config.num_hidden_layers
    torch.testing.assert_close(logps, naive, atol=1e-4, rtol=0)
    for ours, theirs in zip(torch.autograd.grad(logps.sum(), list(model.parameters())), naive_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    if row_tokens is not None:
        batch.varlen = None
        with torch.no_grad():
            alone = ReplyLogProbs(model, chunk_size=16)(**batch.model_inputs())  # position ids only
        assert (alone - naive).abs().max() > 1e-2
        assert set(flash_on_cpu[-model.config.num_hidden_layers:]) == {"dense"}


def test_the_scorer_builds_the_bounds_when_the_batch_brings_none(flash_on_cpu):
    model, pairs = tiny_lm(), ragged_pairs(seed=5, n=6)
    model.config._attn_implementation = FLASH
    batch = make_batch(pairs, "packed", row_tokens=50)
    with torch.no_grad():
        logps = ReplyLogProbs(model, chunk_size=16, mask_packed_rows=True)(**batch.model_inputs())
    torch.testing.assert_close(logps, naive_logps(model, pairs).detach(), atol=1e-4, rtol=0)


def test_row_check_refuses_a_model_that_drops_the_bounds(flash_on_cpu, monkeypatch):
    """A model whose forward does not pass the bounds on to its attention (as remote code with its
    own decoder may) would mix the sequences of every row past the first: refused, naming the fix.
    Two rows in the check, so transformers' own search of the position ids cannot hide it."""
    model = tiny_lm()
    model.config._attn_implementation = FLASH
    decoder_forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda *a, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                        max_length_k=None, **kw: decoder_forward(*a, **kw))
    with pytest.raises(ConfigError, match=r"does not pass the bounds .*cu_seq_lens.*set training.padding_free=false, "
                       "or attn_implementation to one of sdpa, eager, flex_attention, dpokit_varlen"):
        check_rows_kept_apart(model, "packed")


def test_row_check_refuses_a_model_whose_forward_takes_no_bounds(flash_on_cpu, monkeypatch):
    model = tiny_lm()
    model.config._attn_implementation = FLASH
    decoder_forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda input_ids=None, position_ids=None, attention_mask=None, use_cache=None:
                        decoder_forward(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask))
    with pytest.raises(ConfigError, match=r"does not take the bounds .*unexpected keyword.*padding_free=false"):
        check_rows_kept_apart(model, "packed")


def test_flash_attention_keeps_a_sliding_window_itself():
    """The kernel applies the model's window within each sequence, so packed rows need no windowed
    mask of dpokit's: nothing is refused, as it would be for a model needing dpokit's dense mask."""
    model = tiny_lm()
    model.config.sliding_window, model.config.use_sliding_window = 4, True
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    model.config._attn_implementation = FLASH
    assert check_window(model, "packed", True, max_length=64) is None
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ConfigError, match="attends within 4 tokens"):
        check_window(model, "packed", True, max_length=64)


def test_a_micro_batch_brings_its_bounds_under_flash_attention(tmp_path):
    """``build_batch`` makes the bounds on the host with the batch (no read back from the GPU in the
    forward), for packed rows under a flash-attention kernel only."""
    from dpokit.train import build_batch

    (tmp_path / "pairs.jsonl").write_text("")
    config = load_config(None, [f"train={tmp_path / 'pairs.jsonl'}", f"attn_implementation={FLASH}",
                                "prefix_sharing=false", "max_length=30"])
    pairs = ragged_pairs(seed=1, n=6)
    batch = build_batch(pairs, config, pad_id=0)
    assert batch.input_ids.shape[0] > 1 and isinstance(batch.varlen, SequenceBounds)
    assert torch.equal(batch.varlen.cu_seqlens, sequence_bounds(batch.groups).cu_seqlens)
    moved = batch.to("cpu")
    assert isinstance(moved.varlen, SequenceBounds) and moved.varlen.max_seqlen == batch.varlen.max_seqlen
    config.model.attn_implementation = "sdpa"
    assert build_batch(pairs, config, pad_id=0).varlen is None
    config.model.attn_implementation, config.training.padding_free = FLASH, False
    assert build_batch(pairs, config, pad_id=0).varlen is None  # padded rows: the padding mask says it
