"""The data path in one call: sources -> formats -> tokenize -> train/eval split, with counts."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from dpokit.config import DataConfig, DataSource
from dpokit.data.formats import to_pairs
from dpokit.data.sources import DataError, describe, load_rows
from dpokit.data.tokenize import TokenizedPair, TokenizeStats, tokenize_pairs


@dataclass
class SourceStats:
    """What happened to one dataset: rows read, rows dropped by reason, tokenization counts."""

    origin: str
    rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokenize: TokenizeStats = field(default_factory=TokenizeStats)

    def summary(self) -> str:
        """Return one line of counts, e.g. ``train.jsonl: 100 rows -> 97 pairs (dropped: ...), 3 truncated``."""
        drops = dict(self.dropped)
        if self.tokenize.dropped_too_long:
            drops["too_long"] = self.tokenize.dropped_too_long
        dropped = ", ".join(f"{n} {reason}" for reason, n in drops.items()) or "none"
        return f"{self.origin}: {self.rows} rows -> {self.tokenize.kept} pairs (dropped: {dropped}), {self.tokenize.truncated} truncated"


@dataclass
class PreparedData:
    """Tokenized train pairs, eval pairs (None when there is no eval data) and per-source stats."""

    train: list[TokenizedPair]
    eval: list[TokenizedPair] | None
    stats: dict[str, SourceStats]
    """``"train"`` and, when ``data.eval`` is set, ``"eval"``."""


def prepare_source(source: DataSource, config: DataConfig, tokenizer: Any) -> tuple[list[TokenizedPair], SourceStats]:
    """Return the tokenized pairs of one dataset and its counts; :class:`DataError` if none survive."""
    origin = describe(source)
    rows = load_rows(source)
    pairs, dropped = to_pairs(rows, origin)
    tokenized, tstats = tokenize_pairs(pairs, tokenizer, config.max_length, config.truncation, config.num_proc)
    stats = SourceStats(origin, rows=len(rows), dropped=dropped, tokenize=tstats)
    if not tokenized:
        raise DataError(
            f"no usable pair in {origin}: {stats.summary()}. "
            "Check that chosen and rejected differ, or raise data.max_length / use data.truncation=truncate"
        )
    return tokenized, stats


def split_eval(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Return ``(train, eval)``: a ``seed``-determined ``fraction`` of ``items`` (at least one) held out.

    Both keep the original order. Raises :class:`DataError` when nothing would be left to train on.
    """
    n_eval = max(1, round(len(items) * fraction))
    if n_eval >= len(items):
        raise DataError(
            f"data.eval_fraction={fraction} of {len(items)} pairs leaves nothing to train on: "
            "lower data.eval_fraction, add data, or give a separate data.eval"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def load_data(config: DataConfig, tokenizer: Any, seed: int, log: Callable[[str], Any] = print) -> PreparedData:
    """Read, normalize and tokenize ``config.train`` (and ``config.eval``) into a :class:`PreparedData`.

    Without ``config.eval``, ``config.eval_fraction > 0`` splits eval pairs off the train pairs
    by ``seed``; with neither, ``eval`` is None. Logs one line of counts per dataset.
    """
    train, train_stats = prepare_source(config.train, config, tokenizer)
    stats = {"train": train_stats}
    log(f"data: train {train_stats.summary()}")
    evaluation = None
    if config.eval is not None:
        evaluation, stats["eval"] = prepare_source(config.eval, config, tokenizer)
        log(f"data: eval {stats['eval'].summary()}")
    elif config.eval_fraction > 0:
        train, evaluation = split_eval(train, config.eval_fraction, seed)
        log(f"data: eval split off the train data: {len(evaluation)} pairs (eval_fraction={config.eval_fraction}, seed={seed}); {len(train)} left to train")
    return PreparedData(train=train, eval=evaluation, stats=stats)
