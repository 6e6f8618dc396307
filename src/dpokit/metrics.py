"""Training metrics: the window of steps since the last logged row, and the log those rows go to.

A step's statistics stay on the device until its row is made: the loop never waits for the GPU to
finish a step (one device-to-host copy per logged row, ``logging_steps`` steps, not one per step), so
the host builds the next micro-batch while the GPU still works on the last.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator


# Token means as TRL logs them (over all reply tokens of a step, not per pair first): name -> the
# per-pair sum and the per-pair token counts it is divided by (see :func:`token_sums`).
TOKEN_MEANS = {
    "entropy": ("sum/entropy", ("tokens/chosen", "tokens/rejected")),
    "logits/chosen": ("sum/logits/chosen", ("tokens/chosen",)),
    "logits/rejected": ("sum/logits/rejected", ("tokens/rejected",)),
    "mean_token_accuracy": ("sum/mean_token_accuracy", ("tokens/chosen",)),
}


def token_sums(seq_stats: torch.Tensor, seq_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair sums behind :data:`TOKEN_MEANS`, from each sequence's summed token statistics.

    seq_stats: [2P, 3 (or 4)] sums over each reply's tokens, columns as :data:`dpokit.logps.TOKEN_STATS`
    (entropy, mean logit, top-1; WPO's column after them is not read), chosen and rejected interleaved; seq_tokens: [2P] reply token
    counts. Returns name -> [P]: the entropy over both replies, the mean logit of each, the chosen
    reply's top-1 hits, and the two token counts.
    """
    chosen, rejected = seq_stats[0::2].float(), seq_stats[1::2].float()
    return {
        "sum/entropy": chosen[:, 0] + rejected[:, 0],
        "sum/logits/chosen": chosen[:, 1],
        "sum/logits/rejected": rejected[:, 1],
        "sum/mean_token_accuracy": chosen[:, 2],
        "tokens/chosen": seq_tokens[0::2].float(),
        "tokens/rejected": seq_tokens[1::2].float(),
    }


def token_means(means: dict) -> dict:
    """``means`` (name -> mean over pairs, a number or a 0-d tensor) with the sums of
    :func:`token_sums` replaced by the token means of :data:`TOKEN_MEANS`: the mean of the sums over
    the mean of the counts is the sum over all tokens divided by their number."""
    if not all(total in means for total, _ in TOKEN_MEANS.values()):
        return means
    out = {k: v for k, v in means.items() if not k.startswith(("sum/", "tokens/"))}
    for name, (total, counts) in TOKEN_MEANS.items():
        out[name] = means[total] / sum(means[c] for c in counts)
    return out


def step_means(stats: list[dict[str, torch.Tensor]], accelerator) -> tuple[list[str], torch.Tensor]:
    """One step's per-pair statistics averaged over its micro-batches and all processes (equal pair
    counts per process), in one gather and no host copy; token statistics become token means
    (:func:`token_means`). ``stats``: per micro-batch, name -> [pairs]. Returns the names and a
    [names] float32 tensor on the device."""
    names = list(stats[0])
    local = torch.stack([torch.cat([s[k].float() for s in stats]) for k in names], dim=1)  # [pairs, names]
    means = token_means(dict(zip(names, accelerator.gather(local).mean(dim=0))))
    return list(means), torch.stack(list(means.values()))


def _whole(norm) -> torch.Tensor:
    """The gradient norm as a plain 0-d tensor (a float, or under FSDP2 a DTensor, made whole)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return torch.as_tensor(norm, dtype=torch.float32)


GIB = 2**30


def peak_memory_bytes(device: torch.device) -> tuple[int, int]:
    """This process's peak memory since it started, in bytes (-1: not known here): on a CUDA device,
    the most torch has held allocated there (``torch.cuda.max_memory_allocated``, as the planner and
    the benchmark count; the caching allocator reserves a little more), and the host's peak resident
    set (``getrusage``'s ``ru_maxrss``: the whole process, Python, libraries and every host tensor).
    Neither waits for the device."""
    device_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1
    try:
        import resource
    except ImportError:  # Windows
        return device_peak, -1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return device_peak, rss if sys.platform == "darwin" else rss * 1024


def memory_row(device_peak: int, host_peak: int) -> dict[str, float]:
    """A row's memory values, in GiB to 4 decimals (0.1 MiB): ``memory/device_peak_gib`` and
    ``memory/host_peak_gib``, each left out where it is not known (-1)."""
    named = (("memory/device_peak_gib", device_peak), ("memory/host_peak_gib", host_peak))
    return {name: round(value / GIB, 4) for name, value in named if value >= 0}


class LogWindow:
    """The optimizer steps since the last logged row: their statistics (device tensors until
    :meth:`settle`), learning rates, real tokens (this process's) and training seconds."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[str], torch.Tensor | list[float], float]] = []  # (names, values, learning rate)
        self.tokens, self.seconds = 0, 0.0

    def add(self, stats: list[dict[str, torch.Tensor]], grad_norm, learning_rate: float, tokens: int, accelerator) -> None:
        """One step. ``grad_norm``: None for a step fp16 skipped for overflowed gradients (its norm is inf)."""
        names, values = step_means(stats, accelerator)
        if grad_norm is not None:
            names, values = [*names, "grad_norm"], torch.cat([values, _whole(grad_norm).to(values.device).reshape(1)])
        self.steps.append((names, values, learning_rate))
        self.tokens += tokens

    def settle(self) -> None:
        """Copy the values still on the device to the host in one go: waits for the steps' device work,
        so the seconds measured after it include that work."""
        pending = [i for i, (_, values, _) in enumerate(self.steps) if isinstance(values, torch.Tensor)]
        if not pending:
            return
        flat = torch.cat([self.steps[i][1] for i in pending]).tolist()
        for i in pending:
            names, _, lr = self.steps[i]
            self.steps[i], flat = (names, flat[:len(names)], lr), flat[len(names):]

    def saved(self, accelerator) -> dict:
        """The window as a checkpoint keeps it (values on the host, tokens summed over the processes):
        a run resumed there logs its next row as the uninterrupted run does. Every process calls it."""
        self.settle()
        tokens = int(accelerator.reduce(torch.tensor(self.tokens, device=accelerator.device), "sum"))
        return {"steps": [list(step) for step in self.steps], "tokens": tokens, "seconds": self.seconds}

    @classmethod
    def restored(cls, saved: dict | None, accelerator) -> LogWindow:
        """The window :meth:`saved` kept (an empty one for None); its tokens are the main process's
        (they are summed across processes again when the row is made)."""
        window = cls()
        if saved:
            window.steps = [(names, values, lr) for names, values, lr in saved["steps"]]
            window.tokens = saved["tokens"] if accelerator.is_main_process else 0
            window.seconds = saved["seconds"]
        return window

    def row(self, accelerator, pairs_per_step: int) -> dict:
        """The window's logged values: each statistic's mean over the steps that have it, the last
        learning rate, the real tokens of all processes, tokens per training second, the pairs
        (``pairs_per_step``, the global batch, per step) and pairs per training second, the seconds,
        and the peak memory so far of the process that used the most (:func:`memory_row`). Tokens per
        second depend on the batch layout (prefix sharing counts a prompt once); pairs per second
        compare across layouts. Every process calls it at the same step (tokens are summed across
        them, peaks taken at their highest, in one gather)."""
        self.settle()
        sums: dict[str, list[float]] = {}
        for names, values, _ in self.steps:
            for name, value in zip(names, values):
                sums.setdefault(name, []).append(value)
        mine = torch.tensor([[self.tokens, *peak_memory_bytes(accelerator.device)]], device=accelerator.device)
        every = accelerator.gather(mine)  # [processes, 3]: tokens, device peak, host peak
        tokens, (device_peak, host_peak) = int(every[:, 0].sum()), every[:, 1:].amax(dim=0).tolist()
        pairs = pairs_per_step * len(self.steps)
        return {**{k: sum(v) / len(v) for k, v in sums.items()}, "learning_rate": self.steps[-1][2],
                "tokens": tokens, "tokens_per_second": tokens / self.seconds, "pairs": pairs,
                "pairs_per_second": pairs / self.seconds, "seconds": self.seconds, **memory_row(device_peak, host_peak)}


class MetricsLog:
    """Appends rows to ``metrics.jsonl`` (main process) and forwards them to trackers (keys as
    :func:`tracker_key` names them).

    Each row is strict JSON: a NaN or infinite value (a diverged run) is written as ``null``, which
    every JSON reader takes (``jq`` refuses Python's bare ``NaN``); trackers get the number itself.
    """

    def __init__(self, path: Path, accelerator: Accelerator, keep_until_step: int | None, earlier: Path | None = None):
        """A resumed run (``keep_until_step``: its checkpoint's step) keeps its rows up to that step; one
        resumed from another run's checkpoint into a new folder starts from that run's rows
        (``earlier``: its ``metrics.jsonl``), which its trackers get too, so the new folder's curves
        are whole. Otherwise the file starts empty."""
        self.path, self.accelerator = path, accelerator
        self.carried = 0  # rows taken from ``earlier`` (main process)
        if not accelerator.is_main_process:
            return
        source = earlier if earlier is not None else path
        kept = []
        if keep_until_step is not None and source.exists():
            kept = [ln for ln in source.read_text().splitlines() if ln.strip() and _row_step(ln) <= keep_until_step]
        path.write_text("".join(ln + "\n" for ln in kept))
        if earlier is not None:
            self.carried = len(kept)
            for row in map(json.loads, kept):  # trackers get numbers: a diverged value written as null is NaN again
                accelerator.log({tracker_key(k): math.nan if v is None else v for k, v in row.items() if k != "step"},
                                step=row["step"])

    def write(self, row: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({k: _json_number(v) for k, v in row.items()}, allow_nan=False) + "\n")
        self.accelerator.log({tracker_key(k): v for k, v in row.items() if k != "step"}, step=row["step"])


def tracker_key(key: str) -> str:
    """A row's key as TensorBoard and W&B get it, named as transformers' Trainer (TRL) names it there:
    eval keys as they are (``eval/loss``), the others under ``train/`` (``train/rewards/margins``),
    so dashboards made for TRL runs show dpokit's."""
    return key if key.startswith("eval/") else f"train/{key}"


def _json_number(value):
    """``value``, or None for a float that is NaN or infinite."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn line from a killed run: drop it
