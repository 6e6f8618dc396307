"""Plots and the end-of-run summary, read from a run's ``metrics.jsonl``.

A run logs one JSON object per line. Train rows carry TRL-named metrics (``loss``,
``rewards/accuracies``, ``learning_rate``, ...); eval rows carry ``step``, ``epoch`` and
the same names under an ``eval/`` prefix. Any key may be missing from any row.

    rows = read_metrics(run_dir / "metrics.jsonl")
    write_plots(rows, run_dir / "plots")     # loss.png, overview.png, ...
    print(summarize(rows, run_dir))

Plotting uses ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot, no
global backend switch, safe to call from a training process or a notebook.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

EVAL_PREFIX = "eval/"
DPI = 110
SMOOTH_MIN_POINTS = 20  # smooth train curves only when there are more points than this
UNSMOOTHED = {"learning_rate"}  # schedules are exact: never smoothed

TRAIN_COLOR = "#1f77b4"
EVAL_COLOR = "#d62728"
# chosen/rejected chart: four distinct colours
CHOSEN_COLOR = "#2ca02c"
REJECTED_COLOR = "#9467bd"
EVAL_CHOSEN_COLOR = "#17becf"
EVAL_REJECTED_COLOR = "#ff7f0e"


# ---------------------------------------------------------------------------- reading


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read ``metrics.jsonl`` into a list of dicts, in file order.

    Blank lines are skipped. A line that is not a JSON object is dropped: silently when
    it is the last line (a run killed mid-write), with a warning anywhere else (a resumed
    run appending after a torn line). A missing file raises ``FileNotFoundError``.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows: list[dict] = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif k != len(numbered) - 1:
            warnings.warn(f"{path}:{lineno}: not a JSON object, line skipped", stacklevel=2)
    return rows


# ---------------------------------------------------------------------------- series


def _number(v) -> float | None:
    """``v`` as a finite float, or None (missing, NaN, inf, bool, string...)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _is_eval(row: dict) -> bool:
    return any(k.startswith(EVAL_PREFIX) for k in row)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) for ``key``, sorted by step.

    Rows without a numeric step or value are skipped. When a step appears twice (a run
    resumed from an earlier checkpoint logs those steps again) the later row wins.
    """
    by_step: dict[float, float] = {}
    for row in rows:
        step, value = _number(row.get("step")), _number(row.get(key))
        if step is not None and value is not None:
            by_step[step] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _centered_mean(values: list[float], half: int) -> list[float]:
    """Each value replaced by the mean of the ``half`` values either side of it and itself (fewer at
    the ends): smooth, and level with the logged values, where a trailing average lags behind them."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def smoothing_half_width(points: int) -> int:
    """How many rows either side a train curve of ``points`` rows is averaged over."""
    return max(2, points // 40)


# ---------------------------------------------------------------------------- plotting

# A chart: file stem, title, y label, and its lines as (metric key, label, colour).
# Keys starting with "eval/" are drawn as markers + dashed line; others as train curves.
_LOSS = ("loss", "Loss", "loss",
         [("loss", "train", TRAIN_COLOR), ("eval/loss", "eval", EVAL_COLOR)])
_ACC = ("rewards_accuracies", "Preference accuracy", "rewards/accuracies",
        [("rewards/accuracies", "train", TRAIN_COLOR),
         ("eval/rewards/accuracies", "eval", EVAL_COLOR)])
_MARGINS = ("rewards_margins", "Reward margin (chosen - rejected)", "rewards/margins",
            [("rewards/margins", "train", TRAIN_COLOR),
             ("eval/rewards/margins", "eval", EVAL_COLOR)])
_CHOSEN_REJECTED = ("rewards_chosen_rejected", "Rewards: chosen vs rejected", "reward",
                    [("rewards/chosen", "train chosen", CHOSEN_COLOR),
                     ("rewards/rejected", "train rejected", REJECTED_COLOR),
                     ("eval/rewards/chosen", "eval chosen", EVAL_CHOSEN_COLOR),
                     ("eval/rewards/rejected", "eval rejected", EVAL_REJECTED_COLOR)])
_LOGPS = ("logps_chosen_rejected", "Policy log-probs of the replies (summed over tokens)", "log-prob",
          [("logps/chosen", "train chosen", CHOSEN_COLOR),
           ("logps/rejected", "train rejected", REJECTED_COLOR),
           ("eval/logps/chosen", "eval chosen", EVAL_CHOSEN_COLOR),
           ("eval/logps/rejected", "eval rejected", EVAL_REJECTED_COLOR)])
_ENTROPY = ("entropy", "Entropy of the next-token distribution (mean over reply tokens)", "entropy (nats)",
            [("entropy", "train", TRAIN_COLOR), ("eval/entropy", "eval", EVAL_COLOR)])
_LR = ("learning_rate", "Learning rate", "learning rate",
       [("learning_rate", "train", TRAIN_COLOR)])
_GRAD = ("grad_norm", "Gradient norm (before clipping)", "grad norm",
         [("grad_norm", "train", TRAIN_COLOR)])

CHARTS = [_LOSS, _ACC, _MARGINS, _CHOSEN_REJECTED, _LOGPS, _ENTROPY, _LR, _GRAD]
OVERVIEW = [_LOSS, _ACC, _MARGINS, _CHOSEN_REJECTED]


def _non_finite_marks(rows: list[dict], lines) -> list[tuple[str, float]]:
    """(label, step) for each of a chart's lines whose last logged values are NaN or inf (a diverged
    run): its finite values are drawn up to there, and the step gets a mark."""
    return [(label, step) for key, label, _ in lines if (step := non_finite_since(key, rows)) is not None]


def _chart_data(train_rows, eval_rows, lines):
    """[(key, label, colour, steps, values)] for the lines of a chart that have data."""
    out = []
    for key, label, color in lines:
        steps, values = _series(eval_rows if key.startswith(EVAL_PREFIX) else train_rows, key)
        if steps:
            out.append((key, label, color, steps, values))
    return out


def _draw(ax, title, ylabel, data, marks=()):
    """Draw one chart's lines on ``ax``; train faint as logged + a centered mean (both in the legend),
    eval markers + line; ``marks``: (label, step) of lines that stopped being finite
    (:func:`_non_finite_marks`), a dotted line each, their labels one under another."""
    for key, label, color, steps, values in data:
        if key.startswith(EVAL_PREFIX):
            ax.plot(steps, values, color=color, linestyle="--", linewidth=1.4,
                    marker="o", markersize=4, label=label, zorder=3)
        elif key not in UNSMOOTHED and len(values) > SMOOTH_MIN_POINTS:
            half = smoothing_half_width(len(values))
            ax.plot(steps, values, color=color, linewidth=0.8, alpha=0.3, zorder=1, label=f"{label} (logged)")
            ax.plot(steps, _centered_mean(values, half), color=color, linewidth=1.6,
                    label=f"{label} (mean of {2 * half + 1} rows)", zorder=2)
        else:  # a marker where a line alone would not show (one logged row)
            ax.plot(steps, values, color=color, linewidth=1.6, label=label, zorder=2,
                    marker="o" if len(values) == 1 else None, markersize=4)
    for k, (label, step) in enumerate(marks):
        ax.axvline(step, color="#d62728", linestyle=":", linewidth=1.2, zorder=4)
        ax.annotate(f"{label}: non-finite from step {_fmt(step)}", (step, 0.98 - 0.06 * k), xycoords=("data", "axes fraction"),
                    ha="right", va="top", fontsize=8, color="#d62728")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(ax.get_legend_handles_labels()[1]) > 1 or any(k.startswith(EVAL_PREFIX) for k, *_ in data):
        ax.legend(loc="best", fontsize=8, framealpha=0.8)


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    """Write the figure atomically (temp file + rename), so a reader never sees half a PNG."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)


def write_plots(rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """Write PNG charts of ``rows`` into ``out_dir`` (created) and return their paths.

    Charts, each against step, train and eval on the same axes: ``loss.png``,
    ``rewards_accuracies.png``, ``rewards_margins.png``, ``rewards_chosen_rejected.png``,
    ``logps_chosen_rejected.png`` (both falling together is the likelihood drop DPO is known for),
    ``entropy.png`` (a falling entropy: a policy growing more certain), ``learning_rate.png``,
    ``grad_norm.png``, and ``overview.png`` (2x2 of the first four). A chart with no data is
    skipped (overview: when none of its panels has data); with no chart at all nothing is written,
    the folder not even made.
    """
    out_dir = Path(out_dir)  # created with its first chart
    train_rows = [r for r in rows if not _is_eval(r)]
    eval_rows = [r for r in rows if _is_eval(r)]

    written: list[Path] = []
    for stem, title, ylabel, lines in CHARTS:
        data, marks = _chart_data(train_rows, eval_rows, lines), _non_finite_marks(rows, lines)
        if not data and not marks:
            continue
        fig = _new_figure((7.0, 4.2))
        _draw(fig.add_subplot(1, 1, 1), title, ylabel, data, marks)
        path = out_dir / f"{stem}.png"
        _save(fig, path)
        written.append(path)

    panels = [(c, _chart_data(train_rows, eval_rows, c[3]), _non_finite_marks(rows, c[3])) for c in OVERVIEW]
    if any(data or marks for _, data, marks in panels):
        fig = _new_figure((12.0, 8.0))
        for i, ((_, title, ylabel, _), data, marks) in enumerate(panels):
            ax = fig.add_subplot(2, 2, i + 1)
            if data or marks:
                _draw(ax, title, ylabel, data, marks)
            else:
                ax.set_title(title, fontsize=11)
                ax.text(0.5, 0.5, "no data", ha="center", va="center",
                        transform=ax.transAxes, color="gray")
                ax.set_xticks([])
                ax.set_yticks([])
        last = max((line[3][-1] for _, data, _ in panels for line in data), default=None)
        suptitle = "dpokit training overview"
        if last is not None:
            suptitle += f"  (step {_fmt(last)})"
        fig.suptitle(suptitle, fontsize=13)
        path = out_dir / "overview.png"
        _save(fig, path)
        written.append(path)
    return written


# ---------------------------------------------------------------------------- summary


def _fmt(x) -> str:
    """Compact number: integers as integers, else 4 significant digits."""
    if x is None:
        return "-"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x.is_integer() and abs(x) < 1e15:
        return f"{int(x):,}" if abs(x) >= 10_000 else str(int(x))
    if 1_000 <= abs(x) < 1e15:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def _fmt_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _logged(rows: list[dict], key: str) -> list[tuple[float, object]]:
    """(step, value as logged) for ``key``, sorted by step; a step logged twice keeps its later row."""
    by_step = {}
    for row in rows:
        step = _number(row.get("step"))
        if step is not None and key in row:
            by_step[step] = row[key]
    return sorted(by_step.items())


def non_finite_since(key: str, rows: list[dict]) -> float | None:
    """The step from which ``key`` has been logged as no finite number (NaN or inf, which
    ``metrics.jsonl`` writes as null) to the last row that logs it; None while its last value is finite."""
    since = None
    for step, value in reversed(_logged(rows, key)):
        if _number(value) is not None:
            break
        since = step
    return since


def _last(rows: list[dict], key: str) -> str | None:
    """The last logged value of ``key``, formatted; "non-finite since step N" for a run that diverged."""
    logged = _logged(rows, key)
    if not logged:
        return None
    since = non_finite_since(key, rows)
    return _fmt(logged[-1][1]) if since is None else f"non-finite since step {_fmt(since)}"


def summarize(rows: list[dict], run_dir: str | os.PathLike, plots: bool = True, record: dict | None = None) -> str:
    """A short plain-text end-of-run summary (no colour codes), aligned in two columns.

    Shows steps, the last train loss / accuracy / margin ("non-finite since step N" once they
    are NaN or inf), the last eval loss / accuracy / margin if any eval ran, mean tokens/s, the
    pairs trained with pairs/s and tokens, the time of the training steps (the rows' ``seconds``)
    and of the evals (``eval/seconds``), the peak memory; from the run's ``record`` (``run.json``, when given: see
    :mod:`dpokit.run_record`) its global batch, pairs, wall time and reference pass; and the run's
    paths: its model (:func:`dpokit.checkpoint.newest_model`), ``plots/`` when ``plots`` (the
    charts were written). Missing metrics are left out.
    """
    run_dir = Path(run_dir)
    train_rows = [r for r in rows if not _is_eval(r)]
    eval_rows = [r for r in rows if _is_eval(r)]
    items: list[tuple[str, str]] = []

    steps = [s for s in (_number(r.get("step")) for r in rows) if s is not None]
    if steps:
        text = _fmt(max(steps))
        epochs = [e for e in (_number(r.get("epoch")) for r in rows) if e is not None]
        if epochs:
            text += f"  (epoch {_fmt(max(epochs))})"
        items.append(("steps", text))

    for key, label in [("loss", "train loss"), ("rewards/accuracies", "train accuracy"),
                       ("rewards/margins", "train margin")]:
        v = _last(train_rows, key)
        if v is not None:
            items.append((label, v))
    for key, label in [("eval/loss", "eval loss"), ("eval/rewards/accuracies", "eval accuracy"),
                       ("eval/rewards/margins", "eval margin")]:
        v = _last(eval_rows, key)
        if v is not None:
            items.append((label, v))

    # Throughput: total tokens / total seconds when both are logged, else the mean of the
    # logged rates. Dedup by step so a resumed run does not count redone steps twice.
    _, tokens = _series(train_rows, "tokens")
    _, secs = _series(train_rows, "seconds")
    _, rates = _series(train_rows, "tokens_per_second")
    if tokens and secs and len(tokens) == len(secs) and sum(secs) > 0:
        items.append(("mean tokens/s", _fmt(sum(tokens) / sum(secs))))
    elif rates:
        items.append(("mean tokens/s", _fmt(sum(rates) / len(rates))))
    _, pairs = _series(train_rows, "pairs")  # logged since pairs/s compares across layouts (tokens/s does not)
    if pairs and secs and len(pairs) == len(secs) and sum(secs) > 0:
        items.append(("pairs trained", f"{sum(pairs):,.0f}  ({_fmt(sum(pairs) / sum(secs))} pairs/s, {sum(tokens):,.0f} tokens)"))

    if secs:
        items.append(("step time", _fmt_duration(sum(secs))))
    _, eval_secs = _series(eval_rows, "eval/seconds")
    if eval_secs:
        items.append(("eval time", _fmt_duration(sum(eval_secs))))
    memory = _peak_memory(train_rows, (record or {}).get("processes", 1))
    if memory:
        items.append(("peak memory", memory))
    if record:
        items += _record_items(record)

    items.append(("run dir", str(run_dir)))
    model = _newest_model(run_dir)
    if model is not None:
        items.append(model)
    items.append(("metrics", str(run_dir / "metrics.jsonl")))
    if plots:
        items.append(("plots", str(run_dir / "plots")))

    width = max(len(k) for k, _ in items)
    lines = ["dpokit run summary"] if rows else ["dpokit run summary (no metrics logged)"]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in items]
    return "\n".join(lines)


def _peak_memory(rows: list[dict], processes: int) -> str | None:
    """The highest logged memory peaks (:func:`dpokit.metrics.memory_row`), e.g. ``10.25 GiB allocated on
    the GPU, 6.10 GiB host RSS`` (over several ``processes``: ``..., the most of any of 8 processes``);
    None when no row has one."""
    device, host = (max(_series(rows, key)[1], default=None) for key in ("memory/device_peak_gib", "memory/host_peak_gib"))
    parts = [f"{device:.2f} GiB allocated on the GPU"] if device is not None else []
    parts += [f"{host:.2f} GiB host RSS"] if host is not None else []
    if parts and processes > 1:
        parts.append(f"the most of any of {processes} processes")
    return ", ".join(parts) or None


def _record_items(record: dict) -> list[tuple[str, str]]:
    """The summary's items from a run's ``run.json``: the global batch and how it was made, the pairs
    trained and evaluated, the wall time over every session (one killed midway counts to its last
    checkpoint; a run resumed here from another folder's checkpoint counts from it) and the reference
    passes' time. Keys an older record lacks are left out."""
    items = []
    if {"global_batch", "per_device_train_batch_size", "processes", "gradient_accumulation_steps"} <= set(record):
        items.append(("global batch", f"{record['global_batch']} pairs = {record['per_device_train_batch_size']} x "
                                      f"{record['processes']} processes x {record['gradient_accumulation_steps']} accumulation"))
    if "train_pairs" in record:
        text = f"{record['train_pairs']:,} train"
        if record.get("left_out_per_epoch"):
            text += f" (each epoch leaves out {record['left_out_per_epoch']})"
        if record.get("eval_pairs"):
            text += f", {record['eval_pairs']:,} eval"
            if record.get("eval_held_out"):
                text += " (held out of the train data)"
        items.append(("pairs", text))
    sessions = record.get("sessions") or []
    if sessions:
        last = sessions[-1]
        text = _fmt_duration(sum(s.get("wall_seconds") or 0.0 for s in sessions))
        if len(sessions) > 1:
            text += (f"  ({len(sessions)} sessions; the last, from step {_fmt(last.get('from_step'))}: "
                     f"{_fmt_duration(last.get('wall_seconds') or 0.0)})")
        if not last.get("finished"):
            text += f"  (to step {_fmt(last.get('to_step'))}: not finished)"
        if sessions[0].get("from_step"):  # resumed into this folder from another run's checkpoint
            text += f"  (from step {_fmt(sessions[0]['from_step'])}: the steps before ran in another folder)"
        items.append(("wall time", text))
    reference = [s["reference_seconds"] for s in sessions if s.get("reference_seconds") is not None]
    if reference:
        items.append(("reference pass", _fmt_duration(sum(reference))))
    return items


def _newest_model(run_dir: Path) -> tuple[str, str] | None:
    """("final model", path) once the run has ended, else ("newest checkpoint", path), else None."""
    from dpokit.checkpoint import newest_model

    found = newest_model(run_dir)
    if found is None:
        return None
    return ("final model" if found.name == "final" else "newest checkpoint"), str(found)


def make_report(run_dir: str | os.PathLike, plots: bool = True) -> str:
    """Read ``run_dir/metrics.jsonl`` (and ``run.json``), write ``run_dir/plots/*.png`` (unless
    ``plots`` is False), return the summary."""
    from dpokit.run_record import read_run_record

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    rows = read_metrics(metrics) if metrics.exists() else []
    drawn = write_plots(rows, run_dir / "plots") if plots else []
    return summarize(rows, run_dir, plots=bool(drawn), record=read_run_record(run_dir))
