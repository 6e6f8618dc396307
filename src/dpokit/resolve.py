"""What a MODEL argument of ``dpokit eval / compare / chat`` names, loading it, and where outputs go.

A MODEL is one of:

- a dpokit run directory (``config.yaml`` plus ``final/`` or ``checkpoints/step-N/``): its
  ``final/``, or the newest checkpoint when the run has no ``final/`` yet (or a checkpoint newer
  than it: a resumed run);
- a folder inside a run: ``<run>/final`` or ``<run>/checkpoints/step-N``;
- a plain Hugging Face model folder (``config.json``), a hub id, or ``builtin:tiny-qwen2``;
- a LoRA adapter folder (``adapter_config.json``), loaded through ``peft`` and merged.

When MODEL belongs to a run, the run's resolved config supplies the defaults: how to load
(dtype, attention, trust_remote_code), the reference (``model.ref_model_name_or_path``, else the
starting policy ``model.name_or_path``), the eval data and the loss settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dpokit.checkpoint import newest_model
from dpokit.config import CPU_ATTENTION, Config, ConfigError, ModelConfig, load_config
from dpokit.modeling import (
    DTYPES,
    adapted_tied_layers,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    wrapped_layer,
)

ADAPTER_FILE = "adapter_config.json"
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class ResolvedModel:
    """A MODEL argument made concrete.

    ``path`` is a local folder or a hub id (``builtin:`` names already built); ``run_dir`` and
    ``run_config`` are set when the model belongs to a dpokit run; ``label`` is ``"final"``,
    ``"step-N"`` or ``""`` (not in a run); ``revision`` is the hub revision, if any.
    """

    path: str
    run_dir: Path | None = None
    run_config: Config | None = None
    label: str = ""
    revision: str | None = None
    load_settings: ModelConfig | None = None
    """How to load a model outside any run that is a run's reference: that run's model settings
    (dtype, attention, trust_remote_code), as training loaded it."""
    given: str = ""
    """The MODEL argument as the user wrote it (``builtin:tiny-qwen2``, not its cache folder)."""

    @property
    def name(self) -> str:
        """What to call the model in messages: as given, else its path."""
        return self.given or self.path

    @property
    def shown(self) -> str:
        """How reports and logs name the model: its folder or hub id, a builtin by its name
        (``builtin:tiny-qwen2``, not the cache folder it was built in)."""
        return self.given if self.given.startswith("builtin:") else self.path

    @property
    def is_adapter(self) -> bool:
        """True for a LoRA adapter folder (it has ``adapter_config.json``)."""
        return (Path(self.path) / ADAPTER_FILE).is_file()

    @property
    def file_suffix(self) -> str:
        """``""`` for a run's final model, ``"-step-N"`` for a checkpoint: keeps output files apart."""
        return f"-{self.label}" if self.label.startswith("step-") else ""


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` is a dpokit run directory (holds the resolved ``config.yaml``)."""
    return (folder / RUN_CONFIG).is_file() and not (folder / "config.json").is_file()


def _run_model(run_dir: Path) -> tuple[Path, str]:
    """The model folder of a run and its label: ``final/``, else (a run going on, killed, or resumed
    from an earlier checkpoint) the newest checkpoint (:func:`dpokit.checkpoint.newest_model`)."""
    found = newest_model(run_dir)
    if found is not None:
        return found, found.name
    raise ConfigError(
        f"run directory {run_dir} has no final/ and no checkpoints/step-N/ yet: "
        "wait for the run to save a checkpoint (run.save_steps) or finish"
    )


def _enclosing_run(folder: Path) -> tuple[Path | None, str]:
    """The run a model folder sits in (``<run>/final``, ``<run>/checkpoints/step-N``), and its label."""
    if folder.name == "final" and is_run_dir(folder.parent):
        return folder.parent, "final"
    if folder.parent.name == "checkpoints" and folder.name.startswith("step-") and is_run_dir(folder.parent.parent):
        return folder.parent.parent, folder.name
    return None, ""


def resolve_model(name_or_path: str, revision: str | None = None) -> ResolvedModel:
    """Resolve a MODEL argument (see the module docstring); raises :class:`ConfigError` for a
    folder that is none of a run, a model or an adapter."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return ResolvedModel(resolve_model_path(name_or_path), revision=revision, given=name_or_path)
    folder = folder.resolve()
    if is_run_dir(folder):
        run_dir = folder
        folder, label = _run_model(run_dir)
    elif (folder / "config.json").is_file() or (folder / ADAPTER_FILE).is_file():
        run_dir, label = _enclosing_run(folder)
    else:
        raise ConfigError(
            f"{folder} is a folder but not a model: expected a Hugging Face model (config.json), "
            f"a LoRA adapter ({ADAPTER_FILE}) or a dpokit run directory ({RUN_CONFIG} with final/ or checkpoints/)"
        )
    run_config = load_config(run_dir / RUN_CONFIG, for_training=False) if run_dir is not None else None  # as it trained
    return ResolvedModel(str(folder), run_dir, run_config, label, given=name_or_path)


def default_reference(model: ResolvedModel) -> ResolvedModel | None:
    """The reference a run trained against (its ``ref_model_name_or_path``, else its starting
    policy: the base model, or the adapter training started from), or an adapter's base model;
    None when MODEL says nothing about one."""
    if model.run_config is not None:
        m = model.run_config.model
        if m.ref_model_name_or_path:
            reference = resolve_model(m.ref_model_name_or_path, m.ref_revision)
        elif m.adapter_name_or_path:  # training started from base + this adapter (with or without use_peft: true)
            reference = resolve_model(m.adapter_name_or_path)
        else:
            reference = resolve_model(m.name_or_path, m.revision)
        return reference if reference.run_config is not None else dataclasses.replace(reference, load_settings=m)
    if model.is_adapter:
        base = _adapter_config(Path(model.path)).get("base_model_name_or_path")
        return resolve_model(base) if base else None
    return None


def model_config(model: ResolvedModel, dtype: str | None = None) -> ModelConfig:
    """How to load ``model``: its run's model settings (dtype, attention, trust_remote_code) or the
    defaults, pointed at ``model.path``; ``dtype`` overrides.

    A run's reference (see :func:`default_reference`) is loaded with that run's settings. Two
    training-only settings are not carried over: 4-bit loading (a QLoRA run's adapter is merged into
    its base, which needs the base's unquantized weights; its reference is loaded the same way), and,
    on a machine without CUDA, a GPU attention kernel (flash_attention_2, flex_attention, ...),
    replaced by sdpa: the same numbers within round-off.
    """
    import torch

    if model.run_config is not None:
        base = model.run_config.model
    else:
        base = model.load_settings or ModelConfig()
    config = dataclasses.replace(base, name_or_path=model.path, revision=model.revision, load_in_4bit=False)
    if config.attn_implementation not in CPU_ATTENTION and not torch.cuda.is_available():
        config.attn_implementation = "sdpa"
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
        config.dtype = dtype
    return config


def _adapter_config(folder: Path) -> dict:
    try:
        return json.loads((folder / ADAPTER_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder / ADAPTER_FILE} cannot be read as JSON: {e}") from None


def _load_adapter(folder: Path, config: ModelConfig, base: ModelConfig | None = None, merge: bool = True,
                  empty: bool = False) -> nn.Module:
    """The adapter's base model with the LoRA weights merged in (inference only), or with the adapter
    as it trained beside the base (``merge=False``: peft's float32 adapters on a 16-bit base compute
    what training computed, which merging into 16-bit weights rounds). ``base``: the model
    the adapter was trained on (a run's ``model`` settings); else the one ``adapter_config.json`` names,
    whose relative path (an older dpokit wrote the path as given) is read from the run's folder's
    point of view no better than from here: the run's settings are preferred."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(
            f"{folder} is a LoRA adapter ({ADAPTER_FILE}); loading it needs the peft package: pip install peft"
        ) from None
    if base is None:
        adapter = _adapter_config(folder)
        if not adapter.get("base_model_name_or_path"):
            raise ConfigError(f"{folder / ADAPTER_FILE} names no base model (base_model_name_or_path)")
        base = dataclasses.replace(config, name_or_path=adapter["base_model_name_or_path"], revision=adapter.get("revision"))
    lm = load_causal_lm(dataclasses.replace(config, use_peft=False, adapter_name_or_path=None),
                        base.name_or_path, base.revision, empty=empty)
    try:
        model = PeftModel.from_pretrained(lm, str(folder))
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load the LoRA adapter in {folder}: {str(e).strip().splitlines()[0]}") from None
    if not merge:
        return model
    untie_adapted_embeddings(model)
    return model.merge_and_unload()


def untie_adapted_embeddings(model: nn.Module) -> bool:
    """Give the output layer of a peft ``model`` its own copy of the input embeddings when the two
    share one weight and a LoRA adapter sits on either, or either is trained whole
    (``modules_to_save``); returns whether it did.

    Merging writes an adapter's update into the weight it wraps: on a shared weight an adapter on
    ``lm_head`` would also shift every input embedding (and one on ``embed_tokens`` every logit), and
    the saved config would tie the two again on loading (a layer trained whole is merged as its own
    copy, which older peft releases left under a config that ties it back to the other on loading).
    Untied, the merged model computes what the adapter model computed (the output layer costs
    vocabulary x hidden more parameters).
    """
    if not adapted_tied_layers(model):
        return False
    base = model.get_base_model()
    head_base = wrapped_layer(base.get_output_embeddings())
    head_base.weight = nn.Parameter(head_base.weight.detach().clone(), requires_grad=False)
    for config in (base.config, base.config.get_text_config()):
        config.tie_word_embeddings = False
    return True


def load_model(model: ResolvedModel, config: ModelConfig, merge: bool = True, empty: bool = False) -> nn.Module:
    """The causal LM ``model`` names, in eval mode with gradients off; LoRA adapters merged, or
    (``merge=False``, to score as training did) kept beside the base. ``empty``: the base's
    architecture only (:func:`dpokit.modeling.empty_causal_lm`; an adapter's weights are still read),
    for a process whose weights sharding fills from the main process's."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no weight-loading bars between dpokit's own output
    if model.is_adapter:  # a run's adapter goes on the base the run trained
        lm = _load_adapter(Path(model.path), config, model.run_config.model if model.run_config is not None else None, merge,
                           empty)
    else:
        lm = load_causal_lm(config, model.path, model.revision, empty=empty)
    lm.eval()
    lm.requires_grad_(False)
    return lm


def load_model_tokenizer(model: ResolvedModel, config: ModelConfig):
    """The tokenizer saved with ``model``; an adapter folder without one uses its base model's."""
    path = model.path
    if model.is_adapter and not (Path(path) / "tokenizer_config.json").is_file():
        base = _adapter_config(Path(path)).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{path} holds no tokenizer and its {ADAPTER_FILE} names no base_model_name_or_path")
        path = resolve_model_path(base)
    return load_tokenizer(dataclasses.replace(config, name_or_path=path, revision=model.revision))


def output_dir(model: ResolvedModel, given: str | Path | None = None) -> Path:
    """Where a command writes its files: ``given``, else the model's run directory, else ``.``."""
    if given is not None:
        return Path(given)
    return model.run_dir if model.run_dir is not None else Path(".")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
