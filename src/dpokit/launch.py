"""How a process of a launched run (``accelerate launch`` or ``torchrun``: several processes) ends.

A command's work ends with every process past a last barrier; what is left is the process group.
Destroying it and letting the interpreter free it is where gloo (CPU processes) has failed runs that
had succeeded, in two ways seen under load:

- freed only in the interpreter's teardown (a reference outlived ``destroy_process_group``: torch's
  ``fully_shard`` of nested modules keeps one no Python object holds), its threads aborted the
  process ("terminate called without an active exception"), about 1 run in 40;
- freed at the end of ``train()``, when its last reference went with the run's model, one process
  waited there for good (torch 2.13; seen once in ~50 launched runs, and on torch 2.6 about 1 in 5).

So the command line (:func:`dpokit.cli.main`) ends such a process itself once its command has
succeeded: the commands leave the group as it is (:func:`end_process_group`) and the process exits
at once (:func:`exit_now`), with its output flushed and its files closed, before any of that can
run. Called from Python instead (``dpokit.train.train`` in one's own launched script), the commands
destroy the group as Accelerate's ``end_training`` does.
"""

from __future__ import annotations

import os
import sys

EXITS_WHEN_DONE = False
"""Whether this process ends with :func:`exit_now` once its command has succeeded (set by the
command line for a launched process); the commands then leave the process group to that exit."""


def launched() -> bool:
    """Whether this process is one of a launched run's (``WORLD_SIZE`` above 1, as torchrun sets it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def end_process_group(holder) -> None:
    """The end of a command's collective work through ``holder`` (an ``Accelerator``, or Accelerate's
    ``PartialState``): its trackers finished, and its process group destroyed unless the process
    ends with :func:`exit_now` next. Every process calls it, after a last barrier."""
    for tracker in getattr(holder, "trackers", []):
        tracker.finish()
    if not EXITS_WHEN_DONE:
        getattr(holder, "state", holder).destroy_process_group()


def exit_now() -> None:
    """End this process with exit code 0, its output flushed, without the interpreter's teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
