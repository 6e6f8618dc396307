"""A training micro-batch's forward never makes the host wait for the GPU, checked on the CPU.

On CUDA, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``nonzero``, a boolean
mask's indexing, ``repeat_interleave`` without its output size, ...) waits for every queued kernel,
so the host can no longer queue the next ones while the GPU works. Such reads are ATen ops, and a
dispatch mode sees them on CPU tensors too: this runs what ``tests/test_cuda.py``'s
``test_a_micro_batch_never_waits_for_the_gpu`` runs under torch's sync debug mode, on any machine.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpokit.data.batching import make_batch
from dpokit.logps import TOKEN_STATS, ReplyLogProbs, check_rows_kept_apart
from dpokit.masks import sequence_bounds
from dpokit.losses import PairLogps, preference_loss
from dpokit.metrics import token_sums
from dpokit.reference import TableReference
from dpokit.varlen import register_varlen_attention, varlen_rows
from flash_on_cpu import flash_on_cpu  # noqa: F401 (a fixture)
from test_logps import ragged_pairs, tiny_lm

HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero", "aten::equal",
              "aten::unique_consecutive", "aten::_unique2", "aten::unique_dim", "aten::bincount", "aten::histc",
              "aten::argwhere"}
"""ATen ops whose output size or value the host reads from the device (a CUDA synchronisation)."""


class HostReads(TorchDispatchMode):
    """Records every op that would make the host wait for a CUDA device, with where it was called."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket._qualified_op_name
        reads = name in HOST_READS
        if name == "aten::repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor"):
            reads = kwargs.get("output_size") is None  # its output size is read from the counts
        if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
            reads = any(i is not None and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else kwargs["indices"]))
        if reads:
            where = [f for f in traceback.extract_stack()[:-1] if "torch/" not in f.filename.replace("\\", "/")]
            self.found.append(f"{name} at {where[-1].filename}:{where[-1].lineno}" if where else name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("attn, layout", [("sdpa", "prefix_packed"), ("eager", "prefix_packed"),
                                          ("dpokit_varlen", "prefix_packed"), ("dpokit_varlen", "packed"),
                                          ("flash_attention_2", "packed")])
def test_a_training_forward_reads_nothing_back_from_the_device(attn, layout, request):
    """The batch's move, its reference log-probs, the policy's reply log-probs with the token
    statistics, and the loss: no op of theirs waits for the device. Not here: packed rows without
    prefix sharing under sdpa or eager, and padded rows, whose masks transformers builds, reading the
    position ids or the padding mask back (its code, not dpokit's); the default prefix-shared rows
    carry dpokit's own mask, and dpokit_varlen's regrouped rows need none. Under flash-attention
    (its kernels emulated on the CPU) packed rows bring their bounds, so no layer searches the
    position ids for them; transformers 5's mask builder still does once per forward, and finds
    nothing it uses: the one read allowed."""
    register_varlen_attention()
    if attn == "flash_attention_2":
        request.getfixturevalue("flash_on_cpu")
    model = tiny_lm("qwen2", seed=0, hidden_size=64).to(torch.bfloat16).train()
    model.config._attn_implementation = attn
    scorer = ReplyLogProbs(model, chunk_size=16, mask_packed_rows=check_rows_kept_apart(model, layout))
    batch = make_batch(ragged_pairs(seed=2, n=6), layout, row_tokens=80)
    if attn == "dpokit_varlen":
        batch.varlen = varlen_rows(batch.groups, batch.branches)  # as train.build_batch does, on the host
    if attn == "flash_attention_2":
        batch.varlen = sequence_bounds(batch.groups)
    watch = HostReads()
    with watch:
        batch = batch.to("cpu")
        ref = TableReference(torch.randn(6, 2)).logps(batch, list(range(6)))
        logps, stats = scorer(**batch.model_inputs(), token_stats=TOKEN_STATS)
        pairs = PairLogps(chosen=logps[0::2], rejected=logps[1::2], chosen_tokens=batch.seq_tokens[0::2].float(),
                          rejected_tokens=batch.seq_tokens[1::2].float(), ref_chosen=ref[0::2], ref_rejected=ref[1::2])
        loss, _ = preference_loss(pairs, ["sigmoid"], None, 0.1, 0.0, False, 0.0)
        token_sums(stats, batch.seq_tokens)
    if attn == "flash_attention_2":
        in_mask_builder = [f for f in watch.found if "transformers/masking_utils.py:" in f.replace("\\", "/")]
        assert len(in_mask_builder) <= 1
        watch.found = [f for f in watch.found if f not in in_mask_builder]
    assert watch.found == []
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_watch_sees_a_host_read():
    """The check above can fail: ``.item()``, a boolean mask and ``nonzero`` are each seen."""
    t = torch.arange(4.0)
    with HostReads() as watch:
        t.sum().item()
        t[t > 1]
        t.nonzero()
        torch.repeat_interleave(t.long())
    assert [f.split(" at ")[0] for f in watch.found] == ["aten::_local_scalar_dense", "aten::index", "aten::nonzero",
                                                         "aten::repeat_interleave"]
    assert all(f.endswith(tuple(f":{n}" for n in range(1, 10000))) and "test_host_sync.py" in f for f in watch.found)
