"""Progress while dpokit works: a bar on a terminal; in a log file (stderr redirected), plain lines
where a bar's redraws would pile up into one line of every redraw."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stderr, where bars are drawn, is a terminal."""
    return sys.stderr.isatty()


def bar(total: int, desc: str, initial: int = 0, leave: bool = True):
    """A tqdm bar on stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=leave)


def shown(items: Iterable[T], total: int, desc: str | None) -> Iterator[T]:
    """``items``, with a bar that goes away when they end if ``desc`` is given and stderr is a
    terminal (long no-grad passes: the reference log-probs, an eval), else as they are."""
    if desc is None or not on_terminal():
        yield from items
        return
    with bar(total, desc, leave=False) as progress:
        for item in items:
            yield item
            progress.update(1)
