"""Loading the policy, the reference and the tokenizer from a hub id, a folder or a builtin."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from dpokit.config import VARLEN_ATTENTION, ConfigError, ModelConfig
from dpokit.hub import OFFLINE_HINT, unreachable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_path(name_or_path: str) -> str:
    """A ``builtin:`` name becomes its cached local folder (built on first use); a local folder
    passes through (``~`` expanded), and so does anything that can be a Hugging Face hub id.

    Raises :class:`ConfigError` for a local path that names no folder: one that starts with
    ``.``, ``/`` or ``~``, has more than one ``/``, breaks the hub's repo-id rules, or is a file,
    instead of a hub lookup's error. (``runs/nothere`` can be a hub id: errors about it add
    :func:`not_here`.)
    """
    if name_or_path.startswith("builtin:"):
        from dpokit.tiny import resolve_builtin

        try:
            return resolve_builtin(name_or_path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    local = Path(name_or_path).expanduser()
    if local.is_dir():  # absolute: a LoRA adapter saved from it names its base so, wherever it is read from
        return str(local.resolve())
    why = _not_a_hub_id(name_or_path)
    fix = ("a folder with config.json and weights, a dpokit run or LoRA adapter folder, "
           "a Hugging Face hub id like Qwen/Qwen2.5-0.5B-Instruct, or builtin:tiny-qwen2")
    if local.exists():
        raise ConfigError(f"{name_or_path} is a file, not a model folder (model.name_or_path / MODEL argument): give {fix}")
    if why:
        raise ConfigError(f"no such folder: {name_or_path} (model.name_or_path / MODEL argument; {why}): fix the path, or give {fix}")
    return name_or_path


def _not_a_hub_id(name: str) -> str:
    """Why ``name`` can only be a local path, not a Hugging Face hub id, or ``""`` when it can be one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")):
        return "a path starting with '.', '/' or '~' is not a hub id"
    if name.count("/") > 1:
        return "a hub id has at most one '/'"
    try:
        validate_repo_id(name)
    except HFValidationError:
        return "not a valid hub id"
    return ""


def not_here(path: str) -> str:
    """A note for messages about ``path``, a hub id that failed to load or is not a run: that no local
    folder of that name exists either, when its first part is a local folder (``runs/nothere``)."""
    namespace = path.split("/")[0] if "/" in path else ""
    if namespace and Path(namespace).expanduser().is_dir() and not Path(path).expanduser().exists():
        return f" (there is no folder {path} either: {namespace}/ holds no such entry)"
    return ""


def no_model_config(path: str) -> str | None:
    """Why the local folder ``path`` is no model to load (it holds no ``config.json``; a dpokit run's
    folder names its model), or None (not a local folder, or one with a config.json)."""
    from dpokit.resolve import is_run_dir

    folder = Path(path).expanduser()
    if not folder.is_dir() or (folder / "config.json").is_file():
        return None
    if is_run_dir(folder):
        return f"{path} is a dpokit run's folder, not a model: its model is {folder / 'final'} (or a checkpoints/step-N)"
    return f"{path} holds no config.json, so it is no Hugging Face model folder"


@contextmanager
def every_weight_read():
    """Loading inside it reads every weight in every process. Launched with Accelerate's FSDP
    ``cpu_ram_efficient_loading`` (``FSDP_CPU_RAM_EFFICIENT_LOADING=true``), transformers 4.x reads
    them on the first process of each machine only and leaves the others' models uninitialized,
    for sharding to fill from the first; ``dpokit eval`` and ``compare`` never shard, and training
    builds the models it fills that way itself (:func:`empty_causal_lm`)."""
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved


def _from_pretrained(loader, path: str, what: str, **kwargs):
    if what in ("model", "model config") and (why := no_model_config(path)):
        raise ConfigError(f"could not load the {what} from '{path}': {why}")
    if not Path(path).expanduser().exists() and (why := unreachable(path, "model")):
        raise ConfigError(f"could not load the {what} from '{path}'{not_here(path)}: {why}.\n"
                          f"Give a local folder with config.json and weights or builtin:tiny-qwen2, or {OFFLINE_HINT}.")
    try:
        with every_weight_read():
            return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"could not load the {what} from '{path}'{not_here(path)}: {first_line}\n"
            "Give a local folder with config.json and weights, a Hugging Face hub id reachable "
            "from this machine, or builtin:tiny-qwen2."
        ) from None


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(config.name_or_path)
    tokenizer = _from_pretrained(
        AutoTokenizer, path, "tokenizer", revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def uses_peft(config: ModelConfig) -> bool:
    return config.use_peft or config.adapter_name_or_path is not None


def check_device_requirements(config: ModelConfig, optim: str, cuda: bool) -> None:
    """Options that only run on CUDA say so before anything is loaded: QLoRA and 8-bit AdamW
    (bitsandbytes' kernels) and flex_attention training (torch has no flex backward on the CPU)."""
    options = (  # (what, asked for, runs on bitsandbytes)
        ("model.load_in_4bit (QLoRA)", config.load_in_4bit, True),
        ("optim=adamw_8bit", optim == "adamw_8bit", True),
        ("attn_implementation=flex_attention", config.attn_implementation == "flex_attention", False),
    )
    needs = [what for what, on, _ in options if on]
    if needs and not cuda:
        raise ConfigError(
            f"{' and '.join(needs)} need a CUDA GPU for training, and this machine has none: on the CPU train "
            "with load_in_4bit=false, optim=adamw_torch and attn_implementation=sdpa"
        )
    bnb = [what for what, on, bitsandbytes in options if on and bitsandbytes]
    if bnb:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"{' and '.join(bnb)} need the bitsandbytes package: pip install bitsandbytes") from None


def attention_kwargs(config: ModelConfig) -> dict:
    """``from_pretrained``'s ``attn_implementation`` for ``config`` (none: transformers chooses);
    dpokit's own (dpokit_varlen) is registered with transformers first."""
    if not config.attn_implementation:
        return {}
    if config.attn_implementation == VARLEN_ATTENTION:
        from dpokit.varlen import register_varlen_attention

        register_varlen_attention()
    return {"attn_implementation": config.attn_implementation}


def sdpa_without_cudnn():
    """A context (or, as ``@sdpa_without_cudnn()``, a decorator) in which torch's sdpa never picks its
    cuDNN backend (flash, memory-efficient and math stay allowed, in torch's order). cuDNN builds an execution plan for every new sequence length,
    which dpokit's rows change at every step: measured on an H100 (torch 2.11, Qwen2.5-0.5B, 4 pairs
    per step), ~8 ms of host time per attention call, most of each training step. Forward and backward
    both run inside it (a backward follows its forward's kernel; checkpointed layers recompute there)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def load_causal_lm(config: ModelConfig, name_or_path: str | None = None, revision: str | None = None,
                   empty: bool = False) -> nn.Module:
    """The causal LM at ``name_or_path`` (default: the policy's) with the configured dtype/attention
    (and 4-bit quantization for QLoRA). ``empty``: its architecture only (:func:`empty_causal_lm`)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path or config.name_or_path)
    kwargs = dict(
        revision=revision if name_or_path else config.revision,
        dtype=DTYPES[config.dtype],
        trust_remote_code=config.trust_remote_code,
    )
    kwargs.update(attention_kwargs(config))
    if empty:
        return empty_causal_lm(path, **kwargs)
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.float16 if config.dtype == "float16" else torch.bfloat16  # float16: GPUs without bfloat16
        kwargs["dtype"] = compute
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    model = _from_pretrained(AutoModelForCausalLM, path, "model", **kwargs)
    model.config.use_cache = False
    return model


def empty_causal_lm(path: str, revision: str | None, dtype: torch.dtype, trust_remote_code: bool, **kwargs) -> nn.Module:
    """The causal LM at ``path`` built from its config.json alone: the parameters uninitialised host
    memory, never written (so not resident: the process's memory does not grow by the model), the
    buffers computed as loading computes them (rotary frequencies, which no state dict carries). For
    the processes of a sharded run whose weights the main process broadcasts into their shards
    (:func:`dpokit.sharding.weights_on_main_only`). Tied weights stay one parameter."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = _from_pretrained(AutoConfig, path, "model config", revision=revision, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device, buffers computed
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    model.tie_weights()  # as loading does (building from a config alone may leave the output layer its own)
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad)
                module._parameters[name] = made[id(param)]
    model.config.use_cache = False
    return model


def apply_lora(model: nn.Module, config: ModelConfig, adapter: str | None = None, trainable: bool = True) -> nn.Module:
    """``model`` with LoRA adapters: loaded from ``adapter`` (or ``adapter_name_or_path``), else new
    ones from the ``lora_*`` settings. Dropout of the base was disabled before; LoRA's own stays."""
    try:
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
    except ImportError:
        raise ConfigError("LoRA training needs the peft package: pip install peft") from None
    if config.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    source = adapter or config.adapter_name_or_path
    if source:
        try:
            return _tied_layers_said_plainly(lambda: PeftModel.from_pretrained(model, resolve_model_path(source), is_trainable=trainable))
        except (OSError, ValueError) as e:
            raise ConfigError(f"could not load the LoRA adapter '{source}': {str(e).strip().splitlines()[0]}") from None
    try:
        return _tied_layers_said_plainly(lambda: get_peft_model(model, new_lora_config(model, config)))
    except ValueError as e:
        raise ConfigError(lora_refusal(config.lora_target_modules, e)) from None


def wrapped_layer(module: nn.Module) -> nn.Module:
    """The layer a peft wrapper holds (a LoRA layer's ``base_layer``, a trained-whole module's
    ``original_module``), or ``module`` itself when it is no wrapper."""
    for name in ("base_layer", "original_module"):
        inner = getattr(module, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return module


def adapted_tied_layers(model: nn.Module) -> list[str]:
    """Which of the input embeddings and output layer of a peft ``model``, where the two share one
    weight (``tie_word_embeddings``), its adapter changes, each with the setting that asks for it:
    ``["the output layer (lora_modules_to_save)"]``; empty when the two are apart or neither changes."""
    base = model.get_base_model()
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    if head is None or wrapped_layer(embeddings).weight is not wrapped_layer(head).weight:
        return []
    adapted = []
    for name, layer in (("the input embeddings", embeddings), ("the output layer", head)):
        if hasattr(layer, "original_module"):
            adapted.append(f"{name} (lora_modules_to_save)")
        elif wrapped_layer(layer) is not layer:
            adapted.append(f"{name} (lora_target_modules)")
    return adapted


def _tied_layers_said_plainly(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` (new or loaded adapters on a model) without peft's warnings about a tied layer in
    the adapter (they name options and issue threads, and change from release to release); dpokit
    says instead what happens to the model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True", category=UserWarning)
        model = build()
    adapted = adapted_tied_layers(model)
    if adapted:
        warnings.warn(f"dpokit: the input embeddings and the output layer share one weight matrix (tie_word_embeddings), "
                      f"and the adapter changes {' and '.join(adapted)} on its own: the two differ from the first step, "
                      "and a merged export keeps them apart (tie_word_embeddings=false)", UserWarning, stacklevel=3)
    return model


def lora_refusal(targets: list[str], error: ValueError) -> str:
    """What to tell the user when peft refuses adapters on ``targets``."""
    reason = str(error).strip().splitlines()[0]
    fix = " (set model.lora_dropout: 0)" if "lora_dropout" in reason else ""
    return f"LoRA target modules {targets}: {reason}{fix}"


def new_lora_config(model: nn.Module, config: ModelConfig):
    """peft's ``LoraConfig`` for new adapters on ``model`` from the ``lora_*`` settings (what training
    adapts, and what ``dpokit plan`` counts on a meta-device model)."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=language_model_targets(model, config.lora_target_modules),
        modules_to_save=config.lora_modules_to_save,
        task_type="CAUSAL_LM",
    )


def load_policy(config: ModelConfig, checkpoint: str | None = None, empty: bool = False) -> nn.Module:
    """The model to train: the base, a checkpoint of it, or the base with (checkpointed) LoRA adapters.
    ``empty``: the base's architecture only (:func:`empty_causal_lm`); adapters are still read."""
    if not uses_peft(config):
        model = load_causal_lm(config, checkpoint, empty=empty)
        disable_dropout(model)
        freeze_outside_language_model(model)
        return model
    model = load_causal_lm(config, empty=empty)
    disable_dropout(model)
    return apply_lora(model, config, adapter=checkpoint)


def load_reference(config: ModelConfig, policy: nn.Module | None = None, empty: bool = False) -> nn.Module:
    """A frozen reference: the model at ``ref_model_name_or_path``; else a copy of ``policy`` (the
    starting policy, still unchanged), or else the starting model loaded again. ``empty``: the
    architecture only (:func:`empty_causal_lm`), never a copy of ``policy``."""
    if config.ref_model_name_or_path:
        reference = load_causal_lm(config, config.ref_model_name_or_path, config.ref_revision, empty=empty)
    elif uses_peft(config) and policy is None:  # the base with its starting adapter, if any
        reference = load_causal_lm(config, empty=empty)
        if config.adapter_name_or_path:
            reference = apply_lora(reference, config, trainable=False)
    elif policy is not None and not empty:
        reference = copy.deepcopy(policy)
    else:
        reference = load_causal_lm(config, empty=empty)
    disable_dropout(reference)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def text_config(config):
    """The config of the language model inside ``config``'s model: ``config`` itself for a causal LM,
    its ``text_config`` for an image-text one (Gemma 3 from 4B up, Gemma 4), whose vocabulary,
    windows and logit transforms live there."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_image_text(model: nn.Module) -> bool:
    """Whether ``model`` (a peft wrapper's base included) holds a language model beside other parts
    (a vision tower and its projector): its config keeps the language model's in ``text_config``."""
    config = model.config
    return text_config(config) is not config


def language_model_names(model: nn.Module) -> tuple[str, str]:
    """The module names of ``model``'s decoder and output layer: the parts that score text."""
    from dpokit.logps import decoder_of

    decoder, head = decoder_of(model), model.get_output_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    return names[id(decoder)], names[id(head)]


def freeze_outside_language_model(model: nn.Module) -> int:
    """Freeze what text pairs never run in an image-text model (the vision tower, its projector);
    returns how many parameters that froze (0 for a causal LM). Left trainable they get no gradient:
    counted as trained, and under DDP the second step fails waiting for their gradients."""
    if not is_image_text(model):
        return 0
    decoder, head = language_model_names(model)
    frozen = 0
    for name, param in model.named_parameters():
        if param.requires_grad and not (name.startswith(decoder + ".") or name.startswith(head + ".")):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def language_model_targets(model: nn.Module, targets: list[str]) -> str | list[str]:
    """LoRA ``target_modules`` for peft: ``targets`` (module names, or ``["all-linear"]``) as given for
    a causal LM; for an image-text model, a pattern that matches them inside its language model only
    (decoder and output layer), where peft's own matching would also adapt the vision tower's
    layers of the same names, which text pairs never train."""
    if not is_image_text(model):
        return "all-linear" if targets == ["all-linear"] else targets
    import re

    decoder, head = language_model_names(model)
    if targets == ["all-linear"]:  # peft's meaning: every Linear but the output layer
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.get_submodule(decoder).named_modules()
                          if isinstance(module, nn.Linear)})
    names = "|".join(re.escape(t) for t in targets)
    pattern = rf"{re.escape(decoder)}\.(?:.*\.)?(?:{names})"
    if any(head == t or head.endswith("." + t) for t in targets):
        pattern += rf"|{re.escape(head)}"
    return pattern


@contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block, back in the mode it had after it (errors included)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout (as TRL does for DPO): the policy and reference must score alike."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for config in {id(c): c for c in (model.config, text_config(model.config))}.values():
        for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)
    for module in model.modules():  # attention layers that copied the rate at init
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation (gradient) checkpointing, under either transformers spelling."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers: its modules of the classes it names in ``_no_split_modules`` (a peft
    wrapper answers for its base model), the units FSDP2 shards one by one; [] where it names none."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in classes]


def compile_layers(model: nn.Module) -> int:
    """``torch.compile`` each decoder layer of ``model`` in place (dynamic shapes: packed rows vary in
    length); returns how many. Layer by layer, as TorchTitan does: the layers hold nearly all the
    work compiling fuses (norms, rotary embedding, the MLP's activation, residual adds), one graph
    serves every layer (same code, same shapes), FSDP2's per-layer hooks and activation
    checkpointing sit between graphs instead of breaking one, and the decoder's own forward stays
    eager. On torch 2.6 the decoder compiled whole gave wrong gradients under transformers 4.56 and
    failed under transformers 5 (its output-capturing wrapper); layer by layer both train as eager.
    The layers are :func:`decoder_layers`; a model naming none has its decoder compiled whole.
    Parameter names and saving are unchanged."""
    layers = decoder_layers(model)
    if not layers:
        from dpokit.logps import decoder_of

        layers = [decoder_of(model)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
