"""Pieces of the installed TRL's DPOTrainer source, run with ``exec`` on dpokit's numbers: TRL's own
code as the reference for a formula. TRL is in the bench extra, not in CI: without it, the test
that asks is skipped."""

from __future__ import annotations

import inspect
import textwrap

import pytest


def dpo_trainer_block(start: str, end: str, what: str) -> str:
    """The source of TRL's DPOTrainer from the line that begins with ``start`` up to (not including)
    the next that begins with ``end``, dedented, to ``exec``. Skips the test without TRL, or where
    this release lays ``what`` out otherwise than TRL 1.16."""
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    source = inspect.getsource(dpo_trainer)
    first = source.find(start)
    last = source.find(end, first)
    if first < 0 or last < 0:
        pytest.skip(f"this TRL's DPOTrainer lays out {what} otherwise than TRL 1.16's")
    return textwrap.dedent(source[first:last])
