"""``dpokit export``: a trained run (or checkpoint, or adapter folder) as a plain Hugging Face model.

LoRA adapters are folded into their base weights (``merge``; the command line always merges), so
the result loads with ``AutoModelForCausalLM.from_pretrained`` and needs no peft.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from dpokit.config import ConfigError
from dpokit.resolve import load_model, load_model_tokenizer, model_config, resolve_model


def export_model(source: str, out: str | Path, merge: bool, dtype: str | None = None) -> Path:
    """Write the model ``source`` names (run dir, checkpoint, HF folder, adapter) to ``out``.

    An adapter needs ``merge=True`` (a merged copy is what this command makes); a full model is
    copied in Hugging Face format either way. Loaded as eval and chat load it (the run's settings:
    ``trust_remote_code``, the base the run trained); written in ``dtype``, by default the run's
    ``model.dtype`` (``auto``, and outside a run: the checkpoint's own). The folder is written beside
    ``out`` and renamed.
    """
    model = resolve_model(source)
    if model.is_adapter and not merge:
        raise ConfigError(f"{model.path} is a LoRA adapter: pass --merge to write base + adapter as one model")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder: choose a new folder for the model")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty: choose a new folder")
    config = model_config(model, dtype or ("auto" if model.run_config is None else None))  # None: the run's dtype
    lm = load_model(model, config)  # adapters merged, eval mode
    lm.config.use_cache = True  # as a model to use, not to train
    tokenizer = load_model_tokenizer(model, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # never a folder of the user's
    try:
        lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _readable_as_umask_allows(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _readable_as_umask_allows(folder: Path) -> None:
    """Give ``folder`` and its files the modes a plain mkdir and open would (``mkdtemp`` makes the
    folder 0700 and safetensors its files 0600: a serving container of another user could not read them)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
