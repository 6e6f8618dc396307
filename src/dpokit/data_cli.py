"""``dpokit data inspect`` and ``dpokit data convert``: see a dataset the way training sees it.

``inspect`` runs the real data path (:func:`dpokit.data.pipeline.prepare_source`, cache
included) on a config's datasets or on one dataset, with ``on_error=skip`` so every bad row is
counted, and prints the detected format, row counts, drops by reason, token length percentiles
before truncation, how many pairs exceed ``max_length``, and one rendered example with the
prompt/reply boundary visible (a dataset with no usable pair is reported whole, then the command
fails as training would). ``convert`` writes the normalized pairs as TRL-shaped JSON lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

INSPECT_EPILOG = """\
examples:
  dpokit data inspect data/pairs.jsonl
  dpokit data inspect Anthropic/hh-rlhf max_length=512 model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct
  dpokit data inspect my.yaml                       # every dataset of a training config
  dpokit data inspect rows.jsonl format=standard columns.prompt=question   # {"question", "chosen", "rejected"} rows
  dpokit data inspect HuggingFaceH4/ultrafeedback_binarized data.train.split=test_prefs

A dataset is tokenized with model.name_or_path's tokenizer (default: builtin:tiny-qwen2, whose
ChatML template matches Qwen's); pass your model's to see its real lengths.
"""

CONVERT_EPILOG = """\
examples:
  dpokit data convert hh.jsonl pairs.jsonl
  dpokit data convert PKU-Alignment/Align-Anything pairs.jsonl data.train.name=text-to-text
  dpokit data convert rows.csv pairs.jsonl columns="{prompt: question, chosen: good, rejected: bad}" on_error=skip

Conversational pairs are written as {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
(plus score_chosen/score_rejected when the data has them); plain-text pairs keep TRL's standard
shape {"prompt": "...", "chosen": "...", "rejected": "..."}.
"""


def add_parser(sub: Any) -> None:
    """Register ``dpokit data {inspect,convert}`` on the top-level subparsers ``sub``."""
    data = sub.add_parser(
        "data",
        help="inspect or convert a preference dataset",
        description="Look at a preference dataset the way training will, or write it in TRL's shape.",
    )
    commands = data.add_subparsers(dest="data_command", required=True, metavar="{inspect,convert}")
    inspect = commands.add_parser(
        "inspect",
        help="format, counts, drops, token lengths and a rendered example",
        description="Detected format, row counts, dropped rows by reason, token length percentiles, "
        "pairs over max_length, and one rendered example with the prompt/reply boundary.",
        epilog=INSPECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("source", help="a YAML config, or a dataset: .jsonl/.json/.parquet/.csv file, saved dataset folder or hub id")
    inspect.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_length=512 format=hh-rlhf")
    convert = commands.add_parser(
        "convert",
        help="write the normalized pairs as TRL-shaped JSON lines",
        description="Read any supported dataset shape and write its pairs in TRL's conversational shape.",
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("source", help="a dataset (file, saved folder or hub id), or a YAML config (its train datasets)")
    convert.add_argument("output", help="the .jsonl file to write")
    convert.add_argument("overrides", nargs="*", help="key=value overrides, e.g. format=sharegpt on_error=skip")


def run(args: argparse.Namespace, out: TextIO | None = None) -> None:
    """Run the ``data`` subcommand parsed into ``args``; output goes to ``out`` (stdout)."""
    out = out or sys.stdout
    if args.data_command == "inspect":
        inspect(args.source, args.overrides, out)
    else:
        convert(args.source, args.output, args.overrides, out)


def _config_for(source: str, overrides: list[str]):
    """A config file as it is, or a dataset path/id as ``data.train`` of an otherwise default config."""
    from dpokit.config import data_sources, load_config

    if source.endswith((".yaml", ".yml")):
        return load_config(source, overrides)
    config = load_config(None, [f"data.train.path={json.dumps(source)}", *overrides])
    data_sources(config.data.train)[0].path = source  # exactly as given, not as YAML reads it
    return config


# ----------------------------------------------------------------------------- inspect


def percentile(values: list[int], p: float) -> int:
    """Nearest-rank percentile of ``values`` (0 for none): the smallest value with ``p``% at or below it."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _boundary_marker(out: TextIO) -> str:
    try:
        "▌".encode(getattr(out, "encoding", None) or "utf-8")
        return "▌"
    except (UnicodeEncodeError, LookupError):
        return "|"


def _use_color(out: TextIO) -> bool:
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty()) and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


DIM, RESET, COLORS = "\x1b[2m", "\x1b[0m", {"chosen": "\x1b[1;32m", "rejected": "\x1b[1;31m"}


def render_example(pair, tokenizer, out: TextIO) -> list[str]:
    """Lines showing ``pair`` as the model sees it: prompt (not trained) then each reply (trained).

    On a terminal the prompt is dim and the reply coloured (ANSI codes); otherwise a ``▌``
    marks where the trained reply starts.
    """
    color = _use_color(out)
    marker = "" if color else _boundary_marker(out)
    prompt = tokenizer.decode(pair.prompt_ids, skip_special_tokens=False)
    lines = []
    for side, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        reply = tokenizer.decode(ids, skip_special_tokens=False)
        text = f"{DIM}{prompt}{RESET}{COLORS[side]}{reply}{RESET}" if color else f"{prompt}{marker}{reply}"
        lines.append(f"    {side} ({len(pair.prompt_ids)} prompt + {len(ids)} reply tokens):")
        lines += ["      " + line for line in text.split("\n")]
    return lines


def _source_report(label: str, source, stats, pairs, tokenizer, config, out: TextIO) -> list[str]:
    from dpokit.data.tokenize import TokenizeStats

    tok: TokenizeStats = stats.tokenize
    if stats.detected:
        how = "detected from the rows"
    else:  # a source's own format wins over data.format
        how = f"set by data.{label}.format" if source.format else "set by data.format"
    lines = [f"{label}: {stats.origin}", f"  format      {stats.format} ({how})"]
    lines.append(f"  rows        {stats.rows} read -> {tok.kept} pairs")
    lines.append("  dropped     " + (", ".join(f"{n} {reason}" for reason, n in stats.drops().items()) or "none"))
    if stats.problems:
        shown = len(stats.problems.examples)
        lines.append(f"  bad rows    {stats.problems.total} (the first {shown}):")
        lines += [f"    {message}" for message in stats.problems.examples]
        if config.on_error == "raise":
            lines.append("    with data.on_error=raise training stops at the first of these: fix them, or set data.on_error=skip")
    for note in stats.notes:
        lines.append(f"  note        {note}")
    lengths = tok.lengths
    lines.append(f"  tokens      {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}   (before truncation, {len(lengths)} pairs)")
    columns = {
        "prompt": [p for p, _, _ in lengths],
        "chosen": [c for _, c, _ in lengths],
        "rejected": [r for _, _, r in lengths],
        "pair": [p + max(c, r) for p, c, r in lengths],
    }
    for name, values in columns.items():
        cells = " ".join(f"{percentile(values, q):>7}" for q in (50, 90, 99, 100))
        lines.append(f"    {name:<9} {cells}" + ("   (prompt + longer reply)" if name == "pair" else ""))
    over = sum(1 for v in columns["pair"] if v > config.max_length)
    share = f" ({100 * over / len(lengths):.1f}%)" if lengths else ""
    fate = "dropped" if config.truncation == "drop" else tok.truncation_summary()
    lines.append(f"  over max_length ({config.max_length}): {over} of {len(lengths)} pairs{share}; truncation={config.truncation}: {fate}")
    if stats.cached:
        lines.append(f"  cache       {stats.cached}")
    if pairs:
        legend = "dim: prompt, not trained; colour: reply, trained" if _use_color(out) else f"{_boundary_marker(out)} marks where the trained reply starts"
        lines.append(f"  example     the first pair, as the model sees it ({legend}):")
        lines += render_example(pairs[0], tokenizer, out)
    return lines


def inspect(source: str, overrides: list[str], out: TextIO) -> None:
    """Print the report described in the module docstring for ``source`` (a config or a dataset)."""
    from dpokit.config import data_sources
    from dpokit.data.cache import tokenizer_fingerprint
    from dpokit.data.pipeline import prepare_source, weighted_count
    from dpokit.data.sources import DataError
    from dpokit.modeling import load_tokenizer

    config = _config_for(source, overrides)
    d = config.data
    tokenizer = load_tokenizer(config.model)
    default_model = not source.endswith((".yaml", ".yml")) and not any(o.split("=")[0].endswith("name_or_path") for o in overrides)
    hint = " (the default; set model.name_or_path=... for your model's)" if default_model else ""
    print(f"tokenizer: {config.model.name_or_path}{hint}", file=out)
    print(f"settings: max_length={d.max_length} truncation={d.truncation} on_error={d.on_error} "
          f"(inspect skips bad rows to show them all) system_prompt={d.system_prompt!r}"
          + (f" chat_template_kwargs={d.chat_template_kwargs!r}" if d.chat_template_kwargs else ""), file=out)
    scan = dataclasses.replace(d, on_error="skip")
    tokenizer_id = tokenizer_fingerprint(tokenizer) if d.cache else None
    counts, unusable = [], []
    for kind, sources in (("train", data_sources(d.train)), ("eval", data_sources(d.eval))):
        for i, src in enumerate(sources):
            label = kind if len(sources) == 1 else f"{kind}[{i}]"
            pairs, stats = prepare_source(src, scan, tokenizer, tokenizer_id, allow_empty=True)
            if kind == "train":
                counts.append((label, len(pairs), src.weight))
            if not pairs:
                unusable.append(f"{label} ({stats.origin})")
            print("", file=out)
            print("\n".join(_source_report(label, src, stats, pairs, tokenizer, d, out)), file=out)
    if len(counts) > 1 or any(w != 1 for _, _, w in counts):
        mix = ", ".join(f"{label} {n} x {w:g} -> {weighted_count(n, w)}" for label, n, w in counts)
        print(f"\nmix: {mix}; {sum(weighted_count(n, w) for _, n, w in counts)} train pairs", file=out)
    if d.eval is None and d.eval_fraction > 0:
        print(f"eval: {d.eval_fraction:g} of the train pairs are held out by seed before weighting", file=out)
    if unusable:
        raise DataError(f"no usable pair in {', '.join(unusable)}: training would stop there (the report above says why)")


# ----------------------------------------------------------------------------- convert


def trl_row(pair, template_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``pair`` in TRL's shape: message lists for conversational pairs, strings for plain text; its
    chat template variables (``template_kwargs``, ``data.chat_template_kwargs``, updated by the row's
    own) as the ``tools`` and ``chat_template_kwargs`` columns TRL reads."""
    row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, **(pair.meta or {})}
    variables = pair.template_variables(template_kwargs) if pair.is_chat else {}
    if "tools" in variables:
        row["tools"] = variables.pop("tools")
    if variables:
        row["chat_template_kwargs"] = variables
    return row


def convert(source: str, output: str, overrides: list[str], out: TextIO) -> None:
    """Write every pair of ``source`` (a dataset, or a config's train datasets) to ``output`` (.jsonl)."""
    from dpokit.config import ConfigError, data_sources
    from dpokit.data.formats import column_map, normalize
    from dpokit.data.sources import DataError, open_source

    target = Path(output)
    if target.suffix.lower() != ".jsonl":
        raise ConfigError(f"the output {output} must be a .jsonl file (one JSON pair per line)")
    config = _config_for(source, overrides)
    d = config.data
    written, kinds = [], set()
    for src in data_sources(d.train):
        opened = open_source(src)
        rows = opened.read(d.on_error)
        result = normalize(
            rows.rows, opened.origin, format=src.format or d.format,
            columns=column_map(src.columns if src.columns is not None else d.columns),
            system_prompt=d.system_prompt, on_error=d.on_error, lines=rows.lines,
        )
        kinds |= {p.is_chat for p in result.pairs}
        if len(kinds) > 1:
            raise DataError(f"{opened.origin}: the datasets mix plain-text and conversational pairs, which one file cannot hold; convert them one at a time")
        written += result.pairs
        drops = {**rows.problems.counts}
        for reason, n in result.dropped.items():
            drops[reason] = drops.get(reason, 0) + n
        dropped = ", ".join(f"{n} {reason}" for reason, n in drops.items()) or "none"
        print(f"{opened.origin}: {len(rows.rows) + rows.problems.total} rows -> {len(result.pairs)} pairs "
              f"(dropped: {dropped}); format {result.format}{' (detected)' if result.detected else ''}", file=out)
        problems = rows.problems
        problems.extend(result.problems)
        for message in problems.examples:
            print(f"  {message}", file=out)
    if not written:
        raise DataError(f"no usable pair in {source}: nothing to write to {output}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for pair in written:
                f.write(json.dumps(trl_row(pair, d.chat_template_kwargs), ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    shape = "TRL conversational: prompt/chosen/rejected message lists" if True in kinds else "TRL standard: prompt/chosen/rejected strings"
    print(f"wrote {len(written)} pairs to {output} ({shape})", file=out)
