"""Checkpoints: atomic saves of everything a resumed run needs, pruning, and loading back.

``checkpoints/step-N/`` is a Hugging Face model folder (config.json, model.safetensors,
tokenizer files) plus ``optimizer.pt``, ``scheduler.pt``, ``rng_state_<rank>.pt`` and
``trainer_state.json`` (step, epoch, position in the epoch's batches). A save is written to
``step-N.tmp`` and renamed once complete, so a killed run never leaves a half checkpoint that
looks whole.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dpokit.run_record import RUN_FILE

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, epoch, and global batches done in that epoch; and what
    that position counts in: pairs per global batch, the training pairs and the shuffle's seed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    global_batch: int = 0
    train_pairs: int = 0
    seed: int | None = None
    """The seed each epoch's shuffle is drawn from (None in older checkpoints)."""
    pairs_digest: str = ""
    """A hash of the training pairs' token ids, in order (empty in older checkpoints)."""


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        # one state per GPU the saving process saw; a machine that shows fewer takes the first ones
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


FINAL_STEP_FILE = "dpokit_step.json"
"""In ``final/``: the step the model was saved at ({"step": N}), beside the Hugging Face files."""


def write_final_step(final: Path, step: int) -> None:
    (final / FINAL_STEP_FILE).write_text(json.dumps({"step": step}) + "\n")


def final_step(run_dir: Path) -> int | None:
    """The step ``run_dir/final`` was saved at; None without one (or written before dpokit kept it)."""
    try:
        return int(json.loads((run_dir / "final" / FINAL_STEP_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def newest_model(run_dir: Path) -> Path | None:
    """The newest model of a run: ``final/``, unless a checkpoint of a later step was saved (a run
    resumed from an earlier checkpoint keeps the earlier ``final/`` until it ends, and may be
    killed first), else the newest checkpoint; None when the run has saved neither."""
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    final = run_dir / "final"
    if final.is_dir():
        step = final_step(run_dir)
        if step is None or not checkpoints or step >= _step(checkpoints[-1]):  # None: before dpokit kept its step
            return final
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    accelerator,
    checkpoints_dir: Path,
    state: TrainState,
    model,
    tokenizer,
    optimizer_state: dict | None,
    scheduler,
    keep: int | None,
    scaler: torch.amp.GradScaler | None = None,
    model_state: dict | None = None,
    log_window: dict | None = None,
    reference=None,
    reference_state: dict | None = None,
) -> Path:
    """Write ``step-N`` atomically (all processes call this), then keep the newest ``keep``.
    An enabled ``scaler`` (fp16 loss scaling) is saved too. ``optimizer_state`` and ``model_state``
    are what the main process writes (:mod:`dpokit.sharding`; ``model_state`` None: the model's own);
    ``log_window`` the steps logged since the last row (:meth:`dpokit.metrics.LogWindow.saved`).
    ``reference``: a reference model that training changes (TR-DPO), saved into :data:`REFERENCE_DIR`
    (``reference_state``: its weights gathered from shards, as ``model_state``)."""
    final = checkpoints_dir / f"step-{state.step}"
    tmp = checkpoints_dir / f"step-{state.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
        tokenizer.save_pretrained(tmp)
        if reference is not None:  # a model folder of its own, for dpokit eval --reference too
            reference.save_pretrained(tmp / REFERENCE_DIR, safe_serialization=True, state_dict=reference_state)
            tokenizer.save_pretrained(tmp / REFERENCE_DIR)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None and scaler.is_enabled():
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**asdict(state), "log_window": log_window}, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep is not None:
            for old in list_checkpoints(checkpoints_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


REFERENCE_DIR = "reference"
"""In a checkpoint of a run whose reference moves (TR-DPO, ``sync_ref_model``): the reference model then."""
TRACKER_DIR = "dpokit"
"""The trackers' run name: TensorBoard writes its events into ``output_dir/dpokit/``."""
DATA_FILE = "data.json"
"""In a run's folder: what became of each dataset (its format, rows, pairs, drops), as logged at start."""
RUN_OUTPUTS = ("checkpoints", "final", "plots", "metrics.jsonl", DATA_FILE, RUN_FILE, TRACKER_DIR)
"""What a run writes into its ``output_dir`` besides ``config.yaml``."""
USE_OUTPUTS = ("eval.json", "eval-step-*.json", "compare.md", "compare.jsonl", "compare-step-*.md", "compare-step-*.jsonl")
"""What ``dpokit eval`` and ``compare`` write into a run's folder (of that run's models)."""


def holds_a_run(output_dir: Path) -> list[str]:
    """What of another run ``output_dir`` holds: its checkpoints, ``final/``, logged rows (empty: none)."""
    checkpoints = list_checkpoints(output_dir / "checkpoints")
    found = [f"checkpoints {', '.join(p.name for p in checkpoints)}"] if checkpoints else []
    if (output_dir / "final").is_dir():
        found.append("final/")
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        found.append("metrics.jsonl")
    return found


def outputs_to_replace(output_dir: Path, resume_from: Path | None, overwrite: bool) -> list[Path]:
    """Keep one run per ``output_dir``: returns what of an earlier run to remove before this one starts.

    With ``overwrite`` the outputs of a run already there are removed. Resuming from one of the
    folder's own checkpoints removes its later checkpoints: they belong to the steps being redone
    (left, pruning would keep them over the new saves, and ``latest`` would pick them). Otherwise a
    run already there (checkpoints, ``final/``, logged rows) is refused: a new run would mix with it.
    Raises FileExistsError with the fix; removes nothing itself (the main process does).
    """
    if overwrite:
        return ([output_dir / name for name in RUN_OUTPUTS if (output_dir / name).exists()]
                + sorted(p for pattern in USE_OUTPUTS for p in output_dir.glob(pattern) if p.is_file()))
    if resume_from is not None and is_own_checkpoint(resume_from, output_dir):
        step = load_train_state(resume_from)[0].step
        return [p for p in list_checkpoints(output_dir / "checkpoints") if _step(p) > step]
    found = holds_a_run(output_dir)
    if found:
        start = "a run resumed from another folder's checkpoint" if resume_from is not None else "a new run"
        resumable = list_checkpoints(output_dir / "checkpoints")
        go_on = (f"continue it with resume_from_checkpoint=latest (its newest checkpoint is step {_step(resumable[-1])})"
                 if resumable else "it saved no checkpoint to continue from (save_steps)")
        raise FileExistsError(
            f"{output_dir} already holds a run ({'; '.join(found)}), which {start} would mix with: {go_on}; "
            f"choose another output_dir, or set overwrite_output_dir=true to delete its {', '.join(RUN_OUTPUTS)} "
            "(and its eval and compare files) first"
        )
    return []


def is_own_checkpoint(checkpoint: Path, output_dir: Path) -> bool:
    """Whether ``checkpoint`` is one of ``output_dir``'s own (in its ``checkpoints/``)."""
    return checkpoint.resolve().parent == (output_dir / "checkpoints").resolve()


def earlier_rows(checkpoint: Path, output_dir: Path) -> Path | None:
    """For a run resumed from another folder's checkpoint: the ``metrics.jsonl`` of the run whose
    ``checkpoints/`` holds it (the rows its steps logged; the file may be gone). None for the folder's
    own checkpoint, or one outside a run's ``checkpoints/``."""
    if is_own_checkpoint(checkpoint, output_dir) or checkpoint.resolve().parent.name != "checkpoints":
        return None
    return checkpoint.resolve().parent.parent / "metrics.jsonl"


def find_checkpoint(spec: str, output_dir: Path) -> Path:
    """``latest`` -> the newest complete checkpoint of ``output_dir``; otherwise a folder path."""
    if spec == "latest":
        found = list_checkpoints(output_dir / "checkpoints")
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=latest but {output_dir / 'checkpoints'} holds no checkpoint")
        check_complete(found[-1])
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(_not_a_checkpoint(path))
    check_complete(path)
    return path


def _not_a_checkpoint(path: Path) -> str:
    """Why ``path`` cannot be resumed from, and the checkpoints that can be, where they are near."""
    if (path / "checkpoints").is_dir():  # a run's folder
        found = list_checkpoints(path / "checkpoints")
        take = f"its newest is {found[-1]}" if found else "it holds none"
        return f"{path} is a run's folder, not a checkpoint: give one of its checkpoints/step-N folders ({take})"
    here = list_checkpoints(path.parent) if path.parent.name == "checkpoints" else list_checkpoints(path.parent / "checkpoints")
    there = f" ({here[0].parent} holds {', '.join(p.name for p in here)})" if here else ""
    if not path.exists():
        return f"resume_from_checkpoint: no folder {path}; give a checkpoints/step-N folder{there}"
    if any((path / name).is_file() for name in ("config.json", "adapter_config.json")):  # e.g. a run's final/
        return (f"{path} holds a model but no training state to resume (no {STATE_FILE}): give a checkpoints/step-N "
                f"folder{there}, or start a new run from this model with model.name_or_path={path}")
    return f"{path} is not a dpokit checkpoint (no {STATE_FILE}); give a checkpoints/step-N folder{there}"


def load_train_state(checkpoint: Path) -> tuple[TrainState, dict | None]:
    """The checkpoint's :class:`TrainState` and its steps not logged yet (None in older checkpoints)."""
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    log_window = saved.pop("log_window", None)
    return TrainState(**saved), log_window


def check_same_position(state: TrainState, current: TrainState, checkpoint: Path, batch_shape: str) -> None:
    """Refuse to resume ``state`` (from ``checkpoint``) where its position in the data means other
    pairs in this run (``current``): another global batch (``batch_shape`` says how this run's is
    made), other training pairs (their number, their tokens or their order), or another seed (each
    epoch's shuffle). A :class:`~dpokit.config.ConfigError` says what to give."""
    from dpokit.config import ConfigError

    global_batch, train_pairs = current.global_batch, current.train_pairs
    if state.global_batch and state.global_batch != global_batch:
        raise ConfigError(
            f"{checkpoint} was trained with a global batch of {state.global_batch} pairs; this run's is {global_batch} "
            f"({batch_shape}), so its position in the data would resume at other pairs (some trained twice, some "
            f"never): resume with per_device_train_batch_size x processes x gradient_accumulation_steps = {state.global_batch}"
        )
    if state.train_pairs and state.train_pairs != train_pairs:
        raise ConfigError(
            f"{checkpoint} was trained on {state.train_pairs} training pairs; this run has {train_pairs}: the data or its "
            "settings (max_length, truncation, eval_fraction, ...) changed since, and the checkpoint's position in the data "
            "would point at other pairs. Resume with the data and settings of that run, or start a new run from its "
            f"model (model.name_or_path={checkpoint})"
        )
    if state.pairs_digest and state.pairs_digest != current.pairs_digest:
        raise ConfigError(
            f"{checkpoint} was trained on other training pairs than this run's {train_pairs} (the same number, other "
            "tokens or another order: the data, its settings or the tokenizer changed since), so its position in the data "
            "would point at other pairs. Resume with the data and settings of that run, or start a new run from its "
            f"model (model.name_or_path={checkpoint})"
        )
    if state.seed is not None and state.seed != current.seed:
        raise ConfigError(
            f"{checkpoint} was trained with seed {state.seed}, which each epoch's shuffle is drawn from; this run's is "
            f"{current.seed}, so the rest of the epoch would train some pairs twice and others never: resume with "
            f"seed={state.seed}"
        )


def read_optimizer_state(checkpoint: Path) -> dict:
    """``optimizer.pt``, its tensors mapped from the file (read as they are used, into memory the
    processes of one machine share) rather than loaded: each loader copies them into place
    (:func:`dpokit.sharding.load_optimizer_state`, :func:`dpokit.zero.load_optimizer_state`), so no
    process needs a whole private copy of it beside the state it loads into: processes of a
    data-parallel run on one machine would otherwise each hold one. (The mapping is private: a CPU
    optimizer that adopts a mapped tensor as its state writes to its own copy, never to the file.)"""
    return torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False, mmap=True)


class SavedWeights:
    """The full model weights a checkpoint holds (``model*.safetensors``, keys as the model's own state
    dict; a LoRA checkpoint's adapter files are not among them: none then), each read from its file
    when asked (:meth:`get`): a process never holds more than one of them at once."""

    def __init__(self, checkpoint: Path):
        from safetensors import safe_open

        self.files: dict[str, Path] = {}
        for path in sorted(checkpoint.glob("model*.safetensors")):
            with safe_open(path, "pt") as f:
                self.files.update(dict.fromkeys(f.keys(), path))

    def get(self, name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        if name not in self.files:
            return None
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)


def load_scheduler_and_rng(checkpoint: Path, scheduler, process_index: int, scaler: torch.amp.GradScaler | None = None) -> str | None:
    """Restore the schedule, fp16's loss scale and this process's random state; returns a note when
    the checkpoint holds no random state for this process (saved by fewer processes: it draws afresh)."""
    saved = torch.load(checkpoint / "scheduler.pt", weights_only=False)
    groups = len(scheduler.optimizer.param_groups)  # DeepSpeed's optimizer has no empty group; every group has one schedule
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        if isinstance(saved.get(key), list) and saved[key] and len(saved[key]) != groups:
            saved[key] = saved[key][:1] * groups
    scheduler.load_state_dict(saved)
    if scaler is not None and scaler.is_enabled() and (checkpoint / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", weights_only=False))
    rng_file = checkpoint / f"rng_state_{process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
        return None
    return (f"note: {checkpoint} holds no random state for process {process_index} (it was saved by fewer processes): "
            "that process's dropout and sampling draw afresh, so the run is not repeated exactly")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin",
                "adapter_model.bin")


def check_complete(checkpoint: Path) -> None:
    """Refuse a checkpoint folder that lacks what resuming reads (saves are atomic, so only a damaged
    or hand-edited folder does), naming the missing file and an earlier checkpoint to resume from."""
    from dpokit.config import ConfigError

    missing = [name for name in (STATE_FILE, "optimizer.pt", "scheduler.pt") if not (checkpoint / name).is_file()]
    if not any((checkpoint / name).is_file() for name in ("config.json", "adapter_config.json")):
        missing.append("config.json or adapter_config.json")
    if not any((checkpoint / name).is_file() for name in WEIGHT_FILES):
        missing.append("model weights (model.safetensors or adapter_model.safetensors)")
    if not any(checkpoint.glob("rng_state_*.pt")):
        missing.append("rng_state_<process>.pt")
    if missing:
        earlier = [p for p in list_checkpoints(checkpoint.parent) if _step(p) < _step(checkpoint)]
        raise ConfigError(
            f"checkpoint {checkpoint} is incomplete, missing {', '.join(missing)}: it was damaged after it was saved. "
            + (f"Resume from an earlier one (resume_from_checkpoint={earlier[-1]}), or remove it" if earlier
               else "Remove it and start the run again")
        )


def _step(checkpoint: Path) -> int:
    found = _STEP_DIR.match(checkpoint.name)
    return int(found.group(1)) if found else -1
