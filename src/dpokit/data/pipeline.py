"""The data path in one call: sources -> formats -> tokenize (cached) -> mix -> train/eval split.

Each dataset (``data.train`` may list several) is read, normalized and tokenized on its own, or
loaded from the cache (:mod:`dpokit.data.cache`). Then, with no ``data.eval``, an
``eval_fraction`` of all train pairs is held out by seed, and each train source's remaining
pairs are weighted (:func:`weighted`) and concatenated in config order.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from dpokit.config import DataConfig, DataSource, data_sources
from dpokit.data import cache
from dpokit.data.formats import column_map, normalize
from dpokit.data.sources import DataError, Problems, open_source
from dpokit.data.tokenize import NO_CHAT_TEMPLATE, TokenizedPair, TokenizeStats, tokenize_pairs


@dataclass
class SourceStats:
    """What happened to one dataset: rows read, rows dropped by reason, tokenization counts."""

    origin: str
    rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows or pairs dropped per reason, except ``too_long`` and ``equal_tokens`` (in ``tokenize``)."""
    tokenize: TokenizeStats = field(default_factory=TokenizeStats)
    format: str = ""
    detected: bool = True
    problems: Problems = field(default_factory=Problems)
    """Bad rows skipped under ``data.on_error: skip``: counts per reason and the first messages."""
    notes: list[str] = field(default_factory=list)
    cached: str | None = None
    """The cache file the pairs came from, or None when they were tokenized in this run."""

    def drops(self) -> dict[str, int]:
        """Rows and pairs dropped per reason, those of tokenization (``too_long``, ``equal_tokens``) included."""
        return {**self.dropped, **self.tokenize.drops()}

    def summary(self) -> str:
        """One line of counts, e.g. ``train.jsonl: 100 rows -> 97 pairs (dropped: ...), 3 truncated; format standard (detected)``."""
        dropped = ", ".join(f"{n} {reason}" for reason, n in self.drops().items()) or "none"
        how = " (detected)" if self.detected else " (data.format)"
        cached = ", from cache" if self.cached else ""
        return (f"{self.origin}: {self.rows} rows -> {self.tokenize.kept} pairs (dropped: {dropped}), "
                f"{self.tokenize.truncation_summary()}; format {self.format}{how}{cached}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form without the per-pair lengths (the cache stores those apart)."""
        out = dataclasses.asdict(self)
        out["tokenize"].pop("lengths")
        out.pop("cached")
        return out

    @classmethod
    def from_dict(cls, info: dict[str, Any], lengths: list[tuple[int, int, int]]) -> SourceStats:
        info = dict(info)
        tok = dict(info.pop("tokenize"))
        tok_problems = Problems(**tok.pop("problems"))
        tokenize = TokenizeStats(**tok, problems=tok_problems, lengths=list(lengths))
        return cls(**{**info, "tokenize": tokenize, "problems": Problems(**info["problems"])})


@dataclass
class PreparedData:
    """Tokenized train pairs, eval pairs (None when there is no eval data) and per-source stats."""

    train: list[TokenizedPair]
    eval: list[TokenizedPair] | None
    stats: dict[str, SourceStats]
    """Keyed ``"train"`` and ``"eval"``, or ``"train[0]"``, ``"train[1]"``, ... for lists of sources."""
    eval_held_out: int = 0
    """Eval pairs split off the train data (``eval_fraction``); 0 when eval data was given or there is none."""


def _settings(source: DataSource, config: DataConfig) -> dict[str, Any]:
    """Everything besides the data and the tokenizer that changes the tokenized pairs."""
    return {
        "format": source.format or config.format,
        "columns": column_map(source.columns if source.columns is not None else config.columns),
        "system_prompt": config.system_prompt,
        "chat_template_kwargs": config.chat_template_kwargs,
        "max_length": config.max_length,
        "truncation": config.truncation,
    }


def prepare_source(
    source: DataSource, config: DataConfig, tokenizer: Any, tokenizer_id: str | None = None, allow_empty: bool = False
) -> tuple[list[TokenizedPair], SourceStats]:
    """Return the tokenized pairs of one dataset and its counts; :class:`DataError` if none survive
    (unless ``allow_empty``: ``dpokit data inspect`` reports such a dataset whole).

    With ``config.cache`` the result is read from, or written to, the cache;
    ``tokenizer_id`` (from :func:`dpokit.data.cache.tokenizer_fingerprint`) saves recomputing it.
    ``on_error`` is not part of the key: data without bad rows gives the same pairs either way,
    so an entry written under ``skip`` (``dpokit data inspect``) serves a ``raise`` run unless
    it skipped rows; then the data is read again, to stop at the first bad row.
    """
    opened = open_source(source)
    settings = _settings(source, config)
    key = None
    if config.cache:
        key = cache.cache_key(opened.identity, tokenizer_id or cache.tokenizer_fingerprint(tokenizer), settings)
        hit = cache.load(key)
        if hit is not None and (config.on_error == "skip" or not hit[1]["problems"]["counts"]):
            pairs, info, lengths = hit
            stats = SourceStats.from_dict(info, lengths)
            stats.origin, stats.cached = opened.origin, str(cache.cache_path(key))
            return pairs, stats
    rows = opened.read(config.on_error)
    result = normalize(
        rows.rows, opened.origin, format=settings["format"], columns=settings["columns"],
        system_prompt=config.system_prompt, on_error=config.on_error, lines=rows.lines,
    )
    try:
        tokenized, tstats = tokenize_pairs(result.pairs, tokenizer, config.max_length, config.truncation,
                                           config.num_proc, config.on_error, config.chat_template_kwargs)
    except DataError as e:
        if not str(e).startswith(NO_CHAT_TEMPLATE):
            raise
        plain = ("; for these transcripts, data.format=standard-implicit trains on them as plain text"
                 if result.format == "hh-rlhf" else "")
        raise DataError(f"{opened.origin} (format {result.format}): {e}{plain}") from None
    problems = Problems()
    dropped: dict[str, int] = {}
    for part in (rows.problems.counts, result.dropped, tstats.problems.counts):
        for reason, n in part.items():
            dropped[reason] = dropped.get(reason, 0) + n
    for part in (rows.problems, result.problems, tstats.problems):
        problems.extend(part)
    notes = []
    if config.system_prompt and result.pairs and not result.pairs[0].is_chat:
        notes.append(f"data.system_prompt is not used for {opened.origin}: its pairs are plain text ({result.format}), which has no roles")
    if config.chat_template_kwargs and result.pairs and not result.pairs[0].is_chat:
        notes.append(f"data.chat_template_kwargs is not used for {opened.origin}: its pairs are plain text ({result.format}), "
                     "which no chat template renders")
    if n := result.unused_system.get("plain_text"):
        notes.append(f"the 'system' column of {n} row(s) of {opened.origin} is not used: its pairs are plain text "
                     f"({result.format}), which has no roles; give the prompt as messages to train with a system message")
    if n := result.unused_system.get("system_prompt_own_message"):
        notes.append(f"data.system_prompt is not used for {n} pair(s) of {opened.origin}: their prompt starts with a "
                     "system message of its own, which is kept")
    if n := result.unused_system.get("own_system_message"):
        notes.append(f"the 'system' column of {n} row(s) of {opened.origin} is not used: their prompt starts with a "
                     "system message of its own, which is kept")
    stats = SourceStats(opened.origin, rows=len(rows.rows) + rows.problems.total, dropped=dropped, tokenize=tstats,
                        format=result.format, detected=result.detected, problems=problems, notes=notes)
    if not tokenized and not allow_empty:
        drops = stats.drops()
        hints = [f"the first bad row: {problems.examples[0]}"] if problems.examples else []
        if "chosen_equals_rejected" in drops:
            hints.append("check that chosen and rejected differ")
        if {"too_long", "equal_tokens"} & set(drops):
            hints.append("raise data.max_length" + (" or use data.truncation=truncate" if config.truncation == "drop" else ""))
        raise DataError(f"no usable pair in {stats.summary()}. " + "; ".join(hints))  # the summary starts with the origin
    if key is not None and tokenized:
        try:
            cache.save(key, tokenized, stats.to_dict(), tstats.lengths)
        except OSError as e:  # a read-only or full disk: the pairs are still here
            stats.notes.append(f"the tokenized pairs were not cached ({e}): set DPOKIT_CACHE to a writable folder, or data.cache=false")
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


def weighted_count(n: int, weight: float) -> int:
    """How many pairs a source of ``n`` pairs contributes at ``weight``: ``round(weight * n)``, at least 1."""
    return 0 if n == 0 else max(1, round(weight * n))


def weighted(items: list[Any], weight: float, seed: int, index: int) -> list[Any]:
    """``items`` used ``weighted_count(len(items), weight)`` times in all, deterministically by seed.

    The count is split into whole copies of ``items`` and a remainder: that many items drawn
    without replacement by ``(seed, index)`` (``index``: the source's place in the list),
    kept in their original order. Weight 1 returns ``items`` unchanged; 0.5 keeps a seeded
    half; 2.5 gives every item twice and a seeded half once more.
    """
    n = len(items)
    count = weighted_count(n, weight)
    if count == n:
        return list(items)
    whole, extra = divmod(count, n)
    picked = sorted(random.Random(seed * 1_000_003 + index).sample(range(n), extra))
    return list(items) * whole + [items[j] for j in picked]


def _log_source(log: Callable[[str], Any], label: str, stats: SourceStats) -> None:
    log(f"data: {label} {stats.summary()}")
    for note in stats.notes:
        log(f"data: note: {note}")
    if stats.problems:
        shown = len(stats.problems.examples)
        log(f"data: {label}: skipped {stats.problems.total} bad rows (data.on_error=skip); the first {shown}:")
        for message in stats.problems.examples:
            log(f"  {message}")


def load_data(config: DataConfig, tokenizer: Any, seed: int, log: Callable[[str], Any] = print) -> PreparedData:
    """Read, normalize and tokenize ``config.train`` (and ``config.eval``) into a :class:`PreparedData`.

    Without ``config.eval``, ``config.eval_fraction > 0`` splits eval pairs off the train pairs
    by ``seed`` (before weighting, so no eval pair is trained on); with neither, ``eval`` is None.
    Each source's pairs are then :func:`weighted` by its ``weight``. Logs one line of counts per
    dataset, the first few skipped rows, and the mix.
    """
    tokenizer_id = cache.tokenizer_fingerprint(tokenizer) if config.cache else None
    train_sources, eval_sources = data_sources(config.train), data_sources(config.eval)
    stats: dict[str, SourceStats] = {}

    def prepare(kind: str, sources: list[DataSource]) -> list[list[TokenizedPair]]:
        parts = []
        for i, source in enumerate(sources):
            label = kind if len(sources) == 1 else f"{kind}[{i}]"
            pairs, stats[label] = prepare_source(source, config, tokenizer, tokenizer_id)
            _log_source(log, label, stats[label])
            parts.append(pairs)
        return parts

    train_parts = prepare("train", train_sources)
    evaluation = None
    if eval_sources:
        eval_parts = prepare("eval", eval_sources)
        evaluation = [p for i, (s, part) in enumerate(zip(eval_sources, eval_parts)) for p in weighted(part, s.weight, seed, i)]
    elif config.eval_fraction > 0:
        tagged = [(i, pair) for i, part in enumerate(train_parts) for pair in part]
        kept, held = split_eval(tagged, config.eval_fraction, seed)
        evaluation = [pair for _, pair in held]
        train_parts = [[pair for j, pair in kept if j == i] for i in range(len(train_parts))]
        log(f"data: eval split off the train data: {len(evaluation)} pairs (eval_fraction={config.eval_fraction}, seed={seed}); {len(kept)} left to train")
    train: list[TokenizedPair] = []
    shares = []
    for i, (source, part) in enumerate(zip(train_sources, train_parts)):
        mixed = weighted(part, source.weight, seed, i)
        shares.append(f"{'train' if len(train_sources) == 1 else f'train[{i}]'} {len(part)} x {source.weight:g} -> {len(mixed)}")
        train.extend(mixed)
    if len(train_sources) > 1 or any(s.weight != 1 for s in train_sources):
        log(f"data: mix: {', '.join(shares)}; {len(train)} train pairs")
    held_out = len(evaluation) if evaluation is not None and not eval_sources else 0
    return PreparedData(train=train, eval=evaluation, stats=stats, eval_held_out=held_out)
