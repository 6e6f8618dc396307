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

from dataclasses import dataclass, field, fields

import torch

from dpokit.data.tokenize import TokenizedPair

LAYOUTS = ("padded", "packed", "prefix_padded", "prefix_packed")

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

    def to(self, device: torch.device | str) -> "Batch":
        moved = {
            f.name: (getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name))
            for f in fields(self)
        }
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
        )


@dataclass
class _Row:
    """One row under construction. ``group``/``branch`` per token decide attention: a token sees
    earlier tokens of its own group whose branch is 0 (shared prompt) or its own branch."""

    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    group: list[int] = field(default_factory=list)
    branch: list[int] = field(default_factory=list)
    pred_cols: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    seq_index: list[int] = field(default_factory=list)

    def extend(self, ids: list[int], start_pos: int, group: int, branch: int) -> int:
        """Append ``ids`` at positions ``start_pos..``; returns the column of the first one."""
        col = len(self.ids)
        self.ids += ids
        self.pos += range(start_pos, start_pos + len(ids))
        self.group += [group] * len(ids)
        self.branch += [branch] * len(ids)
        return col

    def score(self, reply: list[int], first_col: int, predictor_of_first: int, seq: int) -> None:
        """Record the reply tokens placed from ``first_col`` on; the first one is predicted by
        ``predictor_of_first``, each later one by the token before it."""
        self.pred_cols += [predictor_of_first] + list(range(first_col, first_col + len(reply) - 1))
        self.targets += reply
        self.seq_index += [seq] * len(reply)


def _add_sequence(row: _Row, prompt: list[int], reply: list[int], seq: int) -> None:
    prompt_col = row.extend(list(prompt), 0, group=seq, branch=0)
    reply_col = row.extend(list(reply), len(prompt), group=seq, branch=0)
    row.score(list(reply), reply_col, prompt_col + len(prompt) - 1, seq)


def _add_shared_pair(row: _Row, pair: TokenizedPair, index: int) -> None:
    p = len(pair.prompt_ids)
    last_prompt = row.extend(list(pair.prompt_ids), 0, group=index, branch=0) + p - 1
    chosen_col = row.extend(list(pair.chosen_ids), p, group=index, branch=1)
    rejected_col = row.extend(list(pair.rejected_ids), p, group=index, branch=2)
    row.score(list(pair.chosen_ids), chosen_col, last_prompt, 2 * index)
    row.score(list(pair.rejected_ids), rejected_col, last_prompt, 2 * index + 1)


def _assemble(rows: list[_Row], num_pairs: int, pad_token_id: int, layout: str) -> Batch:
    width = max(len(row.ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    groups = torch.full((len(rows), width), -1, dtype=torch.long)
    branches = torch.zeros((len(rows), width), dtype=torch.long)
    pred_rows, seq_tokens = [], [0] * (2 * num_pairs)
    for r, row in enumerate(rows):
        input_ids[r, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
        position_ids[r, : len(row.pos)] = torch.tensor(row.pos, dtype=torch.long)
        real[r, : len(row.ids)] = 1
        groups[r, : len(row.group)] = torch.tensor(row.group, dtype=torch.long)
        branches[r, : len(row.branch)] = torch.tensor(row.branch, dtype=torch.long)
        pred_rows += [r] * len(row.targets)
        for seq in row.seq_index:
            seq_tokens[seq] += 1
    shared = layout.startswith("prefix")
    return Batch(
        input_ids=input_ids,
        attention_mask=real if layout == "padded" else None,
        position_ids=position_ids,
        pred_rows=torch.tensor(pred_rows, dtype=torch.long),
        pred_cols=torch.tensor([c for row in rows for c in row.pred_cols], dtype=torch.long),
        targets=torch.tensor([t for row in rows for t in row.targets], dtype=torch.long),
        seq_index=torch.tensor([s for row in rows for s in row.seq_index], dtype=torch.long),
        seq_tokens=torch.tensor(seq_tokens, dtype=torch.long),
        num_pairs=num_pairs,
        num_real_tokens=int(real.sum()),
        groups=groups if layout != "padded" else None,
        branches=branches if shared else None,
    )


def _pick_row(rows: list[_Row], length: int, row_tokens: int | None) -> _Row:
    """First row with room for ``length`` more tokens (``row_tokens`` None: one row for all)."""
    for row in rows:
        if row_tokens is None or len(row.ids) + length <= row_tokens:
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


def eval_batches(num_pairs: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Evaluation pairs for this process, in order, striped over processes; nothing dropped."""
    mine = list(range(rank, num_pairs, world_size))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
