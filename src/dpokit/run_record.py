"""``run.json`` in a run's folder: the run's shape and where its time went, for ``dpokit report``.

``config.yaml`` holds what was asked; this holds what that came to on the machine that ran it: the
processes and the global batch they made, the pairs trained and held out for eval, the steps, the
library versions, and one entry per session (a first start, then each resume) with the steps it
trained and its wall time and reference-pass time. A session's entry is rewritten at each checkpoint
and at the end, so a run killed midway still says how far it got and what that cost.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
LIBRARIES = ("dpokit", "torch", "transformers", "accelerate", "peft")


def installed_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """The installed version of each library in ``names``, as its metadata says (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def library_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`LIBRARIES` (None: not installed); torch's with its build
    (``2.6.0+cu124``), which a wheel's metadata may leave out."""
    import torch

    return {**installed_versions(LIBRARIES), "torch": torch.__version__}


def describe_device(device) -> str:
    """``cpu``, or ``cuda (NVIDIA H100 80GB HBM3)``: the kind of device, and a GPU's name."""
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``run_dir/run.json`` as written, or None (no such file, or not JSON: a run from before it)."""
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class RunRecord:
    """The record of the run in ``path`` (``output_dir/run.json``), as the main process keeps it.

    ``shape``: what the run is (processes, global batch, pairs, steps; see :func:`dpokit.train.train`)
    and the library versions it runs on.
    ``sessions``: the earlier sessions' entries (kept on resume), then this session's, the last.
    """

    path: Path
    shape: dict[str, Any]
    sessions: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(cls, run_dir: Path, shape: dict[str, Any], resumed_at: int | None) -> RunRecord:
        """A new session of the run in ``run_dir``: after the earlier sessions' entries when it
        resumes (``resumed_at``: the step of its checkpoint), alone otherwise."""
        earlier = (read_run_record(run_dir) or {}).get("sessions", []) if resumed_at is not None else []
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        session = {"started": now, "from_step": resumed_at or 0, "to_step": resumed_at or 0,
                   "wall_seconds": 0.0, "reference_seconds": None, "finished": False}
        return cls(run_dir / RUN_FILE, {**shape, "versions": library_versions()}, [*earlier, session])

    def update(self, **session: Any) -> None:
        """Set items of this session's entry (``to_step``, ``wall_seconds``, ...) and write the file
        (beside, then renamed into place: a reader never sees half of it)."""
        from dpokit.resolve import write_text_atomic  # here: resolve imports checkpoint, which imports this module

        self.sessions[-1].update(session)
        write_text_atomic(self.path, json.dumps({**self.shape, "sessions": self.sessions}, indent=1) + "\n")

