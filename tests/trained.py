"""A tiny trained run shared by the eval/compare/chat tests: trained once per session and name."""

from pathlib import Path

from dpokit.train import train
from runs import run_config

_RUNS: dict[tuple[Path, str], Path] = {}


def trained_run(workdir: Path, name: str = "use", *overrides: str) -> Path:
    """``workdir/<name>``: 4 steps, a checkpoint at step 2, eval at the end (see runs.run_config)."""
    key = (workdir, name)
    if key not in _RUNS:
        _RUNS[key] = train(run_config(workdir, name, "save_steps=2", *overrides))
    return _RUNS[key]
