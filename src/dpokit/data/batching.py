"""Micro-batches of tokenized pairs, and the order in which pairs are visited.

Layout (padded): pair ``i`` becomes two rows, ``2i`` = prompt + chosen and ``2i + 1`` =
prompt + rejected, right-padded to the longest row. Sequence ``2i`` is the chosen side of pair
``i`` and ``2i + 1`` the rejected side, in every layout, so the log-prob code and the losses never
care how rows were arranged. Only reply tokens are scored: for each, the batch records where the
hidden state predicting it sits (``pred_rows``, ``pred_cols``), the token (``targets``) and its
sequence (``seq_index``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dpokit.data.tokenize import TokenizedPair


@dataclass
class Batch:
    """One micro-batch of ``num_pairs`` pairs.

    input_ids, attention_mask, position_ids: [R, T]
    pred_rows, pred_cols, targets, seq_index: [N], one entry per reply token
    seq_tokens: [2 * num_pairs] reply tokens per sequence (chosen, rejected interleaved)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pred_rows: torch.Tensor
    pred_cols: torch.Tensor
    targets: torch.Tensor
    seq_index: torch.Tensor
    seq_tokens: torch.Tensor
    num_pairs: int
    num_real_tokens: int
    """Non-padding tokens in the batch (what the model really processed)."""

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
        )


def padded_batch(pairs: list[TokenizedPair], pad_token_id: int = 0) -> Batch:
    """Right-padded batch, two rows per pair (see module docstring)."""
    sequences = []
    for pair in pairs:
        sequences.append((pair.prompt_ids, pair.chosen_ids))
        sequences.append((pair.prompt_ids, pair.rejected_ids))
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    rows, cols, targets, seq_index, seq_tokens = [], [], [], [], []
    for s, (prompt, reply) in enumerate(sequences):
        ids = list(prompt) + list(reply)
        input_ids[s, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[s, : len(ids)] = 1
        # token at position j is predicted by the hidden state at j - 1
        start = len(prompt)
        rows += [s] * len(reply)
        cols += range(start - 1, start - 1 + len(reply))
        targets += reply
        seq_index += [s] * len(reply)
        seq_tokens.append(len(reply))
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pred_rows=torch.tensor(rows, dtype=torch.long),
        pred_cols=torch.tensor(cols, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        seq_index=torch.tensor(seq_index, dtype=torch.long),
        seq_tokens=torch.tensor(seq_tokens, dtype=torch.long),
        num_pairs=len(pairs),
        num_real_tokens=int(attention_mask.sum()),
    )


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
