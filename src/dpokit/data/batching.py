"""Micro-batches of tokenized pairs, in one of four exact layouts, and the order of pairs.

Every layout scores the same thing: sequence ``2i`` is the chosen side of pair ``i`` and
``2i + 1`` its rejected side, so the log-prob code and the losses never care how rows were
arranged. Only reply tokens are scored: for each, the batch records where the hidden state
predicting it sits (``pred_rows``, ``pred_cols``), the token (``targets``) and its sequence
(``seq_index``).

Layouts (``make_batch``):

``padded``         two rows per pair (prompt + chosen, prompt + rejected), right-padded; the naive
                   layout every other one is tested against.
``packed``         every sequence of the micro-batch back to back in one row, positions restarting
                   at 0 for each; no padding at all. Attention stays within a sequence because
                   transformers builds a block-diagonal mask from the restarting positions (and
                   flash-attention's varlen kernel reads the same positions); for a model that
                   ignores them, dpokit builds that mask from each token's sequence (``groups``).
``prefix_padded``  one row per pair: prompt once, then chosen, then rejected; rejected positions
                   restart after the prompt and rejected tokens cannot see chosen ones. The batch
                   carries each token's pair (``groups``) and part (``branches``: prompt, chosen,
                   rejected); :mod:`dpokit.masks` turns them into the mask on the model's device.
``prefix_packed``  the prefix-shared pairs back to back in one row.

Prefix sharing computes each prompt once instead of twice (Wang & Hegde 2024); packing removes
padding. The first rejected token is predicted by the last prompt token, exactly as in the padded
layout, because that hidden state only ever sees the prompt.
"""

from __future__ import annotations

import itertools
from array import array
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch

from dpokit.data.tokenize import TokenizedPair

if TYPE_CHECKING:
    from dpokit.masks import SequenceBounds
    from dpokit.varlen import VarlenRows

LAYOUTS = ("padded", "packed", "prefix_padded", "prefix_packed")


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``. To a CUDA device it goes through pinned memory without waiting: a
    copy from ordinary host memory waits for every kernel queued before it, so the host could not
    build and queue the next micro-batch while the GPU still runs the last."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class Batch:
    """One micro-batch of ``num_pairs`` pairs.

    input_ids, position_ids: [R, T]
    attention_mask: [R, T] of 0/1 (padded), or None (packed: positions mark the sequences;
        prefix-shared: ``groups`` and ``branches`` do)
    groups: [R, T] each token's pair (prefix-shared layouts) or sequence (packed), -1 for padding;
        None for the padded layout; see :mod:`dpokit.masks`
    branches: [R, T] for the prefix-shared layouts (0 prompt, 1 chosen, 2 rejected), else None
    pred_rows, pred_cols, targets, seq_index: [N], one entry per reply token
    seq_tokens: [2 * num_pairs] reply tokens per sequence (chosen, rejected interleaved)
    varlen: what a varlen kernel reads of the rows, built on the host with the batch: their
        regrouping for attn_implementation=dpokit_varlen (a :class:`dpokit.varlen.VarlenRows`),
        the packed rows' :class:`dpokit.masks.SequenceBounds` for a flash-attention kernel; or None
    reply_tail: [N] bool for LD-DPO (``ld_alpha`` set): whether each reply token lies past its
        pair's shared length (:func:`past_shared_length`); the scorer then sums each reply's two
        parts apart, and :meth:`ld_weighted` weighs them. None otherwise.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    pred_rows: torch.Tensor
    pred_cols: torch.Tensor
    targets: torch.Tensor
    seq_index: torch.Tensor
    seq_tokens: torch.Tensor
    num_pairs: int
    num_real_tokens: int
    """Non-padding tokens in the batch (what the model really processed)."""
    groups: torch.Tensor | None = None
    branches: torch.Tensor | None = None
    varlen: VarlenRows | SequenceBounds | None = None
    reply_tail: torch.Tensor | None = None
    ld_alpha: float = 1.0
    """LD-DPO's weight of the reply tokens past the pair's shared length (with ``reply_tail``)."""

    def to(self, device: torch.device | str) -> "Batch":
        """The batch with its tensors (and regrouping) on ``device`` (:func:`to_device`); counts stay as they are."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = to_device(value, device)
            elif value is not None and f.name == "varlen":
                value = value.to(device)  # VarlenRows, SequenceBounds: their tensors through to_device too
            moved[f.name] = value
        return Batch(**moved)

    def model_inputs(self) -> dict:
        """Keyword arguments for :class:`dpokit.logps.ReplyLogProbs`."""
        return dict(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            pred_rows=self.pred_rows,
            pred_cols=self.pred_cols,
            targets=self.targets,
            seq_index=self.seq_index,
            num_seqs=2 * self.num_pairs,
            groups=self.groups,
            branches=self.branches,
            varlen=self.varlen,
            reply_tail=self.reply_tail,
        )

    def ld_weighted(self, seq_logps: torch.Tensor) -> torch.Tensor:
        """The summed reply log-probs the losses with a reference read: the scorer's [2P] sums as
        they are; with ``reply_tail``, its [2P, 2] sums of each reply's shared part and tail, as
        shared + ``ld_alpha`` * tail (Liu et al. 2024, LD-DPO)."""
        if self.reply_tail is None:
            return seq_logps
        return seq_logps[:, 0] + self.ld_alpha * seq_logps[:, 1]


@dataclass
class _Row:
    """One row under construction, as spans of tokens. A span's tokens share a ``group`` and a
    ``branch``, which decide attention (a token sees earlier tokens of its own group whose branch
    is 0, the shared prompt, or its own; see :mod:`dpokit.masks`), and take consecutive positions."""

    spans: list[tuple[int, list[int], int, int, int]] = field(default_factory=list)
    """(first column, ids, first position, group, branch)"""
    scored: list[tuple[list[int], int, int, int]] = field(default_factory=list)
    """(reply ids, column of its first token, column that predicts that token, sequence)"""
    length: int = 0

    def extend(self, ids: list[int], start_pos: int, group: int, branch: int) -> int:
        """Append ``ids`` at positions ``start_pos..``; returns the column of the first one."""
        col = self.length
        self.spans.append((col, ids, start_pos, group, branch))
        self.length += len(ids)
        return col

    def score(self, reply: list[int], first_col: int, predictor_of_first: int, seq: int) -> None:
        """Record the reply tokens placed from ``first_col`` on; the first one is predicted by
        ``predictor_of_first``, each later one by the token before it."""
        self.scored.append((reply, first_col, predictor_of_first, seq))


def _add_sequence(row: _Row, prompt: list[int], reply: list[int], seq: int) -> None:
    prompt_col = row.extend(prompt, 0, group=seq, branch=0)
    reply_col = row.extend(reply, len(prompt), group=seq, branch=0)
    row.score(reply, reply_col, prompt_col + len(prompt) - 1, seq)


def _add_shared_pair(row: _Row, pair: TokenizedPair, index: int) -> None:
    p = len(pair.prompt_ids)
    last_prompt = row.extend(pair.prompt_ids, 0, group=index, branch=0) + p - 1
    chosen_col = row.extend(pair.chosen_ids, p, group=index, branch=1)
    rejected_col = row.extend(pair.rejected_ids, p, group=index, branch=2)
    row.score(pair.chosen_ids, chosen_col, last_prompt, 2 * index)
    row.score(pair.rejected_ids, rejected_col, last_prompt, 2 * index + 1)


def _concat(lists: list[list[int]]) -> torch.Tensor:
    """The lists back to back as one long tensor, in one C-level copy (``torch.tensor`` on a
    Python list costs several times more per element)."""
    flat = array("q", itertools.chain.from_iterable(lists))
    return torch.frombuffer(flat, dtype=torch.long) if flat else torch.zeros(0, dtype=torch.long)


def counting_runs(starts: list[int], lengths: torch.Tensor) -> torch.Tensor:
    """``start, start + 1, ...`` for each (start, length), back to back: [lengths.sum()] long."""
    offsets = torch.tensor(starts, dtype=torch.long) - (lengths.cumsum(0) - lengths)
    return torch.arange(int(lengths.sum())) + offsets.repeat_interleave(lengths)


def _assemble(rows: list[_Row], num_pairs: int, pad_token_id: int, layout: str) -> Batch:
    """The rows as right-padded [R, T] tensors, built span by span (no per-token Python)."""
    width = max(row.length for row in rows)
    spans = [(r * width + col, ids, pos, group, branch) for r, row in enumerate(rows) for col, ids, pos, group, branch in row.spans]
    lengths = torch.tensor([len(ids) for _, ids, *_ in spans], dtype=torch.long)
    where = counting_runs([flat for flat, *_ in spans], lengths)  # the flat index of every real token

    def laid_out(values: torch.Tensor, fill: int) -> torch.Tensor:  # [real tokens] -> [R, T]
        out = torch.full((len(rows) * width,), fill, dtype=torch.long)
        out[where] = values
        return out.view(len(rows), width)

    def per_span(column: int) -> torch.Tensor:  # one value per span, repeated over its tokens
        return torch.tensor([span[column] for span in spans], dtype=torch.long).repeat_interleave(lengths)

    scored = [(r, *item) for r, row in enumerate(rows) for item in row.scored]
    reply_lengths = torch.tensor([len(reply) for _, reply, *_ in scored], dtype=torch.long)
    pred_cols = counting_runs([first_col - 1 for _, _, first_col, _, _ in scored], reply_lengths)  # each token's predecessor
    firsts = (reply_lengths.cumsum(0) - reply_lengths)[reply_lengths > 0]
    pred_cols[firsts] = torch.tensor([pred for _, reply, _, pred, _ in scored if reply], dtype=torch.long)
    seq_index = torch.tensor([seq for *_, seq in scored], dtype=torch.long).repeat_interleave(reply_lengths)
    shared = layout.startswith("prefix")
    return Batch(
        input_ids=laid_out(_concat([ids for _, ids, *_ in spans]), pad_token_id),
        attention_mask=laid_out(torch.ones_like(where), 0) if layout == "padded" else None,
        position_ids=laid_out(counting_runs([pos for _, _, pos, _, _ in spans], lengths), 0),
        pred_rows=torch.tensor([r for r, *_ in scored], dtype=torch.long).repeat_interleave(reply_lengths),
        pred_cols=pred_cols,
        targets=_concat([reply for _, reply, *_ in scored]),
        seq_index=seq_index,
        seq_tokens=torch.bincount(seq_index, minlength=2 * num_pairs),
        num_pairs=num_pairs,
        num_real_tokens=int(lengths.sum()),
        groups=laid_out(per_span(3), -1) if layout != "padded" else None,
        branches=laid_out(per_span(4), 0) if shared else None,
    )


def past_shared_length(seq_index: torch.Tensor, seq_tokens: torch.Tensor) -> torch.Tensor:
    """Whether each reply token lies past its pair's shared length min(|y_c|, |y_r|): LD-DPO's
    verbose part of the longer reply. Each reply's tokens come consecutive and in order, as
    :func:`make_batch` lays them out. seq_index: [N], seq_tokens: [2P] -> [N] bool."""
    order = torch.arange(seq_index.numel(), device=seq_index.device)
    starts = torch.full_like(seq_tokens, seq_index.numel()).scatter_reduce(0, seq_index, order, "amin")
    shared = seq_tokens.view(-1, 2).amin(dim=1)  # [P]
    return order - starts[seq_index] >= shared[seq_index // 2]


def _pick_row(rows: list[_Row], length: int, row_tokens: int | None) -> _Row:
    """First row with room for ``length`` more tokens (``row_tokens`` None: one row for all)."""
    for row in rows:
        if row_tokens is None or row.length + length <= row_tokens:
            return row
    rows.append(_Row())
    return rows[-1]


def make_batch(
    pairs: list[TokenizedPair],
    layout: str = "padded",
    pad_token_id: int = 0,
    row_tokens: int | None = None,
) -> Batch:
    """A micro-batch of ``pairs`` in ``layout`` (see the module docstring).

    ``row_tokens``: for the packed layouts, start a new row rather than grow one past this many
    tokens (attention over a packed row costs its length squared); a longer sequence gets a row
    of its own. None packs everything in one row.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown batch layout {layout!r}; known: {', '.join(LAYOUTS)}")
    rows: list[_Row] = []
    if layout in ("padded", "packed"):
        for i, pair in enumerate(pairs):
            for side, reply in ((0, pair.chosen_ids), (1, pair.rejected_ids)):
                length = len(pair.prompt_ids) + len(reply)
                row = _pick_row(rows, length, row_tokens) if layout == "packed" else rows.append(_Row()) or rows[-1]
                _add_sequence(row, pair.prompt_ids, reply, 2 * i + side)
        return _assemble(rows, len(pairs), pad_token_id, layout)
    for i, pair in enumerate(pairs):
        length = len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
        row = _pick_row(rows, length, row_tokens) if layout == "prefix_packed" else rows.append(_Row()) or rows[-1]
        _add_shared_pair(row, pair, i)
    return _assemble(rows, len(pairs), pad_token_id, layout)


def padded_batch(pairs: list[TokenizedPair], pad_token_id: int = 0) -> Batch:
    """The naive layout: two right-padded rows per pair."""
    return make_batch(pairs, "padded", pad_token_id)


def epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    """The pair indices of one epoch, shuffled by (seed, epoch): the same on every process."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_pairs, generator=generator).tolist()


def global_batches(num_pairs: int, global_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch as a list of global batches (pair indices); the incomplete tail is dropped so
    every optimizer step averages over the same number of pairs."""
    order = epoch_order(num_pairs, seed, epoch)
    usable = len(order) - len(order) % global_batch_size
    return [order[i : i + global_batch_size] for i in range(0, usable, global_batch_size)]


def local_micro_batches(global_batch: list[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """This process's share of a global batch, split into micro-batches for accumulation.

    Global batch layout: ``accumulation steps x world_size x micro_batch_size``; micro-step ``k``
    of rank ``r`` takes the ``micro_batch_size`` pairs at offset ``(k * world_size + r) * micro``.
    Any world size with the same global batch sees the same pairs per optimizer step.
    """
    per_round = world_size * micro_batch_size
    out = []
    for offset in range(0, len(global_batch), per_round):
        start = offset + rank * micro_batch_size
        out.append(global_batch[start : start + micro_batch_size])
    return out


def first_epoch_micro_batches(num_pairs: int, global_batch_size: int, seed: int, rank: int, world_size: int,
                              micro_batch_size: int, rest_batch_size: int) -> list[list[int]]:
    """Every pair, once, in this process's micro-batches of the first epoch (as training takes them),
    then the pairs that epoch leaves out (its incomplete tail), striped over processes in batches of
    ``rest_batch_size``. Reference log-probs scored over these are, pair for pair, what scoring the
    first epoch's micro-batches gives: 16-bit compute rounds differently in other batches."""
    batches = [micro for batch in global_batches(num_pairs, global_batch_size, seed, 0)
               for micro in local_micro_batches(batch, rank, world_size, micro_batch_size)]
    order = epoch_order(num_pairs, seed, 0)
    left_out = order[len(order) - len(order) % global_batch_size:][rank::world_size]
    return batches + [left_out[i : i + rest_batch_size] for i in range(0, len(left_out), rest_batch_size)]


def eval_batches(num_pairs: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Evaluation pairs for this process, in order, striped over processes; nothing dropped."""
    mine = list(range(rank, num_pairs, world_size))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
