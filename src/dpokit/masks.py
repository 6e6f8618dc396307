"""Attention masks for rows that hold several sequences, built on the model's device at forward time.

A prefix-shared row holds, for each of its pairs, the prompt (branch 0), the chosen reply
(branch 1) and the rejected reply (branch 2), all tagged with the pair's group (its index in the
batch; -1 for padding). A token at column ``q`` sees the token at column ``kv`` when

    kv <= q  and  group[kv] == group[q]  and  (branch[kv] == 0 or branch[kv] == branch[q])

so replies see their own prompt and themselves, never the other reply or another pair. Padding
tokens (group -1) see earlier padding only, which keeps every query row non-empty.

Packed rows (each sequence its own group, no branches) get the same rule without the branch
term, a block-diagonal causal mask, for the few models that ignore where packed sequences restart
(see :func:`dpokit.logps.check_rows_kept_apart`); the others need no mask for them at all.

A model whose layers attend within a sliding window (Mistral, Gemma 2/3, gpt-oss, Cohere 2) gets
the window in the mask too: ``position[q] - position[kv] < window``, by position rather than by
column, so a rejected reply's window reaches back into its prompt as it would alone. Where some
layers slide and others see everything, the mask is a dict with one mask per layer type
(``{"full_attention": ..., "sliding_attention": ...}``), the form transformers' models take for
that (see :func:`dpokit.logps.mask_windows`).

The rule is written once (:func:`visible`) and given to attention in the form its kernel reads
(:func:`row_attention_inputs`): a dense additive ``[R, 1, T, T]`` mask for sdpa and eager, a
``BlockMask`` for flex_attention (which skips fully blocked 128 x 128 tiles, so memory and compute
follow the kept tokens), the rows regrouped into plain causal sequences for dpokit_varlen (see
:mod:`dpokit.varlen`).

The flash-attention package's kernels (``flash_attention_2``, ...) read only where each sequence
starts, which cannot say "not the chosen reply", so prefix sharing is refused with them. Packed rows
give them their sequences' bounds (:class:`SequenceBounds`, transformers' ``cu_seq_lens_q/k`` and
``max_length_q/k``), built on the host with the batch. Left to find the bounds in the position ids,
transformers does so only for a batch of one row (several rows would each run as one causal
sequence, letting a row's sequences see each other), and reads the device in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpokit.config import DENSE_MASK_ATTENTION, PREFIX_ATTENTION, VARLEN_ATTENTION, is_flash_attention
from dpokit.data.batching import to_device


Windows = int | dict[str, int | None] | None
"""A sliding window for every layer (int), one per layer type (None: that type sees everything), or none."""


def visible(groups: torch.Tensor, branches: torch.Tensor | None, row, q, kv,
            positions: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Whether query column ``q`` may attend to key column ``kv`` of ``row`` (broadcasts).

    groups: [R, T] long; branches: [R, T] long, or None for packed rows (no branches);
    positions: [R, T] position ids, read only with a sliding ``window``.
    """
    allowed = (kv <= q) & (groups[row, q] == groups[row, kv])
    if window is not None:
        allowed = allowed & (positions[row, q] - positions[row, kv] < window)
    if branches is None:
        return allowed
    b_q, b_kv = branches[row, q], branches[row, kv]
    return allowed & ((b_kv == 0) | (b_kv == b_q))


def dense_row_mask(groups: torch.Tensor, branches: torch.Tensor | None, dtype: torch.dtype,
                   positions: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Additive mask [R, 1, T, T] of ``dtype``: 0 where attention is allowed, dtype's min elsewhere."""
    rows, width = groups.shape
    cols = torch.arange(width, device=groups.device)
    row = torch.arange(rows, device=groups.device)[:, None, None]
    allowed = visible(groups, branches, row, cols[None, :, None], cols[None, None, :], positions, window)  # [R, T, T]
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=groups.device)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=groups.device), blocked)[:, None]


def flex_row_mask(groups: torch.Tensor, branches: torch.Tensor | None):
    """A flex_attention ``BlockMask`` for [R, T] ``groups``/``branches`` (same rule, all heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(groups, branches, b, q_idx, kv_idx)

    rows, width = groups.shape
    # Compiling the mask builder avoids materialising [R, T, T]; on the CPU (no-grad use only)
    # the eager builder is quicker than a compile.
    compile_builder = groups.device.type == "cuda"
    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=groups.device, _compile=compile_builder)


@dataclass
class SequenceBounds:
    """Where the sequences of packed ``[R, T]`` rows start with the rows laid end to end, as a
    flash-attention varlen kernel reads them.

    cu_seqlens: [S + 1] int32, the flat index (``row * T + col``) where each of the S sequences starts,
        then R * T; a row's padding is a sequence of its own
    max_seqlen: the longest sequence, a Python int (the kernel's argument, so never read from the device)
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int

    def to(self, device: torch.device | str) -> "SequenceBounds":
        return SequenceBounds(to_device(self.cu_seqlens, device), self.max_seqlen)


def sequence_bounds(groups: torch.Tensor) -> SequenceBounds:
    """The bounds of packed rows' sequences from ``groups`` [R, T] (each token's sequence, -1
    padding), on the host: rows on a GPU are copied back first, a synchronisation."""
    groups = groups.cpu()
    rows, width = groups.shape
    starts = torch.ones(rows, width, dtype=torch.bool)
    starts[:, 1:] = groups[:, 1:] != groups[:, :-1]
    cu = torch.cat([starts.reshape(-1).nonzero().squeeze(1), torch.tensor([rows * width])]).to(torch.int32)
    return SequenceBounds(cu, int(cu.diff().max()))


def row_attention_mask(groups: torch.Tensor, branches: torch.Tensor | None, attn_implementation: str | None, dtype: torch.dtype,
                       positions: torch.Tensor | None = None, windows: Windows = None):
    """The mask of the rows (prefix-shared, or packed when ``branches`` is None) in the form
    ``attn_implementation`` reads; with ``windows``, a dense mask (or one per layer type) that keeps
    each token within its layer's window of positions [R, T]."""
    if windows is not None and attn_implementation not in (*DENSE_MASK_ATTENTION, None):
        raise ValueError(f"dpokit's windowed row masks are dense, which {attn_implementation} does not read")
    if isinstance(windows, dict):
        return {kind: dense_row_mask(groups, branches, dtype, positions, window) for kind, window in windows.items()}
    if windows is not None:
        return dense_row_mask(groups, branches, dtype, positions, windows)
    if attn_implementation == "flex_attention":
        return flex_row_mask(groups, branches)
    if attn_implementation in DENSE_MASK_ATTENTION or attn_implementation is None:
        return dense_row_mask(groups, branches, dtype)
    raise ValueError(
        f"prefix-shared batches need one of {', '.join(PREFIX_ATTENTION)} attention, not {attn_implementation}: "
        "set training.prefix_sharing=false"
    )


def row_attention_inputs(groups: torch.Tensor, branches: torch.Tensor | None, attn_implementation: str | None, dtype: torch.dtype,
                         varlen=None, positions: torch.Tensor | None = None, windows: Windows = None) -> dict:
    """The model-forward keyword arguments that keep the rows' sequences apart under
    ``attn_implementation``: ``attention_mask`` (:func:`row_attention_mask`, windowed by
    ``windows`` over ``positions``), for dpokit_varlen the regrouped rows, for a flash-attention
    kernel the packed rows' :class:`SequenceBounds` (the kernel keeps the model's windows itself):
    ``varlen`` when the batch brings them (built on the host with it), else built here (on the host:
    rows on a GPU are copied back, a synchronisation) and moved to the rows' device."""
    if is_flash_attention(attn_implementation):
        if branches is not None:
            raise ValueError(f"{attn_implementation} reads only where sequences start, which cannot keep a prefix-shared "
                             "pair's replies apart: set training.prefix_sharing=false")
        bounds = (varlen if varlen is not None else sequence_bounds(groups)).to(groups.device)
        return {"cu_seq_lens_q": bounds.cu_seqlens, "cu_seq_lens_k": bounds.cu_seqlens,
                "max_length_q": bounds.max_seqlen, "max_length_k": bounds.max_seqlen}
    if attn_implementation == VARLEN_ATTENTION:
        from dpokit.varlen import varlen_rows

        rows, width = groups.shape
        # a 4D stand-in (a view, no memory) that transformers passes through as given: without one it looks
        # for packed sequences in the position ids, a host synchronisation, and builds a mask nothing reads
        unused = torch.ones((), dtype=torch.bool, device=groups.device).expand(rows, 1, width, width)
        return {"dpokit_varlen": (varlen if varlen is not None else varlen_rows(groups, branches)).to(groups.device),
                "attention_mask": unused}
    return {"attention_mask": row_attention_mask(groups, branches, attn_implementation, dtype, positions, windows)}
