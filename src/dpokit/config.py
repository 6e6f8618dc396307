"""The run configuration: a typed schema, YAML loading, ``key=value`` overrides, validation.

A config is a YAML file with five sections (``model``, ``data``, ``training``, ``loss``,
``run``). Every key also works at the top level and on the command line without its section
(``learning_rate=5e-7``), because key names are unique across sections. Names follow Hugging
Face ``TrainingArguments`` and TRL ``DPOConfig`` where the concept is the same.

Errors never come as a traceback: :class:`ConfigError` names the key, what was wrong and,
for an unknown key, the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


DENSE_MASK_ATTENTION = ("sdpa", "eager")
VARLEN_ATTENTION = "dpokit_varlen"
"""dpokit's own attention: torch's flash-attention varlen kernel over regrouped rows (:mod:`dpokit.varlen`)."""
PREFIX_ATTENTION = DENSE_MASK_ATTENTION + ("flex_attention", VARLEN_ATTENTION)
"""Attention implementations that can run the prefix-shared layouts: a dense additive mask for the
first two, a BlockMask for flex, regrouped rows for dpokit_varlen (see :mod:`dpokit.masks`). Kept
here so that reading a config never imports torch."""


def is_flash_attention(attn_implementation: str | None) -> bool:
    """Whether ``attn_implementation`` is a flash-attention kernel of transformers' (``flash_attention_2``,
    ``flash_attention_3``, a hub kernel such as ``kernels-community/flash-attn2``; transformers' own rule:
    "flash" in the name). Those read where packed sequences start, never a mask (see :mod:`dpokit.masks`)."""
    return attn_implementation is not None and "flash" in attn_implementation


CPU_ATTENTION = (None, "sdpa", "eager")
"""Attention implementations that run on a machine without CUDA (the others are GPU kernels;
torch's CPU flex_attention cannot recompile for a second shape)."""


class ConfigError(ValueError):
    """A config problem a user can fix; the message says which key and how."""


# ----------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny-qwen2"
    """Hub id, local folder, or ``builtin:tiny-qwen2`` (a tiny model dpokit builds itself)."""
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = None
    """``sdpa``, ``eager``, ``flex_attention``, ``flash_attention_2``, ``dpokit_varlen`` (torch's own
    flash-attention varlen kernel, GPU, 16-bit; see :mod:`dpokit.varlen`), ...; None lets transformers choose."""
    trust_remote_code: bool = False
    ref_model_name_or_path: str | None = None
    """Reference model; None means a frozen copy of the starting policy."""
    ref_revision: str | None = None
    use_peft: bool = False
    """Train LoRA adapters (through peft) instead of all weights; the reference is the same
    model with its starting adapters, so the base weights are loaded once."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (e.g. ``[q_proj, v_proj]``), or ``[all-linear]``."""
    lora_modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. ``[lm_head]``)."""
    adapter_name_or_path: str | None = None
    """Start from an existing adapter (e.g. an SFT LoRA): it is trained further, and the reference
    is base + this adapter as it was. Implies ``use_peft``."""
    load_in_4bit: bool = False
    """QLoRA: base weights in 4-bit nf4 with double quantization, bfloat16 compute (float16 with
    ``dtype: float16``, for GPUs without bfloat16); needs CUDA."""


FormatName = Literal[
    "auto", "standard", "standard-implicit", "conversational", "conversational-implicit",
    "ultrafeedback", "hh-rlhf", "align-anything", "sharegpt",
]
"""Dataset shapes :mod:`dpokit.data.formats` reads (``auto``: detected from the first rows)."""


@dataclass
class Columns:
    """Which column of a dataset holds each part of a pair, e.g. ``{prompt: question, chosen: good}``.

    Unset parts keep their usual column name; the renamed row then goes through format
    detection like any other row."""

    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    system: str | None = None


@dataclass
class DataSource:
    """One dataset: a local file (.jsonl/.json/.parquet/.csv), a saved dataset folder, or a hub id."""

    path: str = ""
    name: str | None = None
    """Hub subset, as ``load_dataset(path, name=...)``."""
    split: str = "train"
    revision: str | None = None
    """Hub dataset revision (branch, tag or commit); None is the default branch."""
    weight: float = 1.0
    """Share of this source in a mix: its pairs are used ``round(weight * n)`` times in all
    (at least once): whole copies, then a seed-determined subset (see the README)."""
    format: FormatName | None = None
    """Overrides ``data.format`` for this source."""
    columns: Columns | None = None
    """Overrides ``data.columns`` for this source."""


@dataclass
class DataConfig:
    train: DataSource | list[DataSource] = field(default_factory=DataSource)
    """One dataset, or a list of them mixed by their ``weight``."""
    eval: DataSource | list[DataSource] | None = None
    """A separate eval dataset (or list); None splits ``eval_fraction`` off the train data."""
    eval_fraction: float = 0.0
    max_length: int = 1024
    """Longest prompt + reply, in tokens, of either side of a pair."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """Pairs over ``max_length``: ``truncate`` drops the oldest whole turns of a multi-turn prompt
    (the system message stays), then cuts the prompt from the left and the replies from the right
    (keeping their end-of-turn token); ``drop`` removes them."""
    num_proc: int | None = None
    format: FormatName = "auto"
    """Dataset shape; ``auto`` detects it from the first rows of each source (the shape most have)."""
    columns: Columns | None = None
    """Rename columns before detection, e.g. ``{prompt: question, chosen: good, rejected: bad}``."""
    system_prompt: str | None = None
    """System message for conversational pairs that have none (a ``system`` column wins)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Variables for the chat template of every conversational pair, e.g. ``{enable_thinking: false}``
    (Qwen3); a row's own ``chat_template_kwargs`` column wins. Generation (compare, chat) of the run
    uses them too."""
    on_error: Literal["raise", "skip"] = "raise"
    """A bad row: ``raise`` stops with its file, row and field; ``skip`` drops it, counted by reason."""
    cache: bool = True
    """Keep tokenized pairs under ``$DPOKIT_CACHE/datasets`` (default ``~/.cache/dpokit``),
    keyed by data, tokenizer and these settings, so the next run skips tokenization."""


def data_sources(value: DataSource | list[DataSource] | None) -> list[DataSource]:
    """``data.train`` / ``data.eval`` as a list of sources (empty for None)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


@dataclass
class TrainingConfig:
    learning_rate: float = 1e-6
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    """After the warmup (every schedule has one): linear or half-cosine decay to 0 at the last step, or constant."""
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    """Takes precedence over ``warmup_ratio`` when above 0."""
    num_train_epochs: float = 1.0
    max_steps: int = -1
    """Optimizer steps; above 0 it overrides ``num_train_epochs``."""
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    """0 disables clipping (the norm is still reported)."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seed: int = 42
    gradient_checkpointing: bool = False
    bf16: bool = False
    """Mixed precision: compute in bfloat16 (autocast) over the loaded weights. With
    ``dtype: float32`` the weights, gradients and optimizer stay float32, so small updates are
    kept; pure bfloat16 weights round away AdamW steps below ~1/256 of a weight."""
    fp16: bool = False
    """Mixed precision in float16 for GPUs without bfloat16 (T4, V100): autocast to float16 and
    dynamic loss scaling (steps whose gradients overflow are skipped, the scale lowered). The
    trained weights must be float32: ``dtype: float32``, or LoRA (float32 adapters) on a base of
    any dtype; a QLoRA base then computes in float16 with ``dtype: float16``."""
    padding_free: bool = True
    """Pack each micro-batch's sequences back to back into rows of up to 2 x ``max_length`` tokens
    (usually one) with restarting positions: padding only where rows differ in length."""
    prefix_sharing: bool = True
    """One sequence per pair (prompt once, then chosen, then rejected) with a mask that keeps
    rejected tokens from seeing chosen ones: the prompt is computed once, not twice."""
    precompute_ref_log_probs: bool = True
    """Score every pair with the reference once before training (cached on disk) and free the
    reference model; false keeps it in memory and scores each micro-batch on the fly."""
    sync_ref_model: bool = False
    """TR-DPO (Gorbatovski et al. 2024): every ``ref_model_sync_steps`` optimizer steps the reference
    moves toward the policy, reference = α·policy + (1-α)·reference with α = ``ref_model_mixup_alpha``.
    Needs a live reference of its own (precompute_ref_log_probs=false, no LoRA); checkpoints then hold
    the reference too, so a resumed run goes on with it."""
    ref_model_mixup_alpha: float = 0.6
    """α of ``sync_ref_model``, in (0, 1] (TRL's default)."""
    ref_model_sync_steps: int = 512
    """Optimizer steps between two reference updates of ``sync_ref_model`` (TRL's default)."""
    optim: Literal["adamw_torch", "adamw_8bit"] = "adamw_torch"
    """``adamw_8bit``: bitsandbytes' 8-bit AdamW (needs CUDA)."""
    torch_compile: bool = False
    """``torch.compile`` each decoder layer (dynamic shapes: packed rows vary in length); see
    :func:`dpokit.modeling.compile_layers`."""
    chunked_logps: bool = True
    """Reply log-probs from the decoder's hidden states at reply positions only, through the
    output layer in chunks (never a [tokens, vocab] logits tensor); false takes the model's own
    full logits over every position, the naive way (for comparison and debugging)."""
    logps_chunk_size: int = 1024
    """Reply tokens per output-layer chunk when computing log-probs (memory vs. speed)."""


LossName = Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                   "apo_down", "discopop", "aot", "aot_unpaired", "sft", "simpo"]
"""dpokit.losses.ALL_LOSSES, spelled out for the type checks of config values."""


@dataclass
class LossConfig:
    loss_type: list[LossName] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    """One weight (> 0) per loss in ``loss_type``; None means 1.0 each."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    """Probability that a pair's label is flipped (cDPO / robust DPO); in [0, 0.5). Read by
    ``sigmoid``, ``robust``, ``simpo``, ``aot``, ``aot_unpaired`` and ``exo_pair`` (which needs it
    > 0, e.g. 1e-3); refused when ``loss_type`` has none of them."""
    length_normalize: bool | None = None
    """Average log-prob per reply token instead of the sum, for the losses with a reference
    (all but simpo and sft). None: on for ``ipo`` (as TRL), off for the others. ``simpo``
    and ``sft`` always average; setting it without a loss it applies to is refused."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin; refused at another value when ``loss_type`` has no simpo."""
    discopop_tau: float = 0.05
    """DiscoPOP's temperature (> 0) of the mix of its logistic and exponential parts (TRL's
    default); refused at another value when ``loss_type`` has no discopop."""
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    """The divergence from the reference that the loss regularizes (f-DPO, Wang et al. 2023): DPO's
    reverse KL, or forward KL, Jensen-Shannon, or an α-divergence. Another than reverse_kl applies to
    the losses of the reward margin alone (sigmoid, robust, ipo, hinge, exo_pair, discopop) and is
    refused with the others (sft and simpo, which have no reference, combine with it)."""
    f_alpha_divergence_coef: float = 0.5
    """α of ``f_divergence_type: alpha_divergence`` (0 gives forward KL, 1 reverse KL); refused at
    another value with the other divergences."""
    ld_alpha: float | None = None
    """LD-DPO (Liu et al. 2024): in the losses with a reference, each reply's log-probs summed as its
    first min(|y_c|, |y_r|) tokens plus ``ld_alpha`` (in [0, 1]) times the rest, so the longer reply's
    excess length weighs less (policy and reference alike). None (and 1.0) is plain DPO; sft and
    simpo read the plain sums. Refused when ``loss_type`` has no loss with a reference."""
    router_aux_loss_coef: float = 0.0
    """A mixture-of-experts model's load-balancing loss (its transformers class's, e.g. Mixtral's or
    Qwen2-MoE's) added to the loss with this weight (> 0), over every token of the micro-batch as a
    padded batch would count them; 0 adds none. Refused for a model without one."""
    use_weighting: bool = False
    """WPO (Zhou et al. 2024): weigh each pair's loss by how likely the policy is to write its two
    replies itself (per reply, exp of the mean over its tokens of log p(y_t) - log Σ_v p_v²; no
    gradient through the weight). Refused with aot and aot_unpaired, which sort pairs."""


@dataclass
class RunConfig:
    output_dir: str = "runs/dpo"
    logging_steps: int = 10
    eval_steps: int | None = None
    """Evaluate every N optimizer steps; None evaluates only at the end."""
    eval_on_start: bool = False
    """Also evaluate before the first step, so curves start from the reference's numbers."""
    save_steps: int | None = 500
    """Checkpoint every N optimizer steps; None saves only ``final/``."""
    save_total_limit: int | None = 2
    report_to: list[Literal["none", "tensorboard", "wandb"]] = field(default_factory=lambda: ["none"])
    resume_from_checkpoint: str | None = None
    """A ``checkpoints/step-N`` folder, or ``latest`` for the newest in ``output_dir``. Resuming from
    an earlier checkpoint of ``output_dir`` removes its later ones (the steps are redone)."""
    overwrite_output_dir: bool = False
    """Delete an earlier run's checkpoints, ``final/``, plots and metrics in ``output_dir`` before
    starting; without it a new run there is refused (it would mix with the old one)."""
    progress_bar: bool = True
    plots: bool = True
    """Write ``plots/*.png`` at the end of the run (``dpokit report`` writes them from any run later)."""
    ddp_timeout: int = 1800
    """Seconds a process of a launched run waits in a collective before the run is stopped: the others
    wait while the main process alone downloads, tokenizes, reads weights or saves a checkpoint (NCCL's
    own default, 600, is short for a large model's checkpoint; gloo's is 1800)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "loss": LossConfig,
    "run": RunConfig,
}
# key -> section, for the plain (section-less) spelling.
_KEY_SECTION = {f.name: s for s, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)}
assert len(_KEY_SECTION) == sum(len(dataclasses.fields(c)) for c in _SECTION_CLASSES.values()), (
    "config key names must be unique across sections"
)


# ----------------------------------------------------------------------------- building


SPELLED_OTHERWISE = {
    "sigmoid_norm": "TRL's sigmoid_norm is dpokit's loss_type sigmoid with length_normalize: true",
}
"""Values other tools take that dpokit spells another way, and how."""


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _unknown_key(key: str, where: str, candidates: list[str]) -> ConfigError:
    return ConfigError(f"unknown config key '{key}'{where}.{_suggest(key.split('.')[-1], candidates)}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``, converting where it is unambiguous."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"'{key}' cannot be null")
    if origin is Literal:
        if value in args:
            return value
        if value in SPELLED_OTHERWISE:
            raise ConfigError(f"'{key}' {value!r}: {SPELLED_OTHERWISE[value]}")
        raise ConfigError(f"'{key}' must be one of {list(args)}, got {value!r}.{_suggest(str(value), [str(a) for a in args])}")
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, e.g. {{enable_thinking: false}}, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = args
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(items)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is DataSource:
            return DataSource(path=value)
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .nan and .inf: no setting means either
                raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in the schema, not user input


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(f"{prefix}{key}", "", names)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _nest(flat: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Put section-less keys into their section; keep sectioned ones as they are."""
    nested: dict[str, dict[str, Any]] = {s: {} for s in _SECTION_CLASSES}

    def put(section: str, key: str, value: Any) -> None:
        if key in nested[section]:
            raise ConfigError(f"'{key}' is set twice in {source}, at the top level and under '{section}:' "
                              f"({nested[section][key]!r} and {value!r}): keep one")
        nested[section][key] = value

    for key, value in flat.items():
        if key in _SECTION_CLASSES:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"section '{key}' in {source} must be a mapping of keys, got {value!r}")
            for name, item in value.items():
                put(key, name, item)
        elif key in _KEY_SECTION:
            put(_KEY_SECTION[key], key, value)
        else:
            raise _unknown_key(key, f" in {source}", list(_KEY_SECTION) + list(_SECTION_CLASSES))
    return nested


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); the value is parsed as YAML (``5e-7``, ``[a, b]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. learning_rate=5e-7)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 5e-7 as a string (it wants 5.0e-7); numbers are what a user meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def _apply_override(tree: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    if path[0] not in _SECTION_CLASSES:
        if path[0] not in _KEY_SECTION:
            raise _unknown_key(".".join(path), f" in override '{text}'", list(_KEY_SECTION) + list(_SECTION_CLASSES))
        path = [_KEY_SECTION[path[0]], *path]
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part in ("train", "eval"):  # DataSource shorthand
            child = {"path": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[path[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently:
    a second ``training:`` section dropped every setting of the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: '{key}' is given twice in the same mapping "
                                  "(the second would replace the first): keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"{path}, {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def add_config_arguments(parser, override_example: str) -> None:
    """The ``CONFIG [overrides...]`` positionals of a command that reads a run config (train, plan);
    :func:`split_config_argument` sorts them out."""
    parser.add_argument("config", nargs="?", help="YAML config file (optional when every key is given as an override)")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {override_example}")


def split_config_argument(first: str | None, rest: list[str]) -> tuple[str | None, list[str]]:
    """A command's ``CONFIG [overrides...]`` arguments: the first is an override, not a file, when it
    reads ``key=value`` and does not end in .yaml/.yml (``dpokit train learning_rate=1e-6 ...``)."""
    if first is not None and "=" in first and not first.endswith((".yaml", ".yml")):
        return None, [first, *rest]
    return first, list(rest)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, for_training: bool = True) -> Config:
    """Read a YAML config (or none), apply ``key=value`` overrides, fill defaults, validate
    (``for_training``: see :func:`validate`)."""
    source = str(path) if path else "the command line"
    raw = _read_yaml(Path(path)) if path else {}
    tree = _nest(raw, source)
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply_override(tree, keys, value, text)
    sections = {name: _build(cls, tree[name], prefix=f"{name}.") for name, cls in _SECTION_CLASSES.items()}
    config = Config(**sections)
    validate(config, base_dir=Path(path).parent if path else None, for_training=for_training)
    return config


def _check_loss_settings_apply(lo: LossConfig) -> None:
    """Refuse a loss setting that none of ``loss_type``'s losses reads: it would change nothing."""
    from dpokit.losses import LABEL_SMOOTHED, MARGIN_LOSSES, PAIRWISE_WITH_REFERENCE

    if lo.label_smoothing > 0 and not set(lo.loss_type) & set(LABEL_SMOOTHED):
        raise ConfigError(
            f"loss.label_smoothing={lo.label_smoothing} applies to {', '.join(LABEL_SMOOTHED)}; loss_type "
            f"{lo.loss_type} has none of them, so it would change nothing: set label_smoothing=0, or add one of them"
        )
    if lo.length_normalize is not None and not set(lo.loss_type) & set(PAIRWISE_WITH_REFERENCE):
        raise ConfigError(
            f"loss.length_normalize applies to the losses with a reference ({', '.join(PAIRWISE_WITH_REFERENCE)}); "
            f"loss_type {lo.loss_type} has none of them (simpo and sft always average over reply tokens): "
            "leave length_normalize null"
        )
    if lo.length_normalize is False and "simpo" in lo.loss_type:
        raise ConfigError(
            "loss.length_normalize=false cannot apply to simpo, which is defined on average log-probs per reply "
            "token (Meng et al. 2024): leave length_normalize null with simpo"
        )
    if lo.simpo_gamma != LossConfig.simpo_gamma and "simpo" not in lo.loss_type:
        raise ConfigError(
            f"loss.simpo_gamma={lo.simpo_gamma} is SimPO's target margin, but loss_type {lo.loss_type} has no simpo: "
            "add simpo to loss_type, or remove simpo_gamma"
        )
    if lo.discopop_tau != LossConfig.discopop_tau and "discopop" not in lo.loss_type:
        raise ConfigError(
            f"loss.discopop_tau={lo.discopop_tau} is DiscoPOP's temperature, but loss_type {lo.loss_type} has no "
            "discopop: add discopop to loss_type, or remove discopop_tau"
        )
    if lo.f_divergence_type != "reverse_kl":
        no_form = [name for name in lo.loss_type if name in PAIRWISE_WITH_REFERENCE and name not in MARGIN_LOSSES]
        if no_form or not set(lo.loss_type) & set(MARGIN_LOSSES):
            raise ConfigError(
                f"loss.f_divergence_type={lo.f_divergence_type} applies to the losses of the reward margin alone "
                f"({', '.join(MARGIN_LOSSES)}); loss_type {lo.loss_type} "
                + (f"has {', '.join(no_form)}, whose f-divergence form does not hold (they read each reply's log-ratio "
                   "apart, or sort margins)" if no_form else "has none of them")
                + ": use one of them, or f_divergence_type=reverse_kl"
            )
    if lo.f_alpha_divergence_coef != LossConfig.f_alpha_divergence_coef and lo.f_divergence_type != "alpha_divergence":
        raise ConfigError(
            f"loss.f_alpha_divergence_coef={lo.f_alpha_divergence_coef} is α of the α-divergence, but "
            f"f_divergence_type is {lo.f_divergence_type}: set f_divergence_type=alpha_divergence, or remove "
            "f_alpha_divergence_coef"
        )
    if lo.ld_alpha is not None and not set(lo.loss_type) & set(PAIRWISE_WITH_REFERENCE):
        raise ConfigError(
            f"loss.ld_alpha={lo.ld_alpha} weighs the reply log-probs of the losses with a reference, but loss_type "
            f"{lo.loss_type} has none of them (sft and simpo read the plain sums): leave ld_alpha null"
        )
    sorting = [name for name in lo.loss_type if name in ("aot", "aot_unpaired")]
    if lo.use_weighting and sorting:
        raise ConfigError(
            f"loss.use_weighting (WPO) weighs each pair's loss, but {', '.join(sorting)} sorts the pairs' margins, "
            "so its losses belong to no pair: leave use_weighting false with it"
        )
    if "exo_pair" in lo.loss_type and lo.label_smoothing == 0:
        raise ConfigError(
            "loss exo_pair needs label_smoothing > 0: it is ε of EXO's target (1-ε, ε), whose log would be -inf "
            "at 0; set label_smoothing to a small value, e.g. 1e-3"
        )


def _beside_config(path: str, base_dir: Path, where: str, refuse_both: bool = True) -> str:
    """A relative data ``path`` found from the working directory, else from the config file's folder
    ``base_dir``; with ``refuse_both``, refused when both hold a different file of that name (which
    one was meant?)."""
    here, beside = Path(path), base_dir / path
    if here.is_absolute() or not beside.exists():
        return path
    if not here.exists():
        return str(beside)
    if refuse_both and here.resolve() != beside.resolve():
        raise ConfigError(f"{where}={path} names two files, {here.resolve()} (from the working directory) and "
                          f"{beside.resolve()} (from the config file's folder): give the one you mean as an absolute path")
    return path


def _check_settings_take_effect(config: Config) -> None:
    """Refuse settings a run would silently do nothing with: eval settings without eval data,
    ``eval_fraction`` beside ``data.eval``, loss settings no chosen loss reads, LoRA settings
    without LoRA, new-adapter settings beside a starting adapter, reference settings for a
    reference-free loss, settings of a switched-off feature."""
    d, r, m, t = config.data, config.run, config.model, config.training
    default_model, default_training = ModelConfig(), TrainingConfig()
    if d.eval is None and d.eval_fraction <= 0 and t.per_device_eval_batch_size != default_training.per_device_eval_batch_size:
        raise ConfigError(f"training.per_device_eval_batch_size={t.per_device_eval_batch_size} sizes eval batches, and "
                          "there is no eval data (data.eval or data.eval_fraction): give some, or remove it")
    lora_settings = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save")
    changed = [k for k in lora_settings if getattr(m, k) != getattr(default_model, k)]
    if changed and not (m.use_peft or m.adapter_name_or_path):
        raise ConfigError(f"model.{', model.'.join(changed)} describe LoRA adapters, but model.use_peft is false, so the "
                          "whole model would train (full fine-tuning) and they would do nothing: set model.use_peft=true, "
                          f"or remove {', '.join(changed)}")
    if not needs_reference(config):
        ref = [f"model.{k}" for k in ("ref_model_name_or_path", "ref_revision") if getattr(m, k)]
        ref += ["training.precompute_ref_log_probs=false"] if not t.precompute_ref_log_probs else []
        if ref:
            raise ConfigError(f"{', '.join(ref)} concern the reference model, and loss {config.loss.loss_type} uses none "
                              f"(reference-free): remove {'them' if len(ref) > 1 else 'it'}")
    elif m.ref_revision and not m.ref_model_name_or_path:
        raise ConfigError("model.ref_revision is the revision of model.ref_model_name_or_path, which is not set (the "
                          "reference is the starting policy): set ref_model_name_or_path, or remove ref_revision")
    for key, revision_key in (("name_or_path", "revision"), ("ref_model_name_or_path", "ref_revision")):
        name, revision = getattr(m, key), getattr(m, revision_key)
        if revision and name and (name.startswith("builtin:") or Path(name).expanduser().is_dir()):
            what = "a model dpokit builds" if name.startswith("builtin:") else "a local folder"
            raise ConfigError(f"model.{revision_key}={revision} picks a version of a hub model, and model.{key}={name} is "
                              f"{what}, read as it is, so it would change nothing: remove {revision_key}")
    if not t.chunked_logps and t.logps_chunk_size != default_training.logps_chunk_size:
        raise ConfigError(f"training.logps_chunk_size={t.logps_chunk_size} sizes the chunks of chunked_logps, which is "
                          "false: remove one of them")
    if r.save_total_limit != RunConfig().save_total_limit and r.save_total_limit is not None and not r.save_steps:
        raise ConfigError(f"run.save_total_limit={r.save_total_limit} keeps the newest checkpoints, and run.save_steps "
                          "is not set, so none are saved: set save_steps, or remove save_total_limit")
    if d.eval is not None and d.eval_fraction > 0:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction} holds out train pairs for evaluation, and data.eval "
                          "gives eval data already, so it would hold out nothing: set only one of them")
    if d.eval is None and d.eval_fraction <= 0 and (r.eval_steps or r.eval_on_start):
        setting = f"run.eval_steps={r.eval_steps}" if r.eval_steps else "run.eval_on_start=true"
        raise ConfigError(f"{setting} evaluates on data.eval or a data.eval_fraction of the train pairs, and neither is "
                          f"set, so it would evaluate nothing: give one, or leave {setting.split('=')[0]} unset")
    _check_loss_settings_apply(config.loss)
    if m.adapter_name_or_path:
        if changed:
            raise ConfigError(
                f"model.{', model.'.join(changed)} describe new adapters, but adapter_name_or_path trains the existing "
                f"adapter {m.adapter_name_or_path} further, with the settings in its adapter_config.json: remove "
                f"{', '.join(changed)}, or train new adapters (use_peft=true without adapter_name_or_path)"
            )


def _check_output_dir(output_dir: str) -> None:
    """``output_dir``, or a folder above it, must not be a file."""
    for folder in (Path(output_dir), *Path(output_dir).parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"run.output_dir={output_dir}: {folder} is a file, not a folder: choose another output_dir")
        if folder.is_dir():
            return


def validate(config: Config, base_dir: Path | None = None, for_training: bool = True) -> None:
    """Cross-field checks; resolves relative data paths against the config file's folder.

    ``for_training`` (a run about to start) also refuses what would do nothing or is ambiguous
    (:func:`_check_settings_take_effect`, a data path found two ways, an output_dir that is a file).
    A finished run's ``config.yaml`` read back (by eval, export, compare, chat) and ``dpokit plan``
    skip those: such a run trained as it did, with settings an older dpokit accepted, and a plan
    needs no data."""
    d, t, lo, r = config.data, config.training, config.loss, config.run
    train_sources = data_sources(d.train)
    if not train_sources or not all(s.path for s in train_sources):
        raise ConfigError("data.train is not set: give a .jsonl/.json/.parquet/.csv file or a hub dataset id")
    if d.chat_template_kwargs:
        from dpokit.data.formats import check_template_kwargs

        check_template_kwargs(d.chat_template_kwargs, "data.chat_template_kwargs", ConfigError)
    for key, sources in (("data.train", train_sources), ("data.eval", data_sources(d.eval))):
        for i, source in enumerate(sources):
            where = f"{key}[{i}]" if len(sources) > 1 else key
            if not source.path:
                raise ConfigError(f"{where}.path is not set: give a .jsonl/.json/.parquet/.csv file or a hub dataset id")
            if not source.weight > 0:
                raise ConfigError(f"{where}.weight must be > 0 (the share of this source in the mix), got {source.weight}")
            if base_dir is not None:
                source.path = _beside_config(source.path, base_dir, where, refuse_both=for_training)
    if d.num_proc is not None and d.num_proc < 1:
        raise ConfigError(f"data.num_proc must be at least 1 or null, got {d.num_proc}")
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    if d.max_length < 2:
        raise ConfigError(f"data.max_length must be at least 2, got {d.max_length}")
    positive = {
        "training.per_device_train_batch_size": t.per_device_train_batch_size,
        "training.per_device_eval_batch_size": t.per_device_eval_batch_size,
        "training.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "training.logps_chunk_size": t.logps_chunk_size,
        "run.logging_steps": r.logging_steps,
        "run.ddp_timeout": r.ddp_timeout,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    for key in ("eval_steps", "save_steps", "save_total_limit"):
        value = getattr(r, key)
        if value is not None and value < 1:
            raise ConfigError(f"run.{key} must be at least 1 or null, got {value}")
    if for_training:
        _check_output_dir(r.output_dir)
        _check_settings_take_effect(config)
    if r.overwrite_output_dir and r.resume_from_checkpoint:
        raise ConfigError(
            "run.overwrite_output_dir=true deletes an earlier run in output_dir, and resume_from_checkpoint continues "
            "one: set only one of them"
        )
    if t.learning_rate < 0:
        raise ConfigError(f"training.learning_rate must be >= 0, got {t.learning_rate}")
    if not 0.0 <= t.warmup_ratio <= 1.0:
        raise ConfigError(f"training.warmup_ratio must be in [0, 1], got {t.warmup_ratio}")
    for name, value, meaning in (("warmup_steps", t.warmup_steps, "0 uses warmup_ratio"),
                                 ("max_grad_norm", t.max_grad_norm, "0 turns clipping off"),
                                 ("weight_decay", t.weight_decay, "0 is none")):
        if value < 0:
            raise ConfigError(f"training.{name} must be 0 or more ({meaning}), got {value}")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        raise ConfigError("set training.max_steps > 0 or training.num_train_epochs > 0")
    if not lo.loss_type:
        raise ConfigError(f"loss.loss_type is empty: name at least one of {', '.join(typing.get_args(LossName))}")
    if len(set(lo.loss_type)) != len(lo.loss_type):
        raise ConfigError(f"loss.loss_type lists a loss twice: {lo.loss_type}")
    if lo.loss_weights is not None and len(lo.loss_weights) != len(lo.loss_type):
        raise ConfigError(
            f"loss.loss_weights has {len(lo.loss_weights)} weights for {len(lo.loss_type)} losses "
            f"{lo.loss_type}: give one weight per loss"
        )
    if lo.loss_weights is not None and not all(w > 0 for w in lo.loss_weights):
        raise ConfigError(
            f"loss.loss_weights must each be > 0, got {lo.loss_weights} for {lo.loss_type} (a negative weight "
            "would push that loss up; a loss that should not count goes out of loss_type)"
        )
    if lo.beta <= 0:
        raise ConfigError(f"loss.beta must be > 0, got {lo.beta}")
    if lo.discopop_tau <= 0:
        raise ConfigError(f"loss.discopop_tau must be > 0, got {lo.discopop_tau}")
    if lo.router_aux_loss_coef < 0:
        raise ConfigError(f"loss.router_aux_loss_coef must be >= 0, got {lo.router_aux_loss_coef}")
    if lo.ld_alpha is not None and not 0.0 <= lo.ld_alpha <= 1.0:
        raise ConfigError(f"loss.ld_alpha must be in [0, 1] (or null), got {lo.ld_alpha}")
    if not 0.0 <= lo.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {lo.label_smoothing}")
    if t.prefix_sharing and config.model.attn_implementation not in (None, *PREFIX_ATTENTION):
        raise ConfigError(
            f"training.prefix_sharing needs a custom attention mask, which {config.model.attn_implementation} "
            f"cannot take (dpokit gives one to {', '.join(PREFIX_ATTENTION)}): set prefix_sharing=false "
            f"(padding-free packing still works with it), or attn_implementation={VARLEN_ATTENTION} (torch's own "
            "flash-attention varlen kernel) or flex_attention"
        )
    m = config.model
    if t.bf16 and t.fp16:
        raise ConfigError("training.bf16 and training.fp16 are both set: choose one (bf16 where the GPU has bfloat16)")
    if t.bf16 and m.dtype == "float16":
        raise ConfigError("training.bf16 autocasts to bfloat16 but model.dtype is float16: use dtype=float32 (or bfloat16)")
    lora = m.use_peft or m.adapter_name_or_path
    if t.fp16 and not lora and m.dtype != "float32":
        raise ConfigError(
            f"training.fp16 scales float32 gradients, but model.dtype is {m.dtype} and full fine-tuning trains those "
            "weights: use dtype=float32 (or LoRA, whose adapters are float32)"
        )
    if t.fp16 and m.dtype == "bfloat16":
        raise ConfigError("training.fp16 autocasts to float16 but model.dtype is bfloat16: use dtype=float16 or float32 (or bf16=true)")
    if m.load_in_4bit and not (m.use_peft or m.adapter_name_or_path):
        raise ConfigError("model.load_in_4bit (QLoRA) trains adapters on a frozen 4-bit base: set use_peft=true")
    if m.lora_r < 1 or m.lora_alpha < 1 or not 0.0 <= m.lora_dropout < 1.0:
        raise ConfigError(f"LoRA needs lora_r >= 1, lora_alpha >= 1 and lora_dropout in [0, 1): got {m.lora_r}, {m.lora_alpha}, {m.lora_dropout}")
    if (m.use_peft or m.adapter_name_or_path) and m.ref_model_name_or_path:
        raise ConfigError("with LoRA the reference is the base model with the starting adapters: unset ref_model_name_or_path")
    _check_sync_ref_model(config)
    if m.adapter_name_or_path and needs_reference(config) and not t.precompute_ref_log_probs:
        raise ConfigError(
            "a live reference for a run that starts from an adapter would need the base loaded twice (a live LoRA "
            "reference is the policy with its adapters off, and these adapters train away from the starting ones): "
            "keep precompute_ref_log_probs=true (the reference is then scored once from base + starting adapter)"
        )
    if "none" in r.report_to and len(r.report_to) > 1:
        raise ConfigError(f"run.report_to mixes 'none' with trackers: {r.report_to}")


def _check_sync_ref_model(config: Config) -> None:
    """TR-DPO's settings: refused where there is no live reference of its own to update, and the
    mixup settings without it (they would change nothing)."""
    t, m = config.training, config.model
    if not t.sync_ref_model:
        for key, default in (("ref_model_mixup_alpha", TrainingConfig.ref_model_mixup_alpha),
                             ("ref_model_sync_steps", TrainingConfig.ref_model_sync_steps)):
            if getattr(t, key) != default:
                raise ConfigError(f"training.{key}={getattr(t, key)} is TR-DPO's, but sync_ref_model is false: "
                                  f"set sync_ref_model=true, or remove {key}")
        return
    why = None
    if not needs_reference(config):
        why = f"loss_type {config.loss.loss_type} has no loss with a reference"
    elif t.precompute_ref_log_probs:
        why = "the reference is scored once before training: set precompute_ref_log_probs=false"
    elif m.use_peft or m.adapter_name_or_path:
        why = "with LoRA the reference is the base with the adapters switched off, no weights of its own: train without LoRA"
    if why:
        raise ConfigError(f"training.sync_ref_model moves a live reference model toward the policy, but {why}")
    if not 0.0 < t.ref_model_mixup_alpha <= 1.0:
        raise ConfigError(f"training.ref_model_mixup_alpha must be in (0, 1], got {t.ref_model_mixup_alpha}")
    if t.ref_model_sync_steps < 1:
        raise ConfigError(f"training.ref_model_sync_steps must be at least 1, got {t.ref_model_sync_steps}")


def batch_layout(training: TrainingConfig) -> str:
    """The batch layout the two switches select (see :mod:`dpokit.data.batching`)."""
    if training.prefix_sharing:
        return "prefix_packed" if training.padding_free else "prefix_padded"
    return "packed" if training.padding_free else "padded"


def needs_reference(config: Config) -> bool:
    """Whether any configured loss compares against a reference model."""
    return any(name not in ("simpo", "sft") for name in config.loss.loss_type)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config, local paths made absolute: relative ones were found from where the
    run started (or its config file's folder), and a saved config is read from anywhere."""
    tree = config.to_dict()

    def absolute(value: str | None) -> str | None:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    for key in ("name_or_path", "ref_model_name_or_path", "adapter_name_or_path"):
        tree["model"][key] = absolute(tree["model"][key])
    for key in ("train", "eval"):
        for source in tree["data"][key] if isinstance(tree["data"][key], list) else [tree["data"][key]]:
            if source is not None:
                source["path"] = absolute(source["path"])
    tree["run"]["resume_from_checkpoint"] = absolute(tree["run"]["resume_from_checkpoint"])
    tree["run"]["output_dir"] = absolute(tree["run"]["output_dir"])
    Path(path).write_text(yaml.safe_dump(tree, sort_keys=False))
